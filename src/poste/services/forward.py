"""`poste forward`: the passthrough service, the skeleton every real service fills in.

It adds only `Received:` and answers 250 only once the destination did.
"""

from __future__ import annotations

import click

from poste.runtime.hostport import parse_hostport
from poste.runtime.service import (
    destination_option,
    hostname_option,
    listen_option,
    run_services,
    setup_logging,
    tls_cert_option,
    tls_context_from,
    tls_key_option,
    verbose_option,
)
from poste.smtp.client import SMTPHop
from poste.smtp.server import SMTPService
from poste.smtp.stage import Stage


@click.command()
@listen_option
@destination_option
@hostname_option
@tls_cert_option
@tls_key_option
@click.option("--require-tls", is_flag=True, help="Refuse mail before STARTTLS (530).")
@verbose_option
def main(
    listen: str,
    destination: str,
    hostname: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    require_tls: bool,
    verbose: int,
) -> None:
    """Pass every mail on to --destination, adding only Received:."""
    setup_logging(verbose)
    host, port = parse_hostport(listen, 25)
    dest_host, dest_port = parse_hostport(destination, 25)
    ctx = tls_context_from(tls_cert, tls_key)
    service = SMTPService(
        Stage(),
        SMTPHop(dest_host, dest_port, helo=hostname),
        host=host,
        port=port,
        hostname=hostname,
        tls_context=ctx,
        require_tls=require_tls,
    )
    run_services(service)
