"""Organisational domains (RFC 7489 3.2) and identifier alignment, from publicsuffixlist.

Shared by the verifier's DMARC and the relay's check of learn mails (SPF or
DKIM must pass for a domain aligned with the From address).  The packaged
list is loaded once per process (authheaders re-reads its list on every
call); the verifier may pass a fresher one (`--psl`).
"""

from __future__ import annotations

import functools

from publicsuffixlist import PublicSuffixList

from poste.smtp.address import domain_key


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def org_domain(domain: str, psl: PublicSuffixList | None = None) -> str:
    """The organisational domain: the public suffix plus one label (RFC 7489 3.2)."""
    domain = domain_key(domain)
    return (psl or _psl()).privatesuffix(domain) or domain


def aligned(a: str, b: str, mode: str, psl: PublicSuffixList | None = None) -> bool:
    """`a` and `b` align: equal (mode "s", strict) or of one organisation ("r", relaxed)."""
    a, b = domain_key(a), domain_key(b)
    if not a or not b:
        return False
    return a == b if mode == "s" else org_domain(a, psl) == org_domain(b, psl)
