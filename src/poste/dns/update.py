"""Publish records into the domain's primary DNS server: RFC 2136 UPDATE with TSIG.

The key is given as ptt/ocaml-dns write it, `NAME:ALG:SECRET` (`ALG` as
`sha256` or `hmac-sha256`, any case; `SECRET` base64; ocaml-dns's
`NAME:FLAGS:ALG:SECRET` is accepted too).  Each record is first asked of the
primary itself (not a cache), and an UPDATE is sent only for the records that
are missing or differ, so restarting a service that publishes at start-up
changes nothing and sends nothing.

An update replaces exactly "our" records: the whole RRset for MX/A/AAAA and
for TXT names we own (the DKIM selector, `_dmarc`), and at a shared name (SPF
at the apex) only the TXT records carrying the same tag, so a
site-verification TXT next to SPF survives.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.tsig
import dns.tsigkeyring
import dns.update

from poste.dns.records import Record
from poste.dns.resolver import Nameserver

log = logging.getLogger("poste.dns")

TSIG_ALGORITHMS: dict[str, dns.name.Name] = {
    "md5": dns.tsig.HMAC_MD5,
    "sha1": dns.tsig.HMAC_SHA1,
    "sha224": dns.tsig.HMAC_SHA224,
    "sha256": dns.tsig.HMAC_SHA256,
    "sha384": dns.tsig.HMAC_SHA384,
    "sha512": dns.tsig.HMAC_SHA512,
}


class DNSUpdateError(Exception):
    """The primary refused or did not answer (one-line reason)."""


@dataclass(frozen=True)
class TsigKey:
    name: dns.name.Name
    algorithm: dns.name.Name
    secret: bytes

    def keyring(self) -> dict[dns.name.Name, dns.tsig.Key]:
        return {self.name: dns.tsig.Key(self.name, self.secret, self.algorithm)}


def parse_tsig(spec: str) -> TsigKey:
    """`NAME:ALG:SECRET` (or `NAME:FLAGS:ALG:SECRET`); raises ValueError with the reason."""
    parts = spec.strip().split(":")
    if len(parts) == 4 and parts[1].isdigit():
        parts = [parts[0], parts[2], parts[3]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(
            "a DNS key is NAME:ALGORITHM:BASE64SECRET, e.g. key.example.org:sha256:..."
        )
    name, alg, secret = parts
    alg_key = alg.lower().removeprefix("hmac-").removeprefix("hmac_")
    if alg_key.startswith("hmac-md5"):
        alg_key = "md5"
    algorithm = TSIG_ALGORITHMS.get(alg_key)
    if algorithm is None:
        known = ", ".join(sorted(TSIG_ALGORITHMS))
        raise ValueError(f"unknown TSIG algorithm {alg!r} (one of {known})")
    try:
        raw = base64.b64decode(secret, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the DNS key secret is not base64") from None
    if not raw:
        raise ValueError("the DNS key secret is empty")
    try:
        key_name = dns.name.from_text(name)
    except dns.exception.DNSException as exc:
        raise ValueError(f"bad DNS key name {name!r}: {exc}") from None
    return TsigKey(key_name, algorithm, raw)


def _where(server: Nameserver) -> str:
    host = f"[{server.ip}]" if ":" in server.ip else server.ip
    return f"{host}:{server.port}"


def _rdata_key(rd: dns.rdata.Rdata) -> str:
    """What makes two records the same: TXT by their joined strings (however split)."""
    if isinstance(rd, dns.rdtypes.ANY.TXT.TXT):
        return b"".join(rd.strings).decode("utf-8", "replace")
    return rd.to_text().lower()


def _wanted(record: Record) -> list[dns.rdata.Rdata]:
    rtype = dns.rdatatype.from_text(record.rtype)
    return [dns.rdata.from_text(dns.rdataclass.IN, rtype, t) for t in record.rdata_texts()]


def _ours(record: Record, rd: dns.rdata.Rdata) -> bool:
    if record.txt_tag is None:
        return True
    return _rdata_key(rd).lower().startswith(record.txt_tag.lower())


async def _send(
    msg: dns.message.Message, server: Nameserver, timeout: float
) -> dns.message.Message:
    try:
        if server.tcp:
            return await dns.asyncquery.tcp(msg, server.ip, port=server.port, timeout=timeout)
        resp = await dns.asyncquery.udp(msg, server.ip, port=server.port, timeout=timeout)
        if resp.flags & dns.flags.TC:
            return await dns.asyncquery.tcp(msg, server.ip, port=server.port, timeout=timeout)
        return resp
    except (OSError, dns.exception.DNSException) as exc:
        raise DNSUpdateError(
            f"DNS server {_where(server)} did not answer: {exc or type(exc).__name__}"
        ) from None


async def current(
    record: Record, server: Nameserver, timeout: float = 5.0
) -> list[dns.rdata.Rdata]:
    """The records of this name and type on the primary now (all of them, not just ours)."""
    q = dns.message.make_query(record.name, record.rtype)
    q.flags &= ~dns.flags.RD
    resp = await _send(q, server, timeout)
    rcode = resp.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return []
    if rcode != dns.rcode.NOERROR:
        raise DNSUpdateError(
            f"{_where(server)} answered {dns.rcode.to_text(rcode)} for {record.name}"
        )
    rtype = dns.rdatatype.from_text(record.rtype)
    for rrset in resp.answer:
        if rrset.rdtype == rtype and rrset.name == dns.name.from_text(record.name):
            return list(rrset)
    return []


def up_to_date(record: Record, present: Sequence[dns.rdata.Rdata]) -> bool:
    have = sorted(_rdata_key(rd) for rd in present if _ours(record, rd))
    want = sorted(_rdata_key(rd) for rd in _wanted(record))
    return have == want


@dataclass(frozen=True)
class Outcome:
    record: Record
    changed: bool

    def line(self) -> str:
        word = "published" if self.changed else "unchanged"
        return f"{word}: {self.record.name} {self.record.rtype}"


async def publish(
    records: Sequence[Record],
    zone: str,
    server: Nameserver,
    key: TsigKey,
    timeout: float = 5.0,
) -> list[Outcome]:
    """Bring `records` (PTRs are skipped) up to date on the primary; one UPDATE at most."""
    zone_name = dns.name.from_text(zone)
    upd = dns.update.UpdateMessage(zone_name, keyring=key.keyring(), keyname=key.name)
    outcomes = []
    for record in records:
        if record.ask:
            continue
        name = dns.name.from_text(record.name)
        if not name.is_subdomain(zone_name):
            raise DNSUpdateError(f"{record.name} is not in the zone {zone_name}")
        present = await current(record, server, timeout)
        if up_to_date(record, present):
            outcomes.append(Outcome(record, False))
            continue
        rtype = dns.rdatatype.from_text(record.rtype)
        if record.txt_tag is None:
            upd.delete(name, rtype)
        else:
            for rd in present:
                if _ours(record, rd):
                    upd.delete(name, rd)
        for rd in _wanted(record):
            upd.add(name, record.ttl, rd)
        outcomes.append(Outcome(record, True))
    if any(o.changed for o in outcomes):
        resp = await _send_update(upd, server, timeout)
        rcode = resp.rcode()
        if rcode != dns.rcode.NOERROR:
            raise DNSUpdateError(
                f"{_where(server)} refused the update of {zone_name}: {dns.rcode.to_text(rcode)}"
            )
        for o in outcomes:
            if o.changed:
                log.info("dns: published %s %s", o.record.name, o.record.rtype)
    return outcomes


async def _send_update(
    upd: dns.update.UpdateMessage, server: Nameserver, timeout: float
) -> dns.message.Message:
    """Updates go over TCP: big TXT records do not fit in a UDP datagram."""
    try:
        return await dns.asyncquery.tcp(upd, server.ip, port=server.port, timeout=timeout)
    except dns.tsig.PeerError as exc:
        raise DNSUpdateError(
            f"{_where(server)} rejected our TSIG key: {type(exc).__name__}"
        ) from None
    except (OSError, dns.exception.DNSException) as exc:
        raise DNSUpdateError(
            f"DNS server {_where(server)} did not answer: {exc or type(exc).__name__}"
        ) from None


async def withdraw(
    records: Sequence[Record], zone: str, server: Nameserver, key: TsigKey, timeout: float = 5.0
) -> None:
    """Delete exactly these records (an ACME challenge once answered); one UPDATE."""
    zone_name = dns.name.from_text(zone)
    upd = dns.update.UpdateMessage(zone_name, keyring=key.keyring(), keyname=key.name)
    for record in records:
        for rd in _wanted(record):
            upd.delete(dns.name.from_text(record.name), rd)
    resp = await _send_update(upd, server, timeout)
    rcode = resp.rcode()
    if rcode != dns.rcode.NOERROR:
        raise DNSUpdateError(
            f"{_where(server)} refused the update of {zone_name}: {dns.rcode.to_text(rcode)}"
        )


async def zone_of(name: str, server: Nameserver, timeout: float = 5.0) -> str:
    """The zone the primary holds `name` in: the owner of the SOA it answers with."""
    q = dns.message.make_query(name, "SOA")
    q.flags &= ~dns.flags.RD
    resp = await _send(q, server, timeout)
    for rrset in resp.answer + resp.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return str(rrset.name.to_text())
    raise DNSUpdateError(
        f"{_where(server)} is not authoritative for {name} "
        f"({dns.rcode.to_text(resp.rcode())}, no SOA): give the zone"
    )
