"""DMARC (RFC 7489): identifier alignment and the From domain's published policy.

The organisational domain comes from publicsuffixlist (loaded once per
process; authheaders re-reads its list on every call), or from a fresher
`public_suffix_list.dat` given with `--psl` (`load_psl`).  Policy records are
looked up at `_dmarc.<From domain>`, then at `_dmarc.<organisational
domain>` (RFC 7489 6.6.3).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from poste.dkim.verify import DKIMResult
from poste.dns.dmarc import (  # noqa: F401  (re-exported: the verifier's DMARC names)
    DNSTrouble,
    Policy,
    aligned,
    find_policy,
    org_domain,
    parse_record,
)
from poste.dns.resolver import SyncResolver
from poste.services.verifier.spf import SPFResult
from poste.smtp.from_field import from_domain


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
        policy = find_policy(resolver, domain, psl)
    except DNSTrouble as exc:
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
