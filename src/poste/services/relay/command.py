"""`poste relay`: the command line of the relay (see service.py)."""

from __future__ import annotations

from typing import Any

import click

from poste.runtime.command import serve, with_settings
from poste.services.relay.service import build
from poste.services.relay.settings import SETTINGS


@click.command()
@with_settings(SETTINGS)
def main(values: dict[str, Any]) -> None:
    """Deliver mail: local addresses to their targets (SRS), others to their MX (--granted only).

    Every accepted mail is on disk (fsync) before the 250; undeliverable mail
    is retried with backoff and bounced (RFC 3464 DSN) after --lifetime.
    """
    serve(values, lambda: build(values))
