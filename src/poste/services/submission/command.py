"""`poste submission`: the command line of authenticated submission (see service.py)."""

from __future__ import annotations

from typing import Any

import click

from poste.runtime.command import serve, with_settings
from poste.services.submission.service import build
from poste.services.submission.settings import SETTINGS


@click.command()
@with_settings(SETTINGS)
def main(values: dict[str, Any]) -> None:
    """Authenticated submission: 465 (implicit TLS) and 587 (STARTTLS), AUTH PLAIN/LOGIN.

    With neither --listen-tls nor --listen, both listen on their standard
    ports; with one of them, only that one.
    """
    serve(values, lambda: build(values))
