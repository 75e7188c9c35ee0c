"""`poste verifier`: the command line of the public MX (see service.py)."""

from __future__ import annotations

from typing import Any

import click

from poste.runtime.command import serve, with_settings
from poste.services.verifier.service import build
from poste.services.verifier.settings import SETTINGS


@click.command()
@with_settings(SETTINGS)
def main(values: dict[str, Any]) -> None:
    """The public MX: label mail with SPF, DKIM and DMARC, pass it to --destination."""
    serve(values, lambda: build(values))
