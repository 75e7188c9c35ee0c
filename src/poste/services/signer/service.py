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
from typing import Any

from prometheus_client import Counter

from poste.dkim.sign import Signer, sign_or_pass
from poste.dns.resolver import Nameserver, NameserverError, parse_nameserver
from poste.runtime.hostport import parse_hostport
from poste.runtime.run import Job, Parts, StartError
from poste.runtime.settings import ConfigError, Values
from poste.services.signer.options import make_signer
from poste.smtp.client import SMTPHop
from poste.smtp.message import Message
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

    async def on_data(self, env: Envelope, message: Message) -> Verdict:
        async with message.whole() as data:  # dkimpy hashes one bytes: a big mail waits its turn
            fields = await asyncio.to_thread(sign_or_pass, self.signer, data, env.queue_id)
        SIGNED.labels("signed" if fields else "unsigned").inc()
        if fields:
            algs = ",".join(k.key.signature_algorithm.decode() for k in self.signer.keys)
            log.debug("%s: signed d=%s a=%s", env.queue_id, self.signer.keys[0].domain, algs)
        return Verdict(prepend=fields)


def dns_target(server: str, key: str) -> tuple[Nameserver, Any]:
    """The primary and the TSIG key to publish with, checked before anything starts."""
    from poste.dns.update import parse_tsig  # dnspython.tsig is slow to import

    try:
        primary = parse_nameserver(server)
    except NameserverError as exc:
        raise ConfigError("dns-server", str(exc)) from None
    try:
        return primary, parse_tsig(key)
    except ValueError as exc:
        raise ConfigError("dns-key", str(exc)) from None


async def publish_keys(signer: Signer, server: Nameserver, key: Any, zone: str) -> None:
    """Put the signer's public keys in DNS; a StartError when we cannot."""
    from poste.dkim.keys import dkim_record
    from poste.dns.update import DNSUpdateError, publish

    records = [dkim_record(k.domain, k.selector, k.key) for k in signer.keys]
    try:
        outcomes = await publish(records, zone, server, key)
    except DNSUpdateError as exc:
        raise StartError(f"cannot publish the DKIM keys: {exc}") from None
    for o in outcomes:
        log.info("dns %s", o.line())


def signer_of(values: Values) -> Signer:
    return make_signer(str(values["domain"]), values["selector"], values["private-key"],
                       values["sign-headers"], values["oversign"])


def _dns_pair(values: Values) -> tuple[str | None, str | None]:
    server, key = values["dns-server"], values["dns-key"]
    if bool(server) != bool(key):
        raise ConfigError(None, "{0} and {1} go together", names=("dns-server", "dns-key"))
    return server, key


def publisher(values: Values, signer: Signer) -> list[Job]:
    """With dns-server and dns-key: publish the keys before the listener opens."""
    server, key = _dns_pair(values)
    if not server or not key:
        return []
    primary, tsig = dns_target(server, key)  # a typo is an error before anything starts
    zone = values["zone"] or values["domain"]

    async def publish() -> None:
        await publish_keys(signer, primary, tsig, zone)

    return [publish]


def build(values: Values) -> Parts:
    """`poste signer`: sign, then the next hop over SMTP."""
    _dns_pair(values)  # a usage error before the keys are read
    signer = signer_of(values)
    host, port = parse_hostport(values["listen"], 25, "listen")
    dest_host, dest_port = parse_hostport(values["destination"], 25, "destination")
    service = SMTPService(
        SignerStage(signer), SMTPHop(dest_host, dest_port, helo=values["hostname"]),
        host=host, port=port, hostname=values["hostname"],
    )
    return Parts([service], before=publisher(values, signer))
