"""What a receiving provider checks, run on a stored mail: our verifier's code and independent ones.

`receiver(ns)` is poste's own verifier (SPF, DKIM, ARC, DMARC) pointed at the
test DNS server; `txt_func(ns)` is a TXT lookup over the same server in the
shape dkimpy and authheaders take as `dnsfunc`, so their validators (not
ours) can judge the same mail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import dns.resolver

from poste.services.verifier.authenticate import Authenticator, Report
from poste.services.verifier.spf import resolver_for
from poste.smtp.message import Message


def txt_func(nameserver: str) -> Callable[..., str | None]:
    """dkimpy/authheaders `dnsfunc`: the joined TXT strings at a name (str), or None."""
    resolver = resolver_for([nameserver], 5.0)

    def lookup(name: bytes | str, timeout: float = 5) -> str | None:
        qname = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(qname, "TXT", search=False)  # type: ignore[no-untyped-call]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
            return None
        return "".join(b"".join(r.strings).decode() for r in answer)

    return lookup


def receiver(nameserver: str, hostname: str = "mx.receiver.test") -> Authenticator:
    return Authenticator(resolver_for([nameserver], 5.0), hostname)


def check(auth: Authenticator, ip: str, sender: str, helo: str, mail: bytes) -> Report:
    return asyncio.run(auth.check(ip, sender, helo, Message.of(mail)))
