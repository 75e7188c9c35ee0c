"""`poste signer`: DKIM-sign everything that leaves (ptt's nec, without its drops).

One `DKIM-Signature:` per `--selector`/`--private-key` pair (rsa-sha256 and/or
ed25519-sha256), relaxed/relaxed.  A mail of up to 32 KB signed with RSA-2048
or ed25519 keys is signed on the event loop (under a millisecond: less than a
trip to a thread); anything else in a worker thread, so the loop never waits
long on it.  A mail that cannot be signed is passed on unsigned and
byte-identical, with a log line: the signer never drops mail.
With `--dns-server`/`--dns-key` the public keys are published at start-up
(RFC 2136 + TSIG), only when the served record is missing or different.
With `--key-dir` the keys rotate (rotation.py): the active key of each series
signs, and a background job switches and withdraws selectors as they age.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import Counter

from poste.dkim.sign import DEFAULT_HEADERS, DEFAULT_OVERSIGN, Signer, SigningKey, sign_or_pass
from poste.dns.resolver import Nameserver, NameserverError, parse_nameserver
from poste.metrics import labelled
from poste.runtime.hostport import parse_hostport
from poste.runtime.run import Job, Parts, StartError
from poste.runtime.settings import ConfigError, Values
from poste.services.signer.options import make_signer, parse_field_list, signing_keys
from poste.services.signer.rotation import (
    KeyFolder,
    Primary,
    RotationError,
    advance,
    due_for_rotation,
    rotate,
)
from poste.smtp import listen
from poste.smtp.client import HOP_KEEP, SMTPHop
from poste.smtp.message import Message
from poste.smtp.server import SMTPService
from poste.smtp.stage import Envelope, Stage, Verdict

log = logging.getLogger("poste.signer")

SIGNED = Counter(
    "poste_dkim_signed",
    "Mails at the signer: signed, or passed on unsigned (could not be signed).",
    ["result"],
)


# Mails up to this size are signed on the event loop when every key is RSA-2048 or
# ed25519 (about 0.6 ms a mail at 5 KB, bench/dkim_sign.py); larger mails or keys in a
# thread.  Measured (issue 16, docs/performance.md's Outbound part): the hand-off to a
# thread and back cost `poste up` about as much CPU as the signature, as it did for
# the spam judge (services/spamfilter/service.py); under the GIL the thread would not
# have run beside the loop anyway.
INLINE_BYTES = 32 * 1024
INLINE_RSA_BITS = 2048


def signs_inline(signer: Signer, size: int) -> bool:
    """Whether a mail of `size` bytes is cheap enough to sign on the event loop."""
    return size <= INLINE_BYTES and all(
        k.key.algorithm != "rsa" or k.key.bits <= INLINE_RSA_BITS for k in signer.keys)


class SignerStage(Stage):
    """Accepts everything; at the end of DATA, prepends the signatures."""

    name = "signer"

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    async def on_data(self, env: Envelope, message: Message) -> Verdict:
        async with message.whole() as data:  # dkimpy hashes one bytes: a big mail waits its turn
            signer = self.signer  # rotation may swap it: this mail keeps the one it began with
            if signs_inline(signer, len(data)):
                fields = sign_or_pass(signer, data, env.queue_id)
            else:
                fields = await asyncio.to_thread(sign_or_pass, signer, data, env.queue_id)
        labelled(SIGNED, "signed" if fields else "unsigned").inc()
        if fields and log.isEnabledFor(logging.DEBUG):
            algs = ",".join(k.key.signature_algorithm.decode() for k in signer.keys)
            log.debug("%s: signed d=%s a=%s", env.queue_id, signer.keys[0].domain, algs)
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


async def publish_keys(signer: Signer, server: Nameserver, key: Any, zone: str,
                       folder: KeyFolder | None = None) -> None:
    """Put the signer's public keys in DNS; a StartError when we cannot."""
    from poste.dkim.keys import dkim_record, record_name
    from poste.dns.update import DNSUpdateError, publish

    records = [dkim_record(k.domain, k.selector, k.key) for k in signer.keys]
    if folder is not None:  # the pending and retiring ones too
        try:
            records = await asyncio.to_thread(folder.published, signer.keys[0].domain)
        except RotationError as exc:
            raise StartError(f"cannot publish the DKIM keys: {exc}") from None
        records += [dkim_record(k.domain, k.selector, k.key) for k in signer.keys
                    if all(r.name != record_name(k.selector, k.domain) for r in records)]
    try:
        outcomes = await publish(records, zone, server, key)
    except DNSUpdateError as exc:
        raise StartError(f"cannot publish the DKIM keys: {exc}") from None
    for o in outcomes:
        log.info("dns %s", o.line())


def key_folder(values: Values) -> KeyFolder | None:
    return KeyFolder(values["key-dir"]) if values.get("key-dir") else None


def signer_of(values: Values) -> Signer:
    """The selector/private-key pairs, and the active rotated keys of key-dir."""
    domain = str(values["domain"]).rstrip(".")
    folder = key_folder(values)
    if not folder:
        return make_signer(domain, values["selector"], values["private-key"],
                           values["sign-headers"], values["oversign"])
    keys: list[SigningKey] = []
    if values["selector"] or values["private-key"]:
        keys = signing_keys(domain, values["selector"], values["private-key"])
    try:
        keys += folder.signing_keys(domain)
    except RotationError as exc:
        raise ConfigError("key-dir", str(exc)) from None
    if not keys:
        raise ConfigError("key-dir", f"no active key in {folder.folder}: poste dkim rotate"
                          " --key-dir ... makes the first one")
    try:
        return Signer(keys, parse_field_list(values["sign-headers"], DEFAULT_HEADERS),
                      parse_field_list(values["oversign"], DEFAULT_OVERSIGN))
    except ValueError as exc:
        raise ConfigError(None, str(exc), usage=True) from None


def rotation(values: Values, stage: SignerStage) -> list[Job]:
    """With key-dir: beside the listener, move the keys on (switch when the new record is
    visible and its TTL passed, withdraw after the grace, rotate on schedule) and sign with
    the active ones; a change is a new Signer object, so a mail being signed keeps its own."""
    folder = key_folder(values)
    if folder is None:
        return []
    domain = str(values["domain"]).rstrip(".")
    server, key = _dns_pair(values)
    primary = None
    if server and key:
        ns, tsig = dns_target(server, key)
        primary = Primary(ns, tsig, values["zone"] or domain)
    every, grace = values["rotate-every"], float(values["rotation-grace"])
    check = float(values["rotation-check"])
    if every and primary is None:
        raise ConfigError(None, "{0} needs {1} and {2}",
                          names=("rotate-every", "dns-server", "dns-key"))

    async def run() -> None:
        while True:
            try:
                if every and primary is not None:
                    entries = await asyncio.to_thread(folder.read)
                    for algorithm in due_for_rotation(entries, float(every), time.time()):
                        await rotate(folder, domain, algorithm, primary)
                if await advance(folder, domain, primary, grace):
                    stage.signer = await asyncio.to_thread(signer_of, values)
            except (RotationError, ConfigError) as exc:
                log.error("dkim: key rotation: %s", exc)
            except Exception:  # the folder must not stop signing with what we have
                log.exception("dkim: key rotation failed")
            await asyncio.sleep(check)

    return [run]


def _dns_pair(values: Values) -> tuple[str | None, str | None]:
    server, key = values["dns-server"], values["dns-key"]
    if bool(server) != bool(key):
        raise ConfigError(None, "{0} and {1} go together", names=("dns-server", "dns-key"))
    return server, key


def publisher(values: Values, signer: Signer) -> list[Job]:
    """With dns-server and dns-key: publish the keys before the listener opens.

    With `--workers N` worker 0 alone publishes, before the others start
    (runtime/workers.py): the others would only find the records up to date,
    at the price of a TSIG query each, and a primary out of reach when one of
    them restarts would keep it from serving.
    """
    server, key = _dns_pair(values)
    if not server or not key:
        return []
    primary, tsig = dns_target(server, key)  # a typo is an error before anything starts
    if not listen.first():
        return []
    zone = values["zone"] or values["domain"]

    async def publish() -> None:
        await publish_keys(signer, primary, tsig, zone, key_folder(values))

    return [publish]


def build(values: Values) -> Parts:
    """`poste signer`: sign, then the next hop over SMTP."""
    _dns_pair(values)  # a usage error before the keys are read
    signer = signer_of(values)
    host, port = parse_hostport(values["listen"], 25, "listen")
    dest_host, dest_port = parse_hostport(values["destination"], 25, "destination")
    stage = SignerStage(signer)
    service = SMTPService(
        stage, SMTPHop(dest_host, dest_port, helo=values["hostname"], keep=HOP_KEEP),
        host=host, port=port, hostname=values["hostname"],
    )
    return Parts([service], before=publisher(values, signer), background=rotation(values, stage))
