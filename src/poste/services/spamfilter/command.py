"""`poste spamfilter`: the command line of the spam labeller (see service.py)."""

from __future__ import annotations

from typing import Any

import click

from poste.runtime.command import serve, with_settings
from poste.services.spamfilter.service import build
from poste.services.spamfilter.settings import SETTINGS


@click.command()
@with_settings(SETTINGS)
def main(values: dict[str, Any]) -> None:
    """Label each mail X-Spamtacus: yes|no|unknown and pass it on to --destination."""
    serve(values, lambda: build(values))
