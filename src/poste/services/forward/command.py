"""`poste forward`: the passthrough service, the skeleton every real service fills in.

It adds only `Received:` and answers 250 only once the destination did.
"""

from __future__ import annotations

from typing import Any

import click

from poste.runtime.command import serve, with_settings
from poste.runtime.hostport import parse_hostport
from poste.runtime.run import Parts
from poste.runtime.settings import Values
from poste.runtime.tls import tls_files
from poste.services.forward.settings import SETTINGS
from poste.smtp.client import HOP_KEEP, SMTPHop
from poste.smtp.server import SMTPService
from poste.smtp.stage import Stage


def build(values: Values) -> Parts:
    host, port = parse_hostport(values["listen"], 25, "listen")
    dest_host, dest_port = parse_hostport(values["destination"], 25, "destination")
    tls = tls_files(values)
    service = SMTPService(
        Stage(), SMTPHop(dest_host, dest_port, helo=values["hostname"], keep=HOP_KEEP),
        host=host, port=port,
        hostname=values["hostname"], tls_context=tls.ctx if tls else None,
        require_tls=bool(values["require-tls"]),
    )
    return Parts([service], reloads=[("certificate", tls.reload)] if tls else [])


@click.command()
@with_settings(SETTINGS)
def main(values: dict[str, Any]) -> None:
    """Pass every mail on to --destination, adding only Received:."""
    serve(values, lambda: build(values))
