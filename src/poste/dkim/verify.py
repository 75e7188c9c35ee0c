"""DKIM verification of a stored mail, one result per signature (blaze's output).

Each DKIM-Signature is checked on its own with dkimpy, the key fetched over our
resolver (so `--nameserver` can point at a test zone on loopback).  The line is
`[OK]: domain` or `[ER]: domain`, in the order the signatures appear.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import dkim
import dns.exception
import dns.rdatatype
import dns.resolver
from dkim.util import InvalidTagValueList, parse_tag_value

import poste.dkim.sign  # noqa: F401  (installs the RSA hook; harmless for verifying)
from poste.dns.resolver import SyncResolver

log = logging.getLogger("poste.dkim")

TxtLookup = Callable[..., bytes | None]


@dataclass(frozen=True)
class Result:
    domain: str
    selector: str
    algorithm: str
    ok: bool
    reason: str = ""

    def line(self) -> str:
        return f"[{'OK' if self.ok else 'ER'}]: {self.domain}"


def txt_lookup(resolver: SyncResolver) -> TxtLookup:
    """dkimpy's `dnsfunc`: the first TXT record at a name, its strings joined."""

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(  # type: ignore[no-untyped-call]
                qname, dns.rdatatype.TXT, raise_on_no_answer=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            return None
        except dns.exception.Timeout as exc:
            raise dkim.DnsTimeoutError(str(exc)) from None
        if answer.rrset is None:
            return None
        for rdata in answer.rrset:
            return b"".join(rdata.strings)
        return None

    return lookup


class _Notes(logging.Handler):
    """Collects what dkimpy logs for one signature: its only way of saying why."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.logger = logging.Logger("poste.dkim.verify")  # detached: no console output
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def last(self) -> str:
        return self.messages[-1] if self.messages else ""


def _tags(value: bytes) -> dict[bytes, bytes]:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(b"".join(value.split()))
    except InvalidTagValueList:
        return {}
    return tags


def verify_message(message: bytes, lookup: TxtLookup) -> list[Result]:
    """One Result per DKIM-Signature field, top first; empty when there is none."""
    try:
        d = dkim.DKIM(message, logger=log)
    except dkim.DKIMException as exc:
        return [Result("?", "?", "?", False, f"unparsable message: {exc}")]
    sigs = [v for k, v in d.headers if k.lower() == b"dkim-signature"]
    results = []
    for idx, value in enumerate(sigs):
        tags = _tags(value)
        domain = tags.get(b"d", b"?").decode("ascii", "replace")
        selector = tags.get(b"s", b"?").decode("ascii", "replace")
        algorithm = tags.get(b"a", b"?").decode("ascii", "replace")
        notes = _Notes()
        try:
            ok = bool(dkim.DKIM(message, logger=notes.logger).verify(idx=idx, dnsfunc=lookup))
            reason = "" if ok else (notes.last() or "signature did not verify")
        except dkim.DKIMException as exc:
            ok, reason = False, str(exc)
        results.append(Result(domain, selector, algorithm, ok, reason))
    return results
