"""`poste tls-report`: send the TLS-RPT reports (RFC 8460) of the relay's outbound sessions.

The relay sends them itself a few minutes after each UTC midnight; this is
for doing it by hand (`--now`: today's sessions so far too) and for tests.
Report mails are queued in the spool, where a running relay takes them at
its next rescan; each report is also kept as a .json.gz file, and its path
printed.
"""

from __future__ import annotations

import asyncio
import sys

import click

from poste.dns.resolver import NameserverError, make_resolver
from poste.services.relay.spool import Spool, SpoolError
from poste.services.relay.tls_policy.policy import verifying_context
from poste.services.relay.tls_policy.reports import spool_mail
from poste.services.relay.tls_policy.tlsrpt import Reporter


@click.command(name="tls-report", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--spool", "spool_dir", required=True, type=click.Path(file_okay=False),
              help="The relay's spool folder (its sessions are recorded in SPOOL/tls/tlsrpt).")
@click.option("--domain", required=True, help="Our domain: the reports' submitter.")
@click.option("--postmaster", help="Sender and contact of the reports (default: postmaster@DOMAIN).")
@click.option("--nameserver", multiple=True, metavar="[tcp:|udp:]IP[:PORT]",
              help="DNS resolver for the _smtp._tls records (default: resolv.conf).")
@click.option("--tls-ca-file", type=click.Path(dir_okay=False, exists=True),
              help="CA bundle for https: report endpoints (default: the system's).")
@click.option("--now", is_flag=True, help="Report today's sessions so far too.")
def main(spool_dir: str, domain: str, postmaster: str | None, nameserver: tuple[str, ...],
         tls_ca_file: str | None, now: bool) -> None:
    """Report the recorded days to the domains that publish a TLSRPT record."""
    try:
        spool = Spool(spool_dir, create=False)
    except SpoolError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        resolver = make_resolver(list(nameserver))
    except NameserverError as exc:
        raise click.BadParameter(str(exc), param_hint="--nameserver") from None
    sender = postmaster or f"postmaster@{domain.rstrip('.').lower()}"
    reporter = Reporter(spool.path / "tls" / "tlsrpt", resolver, verifying_context(tls_ca_file),
                        submitter=domain.rstrip(".").lower(), sender=sender,
                        mail=spool_mail(spool, sender))
    try:
        written = asyncio.run(reporter.send_due(now=now))
    except OSError as exc:
        raise click.ClickException(f"reports not sent: {exc}") from None
    for path in written:
        click.echo(str(path))
    if not written:
        click.echo("no report due", err=True)
    sys.exit(0)
