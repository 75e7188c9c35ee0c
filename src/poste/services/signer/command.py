"""`poste signer`: the command line of the signer (see service.py)."""

from __future__ import annotations

from typing import Any

import click

from poste.runtime.command import serve, with_settings
from poste.services.signer.service import build
from poste.services.signer.settings import SETTINGS


@click.command()
@with_settings(SETTINGS)
def main(values: dict[str, Any]) -> None:
    """DKIM-sign every mail and pass it on to --destination."""
    serve(values, lambda: build(values))
