"""A domain's DMARC record (RFC 7489 6.6.3) and identifier alignment (3.1).

Shared by the verifier, which judges a received mail, and the relay, which
asks before it forwards whether the author's domain would refuse the mail
once its DKIM signature is broken (services/relay/from_rewrite.py).  The
organisational domain comes from publicsuffixlist, loaded once per process
(authheaders re-reads its list on every call).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import dns.exception
import dns.rdatatype
import dns.resolver
from publicsuffixlist import PublicSuffixList

from poste.dns.resolver import SyncResolver
from poste.smtp.address import domain_key


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def org_domain(domain: str, psl: PublicSuffixList | None = None) -> str:
    """The organisational domain: the public suffix plus one label (RFC 7489 3.2)."""
    domain = domain_key(domain)
    return (psl or _psl()).privatesuffix(domain) or domain


def aligned(a: str, b: str, mode: str, psl: PublicSuffixList | None = None) -> bool:
    a, b = domain_key(a), domain_key(b)
    if not a or not b:
        return False
    return a == b if mode == "s" else org_domain(a, psl) == org_domain(b, psl)


@dataclass(frozen=True)
class Policy:
    p: str = "none"
    sp: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    org_record: bool = False  # found at the organisational domain, not the From domain


class DNSTrouble(Exception):
    """The record could not be looked up (a temporary error: try later)."""


def _txt_until(
    resolver: SyncResolver, name: str, cached_only: bool = False
) -> tuple[list[str], float]:
    """The TXT strings of `name` and when the answer they come from expires (0: unknown)."""
    try:
        if cached_only:  # NotCached goes up: it is no DNS trouble
            answer = resolver.resolve_cached(name, dns.rdatatype.TXT, raise_on_no_answer=False)
        else:
            answer = resolver.resolve(  # type: ignore[no-untyped-call]
                name, dns.rdatatype.TXT, raise_on_no_answer=False, search=False
            )
    except dns.resolver.NXDOMAIN:
        return [], resolver.nxdomain_expiration(name)
    except (dns.exception.DNSException, OSError) as exc:
        raise DNSTrouble(f"DNS lookup of {name} failed ({exc.__class__.__name__})") from None
    expires = float(getattr(answer, "expiration", 0.0))
    if answer.rrset is None:
        return [], expires
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset], expires


def parse_record(text: str) -> Policy | None:
    """A DMARC record's tags; None when it is not a usable DMARC record."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1":
        return None
    p = tags.get("p", "").lower()
    if p not in ("none", "quarantine", "reject"):
        if "rua" not in tags:
            return None
        p = "none"  # RFC 7489 6.6.3: a record with rua= but no valid p= is p=none
    sp = tags.get("sp", "").lower()
    try:
        pct = max(0, min(100, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return Policy(
        p=p,
        sp=sp if sp in ("none", "quarantine", "reject") else None,
        adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
        pct=pct,
    )


def find_policy(
    resolver: SyncResolver, domain: str, psl: PublicSuffixList | None = None,
    *, cached_only: bool = False,
) -> Policy | None:
    """The policy that applies to mail From `domain`: its own record, else its
    organisational domain's; None when there is none; DNSTrouble on DNS trouble.

    `cached_only`: from the resolver's cache alone (for the event loop), NotCached
    when a lookup would have to go out.  The answer is kept (`SyncResolver.memo_get`)
    until the first DNS answer it was made of expires."""
    key = ("dmarc", domain, psl)
    memo = getattr(resolver, "memo_get", None)
    if memo is not None:
        hit = memo(key)
        if hit is not None:
            return hit[0]  # type: ignore[no-any-return]
    policy, expires = _find_policy(resolver, domain, psl, cached_only)
    if memo is not None and expires:
        resolver.memo_put(key, (policy,), expires)
    return policy


def _find_policy(
    resolver: SyncResolver, domain: str, psl: PublicSuffixList | None, cached_only: bool,
) -> tuple[Policy | None, float]:
    """find_policy's answer and when the first answer it used expires (0: do not keep)."""
    expires = float("inf")
    for where, org in ((domain, False), (org_domain(domain, psl), True)):
        if org and where == domain:
            break
        texts, until = _txt_until(resolver, f"_dmarc.{where}", cached_only)
        expires = min(expires, until)
        records = [r for r in texts if r.lower().startswith("v=dmarc1")]
        if len(records) == 1:
            policy = parse_record(records[0])
            if policy is not None:
                return Policy(policy.p, policy.sp, policy.adkim, policy.aspf, policy.pct,
                              org), expires
        if records:
            return None, expires  # several or broken records: no policy (RFC 7489 6.6.3)
    return None, expires
