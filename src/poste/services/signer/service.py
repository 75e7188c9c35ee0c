"""`poste signer`: DKIM-sign everything that leaves (ptt's nec, without its drops).

One `DKIM-Signature:` per `--selector`/`--private-key` pair (rsa-sha256 and/or
ed25519-sha256), relaxed/relaxed.  Signing runs in a worker thread so the
event loop never waits on it.  A mail that cannot be signed is passed on
unsigned and byte-identical, with a log line: the signer never drops mail.
With `--dns-server`/`--dns-key` the public keys are published at start-up
(RFC 2136 + TSIG), only when the served record is missing or different.
"""

from __future__ import annotations

import asyncio
import logging

import click
from prometheus_client import Counter

from poste.dkim.sign import Signer, sign_or_pass
from poste.runtime.hostport import parse_hostport
from poste.runtime.service import (
    destination_option,
    hostname_option,
    listen_option,
    run_services,
    setup_logging,
    verbose_option,
)
from poste.services.signer.options import make_signer, sign_header_options
from poste.smtp.client import SMTPHop
from poste.smtp.server import SMTPService
from poste.smtp.stage import Envelope, Stage, Verdict

log = logging.getLogger("poste.signer")

SIGNED = Counter(
    "poste_dkim_signed",
    "Mails at the signer: signed, or passed on unsigned (could not be signed).",
    ["result"],
)


class SignerStage(Stage):
    """Accepts everything; at the end of DATA, prepends the signatures."""

    name = "signer"

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    async def on_data(self, env: Envelope, data: bytes) -> Verdict:
        fields = await asyncio.to_thread(sign_or_pass, self.signer, data, env.queue_id)
        SIGNED.labels("signed" if fields else "unsigned").inc()
        if fields:
            algs = ",".join(k.key.signature_algorithm.decode() for k in self.signer.keys)
            log.debug("%s: signed d=%s a=%s", env.queue_id, self.signer.keys[0].domain, algs)
        return Verdict(prepend=fields)


async def publish_keys(signer: Signer, dns_server: str, dns_key: str, zone: str) -> None:
    """Put the signer's public keys in DNS; raise a one-line click error when we cannot."""
    from poste.dkim.keys import dkim_record
    from poste.dns.update import DNSUpdateError, publish
    from poste.runtime.service import dns_key_option, dns_server_option

    server = dns_server_option(dns_server)
    key = dns_key_option(dns_key)
    records = [dkim_record(k.domain, k.selector, k.key) for k in signer.keys]
    try:
        outcomes = await publish(records, zone, server, key)
    except DNSUpdateError as exc:
        raise click.ClickException(f"cannot publish the DKIM keys: {exc}") from None
    for o in outcomes:
        log.info("dns %s", o.line())


@click.command()
@click.option("--domain", "-d", required=True, help="The signing domain (d= tag).")
@click.option(
    "--selector", "-s", "selectors", multiple=True, required=True, help="Selector, one per key."
)
@click.option(
    "--private-key",
    "-k",
    "paths",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="DKIM key (PEM, rsa or ed25519); repeat with --selector for dual signing.",
)
@destination_option
@listen_option
@hostname_option
@click.option("--dns-server", metavar="IP[:PORT]", help="Primary DNS server to publish keys to.")
@click.option("--dns-key", metavar="NAME:ALG:SECRET", help="TSIG key allowed to update the zone.")
@click.option("--zone", help="Zone to update (default: --domain).")
@sign_header_options[0]
@sign_header_options[1]
@verbose_option
def main(
    domain: str,
    selectors: tuple[str, ...],
    paths: tuple[str, ...],
    destination: str,
    listen: str,
    hostname: str | None,
    dns_server: str | None,
    dns_key: str | None,
    zone: str | None,
    sign_headers: str | None,
    oversign: str | None,
    verbose: int,
) -> None:
    """DKIM-sign every mail and pass it on to --destination."""
    if bool(dns_server) != bool(dns_key):
        raise click.UsageError("--dns-server and --dns-key go together")
    signer = make_signer(domain, selectors, paths, sign_headers, oversign)
    host, port = parse_hostport(listen, 25)
    dest_host, dest_port = parse_hostport(destination, 25)
    if dns_server and dns_key:
        # Check the flags now, so a typo is an error before anything starts.
        from poste.runtime.service import dns_key_option, dns_server_option

        dns_server_option(dns_server)
        dns_key_option(dns_key)
    setup_logging(verbose)
    service = SMTPService(
        SignerStage(signer),
        SMTPHop(dest_host, dest_port, helo=hostname),
        host=host,
        port=port,
        hostname=hostname,
    )

    async def on_start() -> None:
        if dns_server and dns_key:
            await publish_keys(signer, dns_server, dns_key, zone or domain)

    run_services(service, on_start=on_start)
