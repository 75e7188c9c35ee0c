"""DANE for SMTP (RFC 7672): TLSA records of an MX host, and whether a peer's chain matches them.

Only DNSSEC-validated answers count: the resolver (`--nameserver`, for DANE
a validating one such as unbound on the same machine) must set the AD bit.
We ask with the DO and AD bits; an answer without AD is "insecure" and DANE
does not apply, as it does not when the MX RRset itself is insecure (2.2.1).
A lookup that fails (SERVFAIL: a bogus signature) for a secure MX means we
cannot know, and the mail waits (2.1.1).

Matching (2.2, 3.1): DANE-EE(3) against the leaf alone, with no name or date
check; DANE-TA(2) against a certificate of the presented chain, which must
sign its way down to the leaf, whose names must cover the MX host and whose
dates must hold.  PKIX-TA/EE (0/1) are not usable for SMTP (3.1.3).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.rdatatype
import dns.resolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

log = logging.getLogger("poste.relay.dane")

DANE_TA, DANE_EE = 2, 3


@dataclass(frozen=True)
class TLSA:
    usage: int
    selector: int
    mtype: int
    data: bytes

    def text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @property
    def usable(self) -> bool:
        return self.usage in (DANE_TA, DANE_EE) and self.selector in (0, 1) and self.mtype in (0, 1, 2)


@dataclass(frozen=True)
class Lookup:
    """`records`: the usable TLSA records (DANE applies when not None); `failure`: a
    TLS-RPT result type when the answer could not be had (the mail must wait)."""

    records: tuple[TLSA, ...] | None
    name: str = ""
    failure: str | None = None
    reason: str = ""


def validating(resolver: dns.asyncresolver.Resolver) -> dns.asyncresolver.Resolver:
    """A resolver on the same servers that asks for DNSSEC (DO) and the AD bit."""
    out = dns.asyncresolver.Resolver(configure=False)
    out.nameservers = list(resolver.nameservers)
    out.lifetime, out.timeout = resolver.lifetime, resolver.timeout
    out.use_edns(0, dns.flags.DO, 1232)
    out.flags = dns.flags.RD | dns.flags.AD
    out.cache = dns.resolver.LRUCache()
    return out


class DANE:
    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolver = validating(resolver)
        self.tcp = bool(getattr(resolver, "use_tcp", False))

    async def _secure(self, name: str, kind: str) -> tuple[bool, dns.resolver.Answer | None]:
        """(validated?, answer or None when the name or type does not exist)."""
        try:
            answer = await self.resolver.resolve(name, kind, tcp=self.tcp)
        except dns.resolver.NXDOMAIN as exc:
            return any(r.flags & dns.flags.AD for r in exc.responses().values()), None  # type: ignore[no-untyped-call]
        except dns.resolver.NoAnswer as exc:
            response = exc.kwargs.get("response")
            return bool(response is not None and response.flags & dns.flags.AD), None
        return bool(answer.response.flags & dns.flags.AD), answer

    async def mx_secure(self, domain: str) -> bool:
        """Whether the MX RRset of `domain` (or its denial) is validated: only then DANE applies."""
        try:
            secure, _ = await self._secure(domain, "MX")
        except dns.exception.DNSException:
            return False
        return secure

    async def lookup(self, host: str, port: int = 25) -> Lookup:
        name = f"_{port}._tcp.{host.rstrip('.')}"
        try:
            secure, answer = await self._secure(name, "TLSA")
        except dns.exception.DNSException as exc:
            # SERVFAIL from a validating resolver: bogus, or the servers are down
            return Lookup(None, name, "dnssec-invalid", f"TLSA lookup of {name} failed: "
                          f"{type(exc).__name__}")
        if not secure or answer is None:
            return Lookup(None, name)
        records = tuple(
            TLSA(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer
            if r.rdtype == dns.rdatatype.TLSA
        )
        usable = tuple(r for r in records if r.usable)
        if not usable:
            # RFC 7672 2.2: TLS is still a must, without authentication
            log.info("DANE %s: no usable TLSA record among %d", name, len(records))
        return Lookup(usable, name)


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(Encoding.DER)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _matches(record: TLSA, cert: x509.Certificate) -> bool:
    data = _selected(cert, record.selector)
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def _name_ok(cert: x509.Certificate, host: str) -> bool:
    host = host.rstrip(".").lower()
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = [n.lower() for n in names.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        dns_names = []
    for n in dns_names:
        if n == host:
            return True
        if n.startswith("*.") and "." in host and host.split(".", 1)[1] == n[2:]:
            return True
    return False


def _signed_down(chain: list[x509.Certificate], upto: int) -> bool:
    """Each certificate of chain[0..upto] is issued by the next one."""
    try:
        for i in range(upto):
            chain[i].verify_directly_issued_by(chain[i + 1])
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def match(records: tuple[TLSA, ...], chain_der: list[bytes], host: str) -> str | None:
    """None if the chain (leaf first) matches one of `records`, else why not."""
    try:
        chain = [x509.load_der_x509_certificate(d) for d in chain_der]
    except ValueError:
        return "the server's certificate cannot be read"
    if not chain:
        return "the server sent no certificate"
    for r in records:
        if r.usage == DANE_EE and _matches(r, chain[0]):
            return None
    now = datetime.datetime.now(datetime.UTC)
    leaf = chain[0]
    for r in records:
        if r.usage != DANE_TA:
            continue
        for i, cert in enumerate(chain):
            if not _matches(r, cert):
                continue
            if not _signed_down(chain, i):
                return "the chain does not lead from the TLSA trust anchor to the certificate"
            if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
                return "the certificate is expired or not yet valid"
            if not _name_ok(leaf, host):
                return f"the certificate does not name {host}"
            return None
    return "no TLSA record matches the server's certificate chain"
