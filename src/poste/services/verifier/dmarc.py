"""DMARC (RFC 7489): identifier alignment and the From domain's published policy.

The organisational domain comes from publicsuffixlist (loaded once per
process; authheaders re-reads its list on every call), or from a fresher
`public_suffix_list.dat` given with `--psl` (`load_psl`).  Policy records are
looked up at `_dmarc.<From domain>`, then at `_dmarc.<organisational
domain>` (RFC 7489 6.6.3).
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import os
import random
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from publicsuffixlist import PublicSuffixList

from poste.dkim.verify import DKIMResult
from poste.dns.orgdomain import aligned, org_domain
from poste.dns.resolver import SyncResolver
from poste.services.verifier.spf import SPFResult
from poste.smtp.address import domain_key


class PSLError(ValueError):
    """The file given as the public suffix list cannot be used (one-line reason)."""


def load_psl(path: str | os.PathLike[str]) -> PublicSuffixList:
    """A public suffix list read from a `public_suffix_list.dat` file.

    The file must look like the real list (its ICANN section marker and at
    least one rule): an empty or wrong file would otherwise make every
    domain its own organisation without a word, and DMARC alignment with it.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise PSLError(f"cannot read {os.fspath(path)!r}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PSLError(f"{os.fspath(path)!r} is not UTF-8 text") from None
    rules = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("//")]
    if "===BEGIN ICANN DOMAINS===" not in text or not rules:
        raise PSLError(f"{os.fspath(path)!r} does not look like public_suffix_list.dat")
    return PublicSuffixList(text)


@dataclass(frozen=True)
class Policy:
    p: str = "none"
    sp: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    org_record: bool = False  # found at the organisational domain, not the From domain


@dataclass(frozen=True)
class DMARCResult:
    result: str  # pass, fail, none, temperror, permerror
    from_domain: str = ""
    policy: Policy | None = None
    reason: str = ""

    @property
    def applied_policy(self) -> str:
        """What the domain asks for this message: none, quarantine or reject."""
        if self.policy is None:
            return "none"
        pol = self.policy
        if pol.org_record and pol.sp:
            return pol.sp
        return pol.p

    def wants_reject(self) -> bool:
        """p=reject (or sp=) applies to this failed message, pct sampling included."""
        if self.result != "fail" or self.applied_policy != "reject" or self.policy is None:
            return False
        return self.policy.pct >= 100 or random.randrange(100) < self.policy.pct


class _Trouble(Exception):
    pass


def from_domain(message: bytes) -> tuple[str | None, str]:
    """The RFC5322.From domain, or None and why (no From, several, unparseable)."""
    try:
        msg = email.message_from_bytes(message, policy=email.policy.compat32)
        fields = msg.get_all("From") or []
    except Exception as exc:  # the transport path never trusts the parser
        return None, f"message not parseable ({exc.__class__.__name__})"
    if len(fields) != 1:
        return None, "no From field" if not fields else "several From fields"
    try:
        addresses = email.utils.getaddresses([str(fields[0])])
    except Exception:
        return None, "From not parseable"
    addresses = [a for a in addresses if a[1]]
    if len(addresses) != 1:
        return None, "From has no single address"
    _, at, domain = addresses[0][1].rpartition("@")
    if not at:
        return None, "From has no domain"
    domain = domain_key(domain)
    if not domain or not _is_domain(domain):
        return None, "From has no domain"
    return domain, ""


def _is_domain(text: str) -> bool:
    try:
        dns.name.from_text(text)
    except (dns.exception.DNSException, UnicodeError):
        return False
    return all(c.isalnum() or c in "-._" for c in text)


def _txt(resolver: SyncResolver, name: str) -> list[str]:
    try:
        answer = resolver.resolve(  # type: ignore[no-untyped-call]
            name, dns.rdatatype.TXT, raise_on_no_answer=False, search=False
        )
    except dns.resolver.NXDOMAIN:
        return []
    except (dns.exception.DNSException, OSError) as exc:
        raise _Trouble(f"DNS lookup of {name} failed ({exc.__class__.__name__})") from None
    if answer.rrset is None:
        return []
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset]


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


def _policy(
    resolver: SyncResolver, domain: str, psl: PublicSuffixList | None = None
) -> Policy | None:
    for where, org in ((domain, False), (org_domain(domain, psl), True)):
        if org and where == domain:
            break
        records = [r for r in _txt(resolver, f"_dmarc.{where}") if r.lower().startswith("v=dmarc1")]
        if len(records) == 1:
            policy = parse_record(records[0])
            if policy is not None:
                return Policy(policy.p, policy.sp, policy.adkim, policy.aspf, policy.pct, org)
        if records:
            return None  # several or broken records: no policy (RFC 7489 6.6.3)
    return None


def evaluate_sync(
    header: bytes,
    spf: SPFResult | None,
    dkim: list[DKIMResult],
    resolver: SyncResolver,
    *,
    psl: PublicSuffixList | None = None,
) -> DMARCResult:
    """DMARC for one message (blocking: runs in the auth thread pool).

    `spf` is the MAIL FROM identity's result (RFC 7489 4.1), `psl` the list
    for organisational domains (the packaged one when None).
    """
    domain, why = from_domain(header)
    if domain is None:
        return DMARCResult("permerror", reason=why)
    try:
        policy = _policy(resolver, domain, psl)
    except _Trouble as exc:
        return DMARCResult("temperror", domain, reason=str(exc))
    if policy is None:
        return DMARCResult("none", domain)
    spf_ok = (
        spf is not None and spf.result == "pass" and aligned(spf.domain, domain, policy.aspf, psl)
    )
    dkim_ok = any(
        r.result == "pass" and aligned(r.domain, domain, policy.adkim, psl) for r in dkim
    )
    return DMARCResult("pass" if spf_ok or dkim_ok else "fail", domain, policy)
