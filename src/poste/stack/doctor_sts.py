"""`poste doctor`'s MTA-STS and TLS-RPT checks (RFC 8461, RFC 8460) of our own domain.

Both are optional, so a domain without them is `skip`, never `missing`.
Published, the MTA-STS policy is fetched as a sender would (the relay's own
fetcher, the certificate verified for mta-sts.DOMAIN), and each of the
domain's MX hosts must match its mx: lines: a policy in `enforce` that
leaves out an MX makes senders refuse it.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import dns.asyncresolver
import dns.resolver

from poste.services.relay.tls_policy.https import HTTPSError
from poste.services.relay.tls_policy.mta_sts import MTASTS, PolicyError
from poste.services.relay.tls_policy.policy import verifying_context
from poste.services.relay.tls_policy.tlsrpt import parse_tlsrpt

OK, SKIP, WRONG = "ok", "skip", "wrong"  # as doctor.py's, which wraps these in its Check
Check = tuple[str, str, str]  # (status, name, text)


def _async_resolver(resolver: dns.resolver.Resolver) -> dns.asyncresolver.Resolver:
    out = dns.asyncresolver.Resolver(configure=False)
    out.nameservers = list(resolver.nameservers)
    out.lifetime, out.timeout = resolver.lifetime, resolver.timeout
    return out


def sts_checks(
    domain: str, resolver: dns.resolver.Resolver, mx_hosts: list[str], *,
    cafile: str | None = None, port: int = 443, timeout: float = 10.0,
) -> list[Check]:
    return asyncio.run(_checks(domain, _async_resolver(resolver), mx_hosts, cafile, port,
                               timeout))


async def _checks(domain: str, resolver: dns.asyncresolver.Resolver, mx_hosts: list[str],
                  cafile: str | None, port: int, timeout: float) -> list[Check]:
    out = [await _tlsrpt(domain, resolver)]
    try:
        ctx = verifying_context(cafile)
    except (OSError, ssl.SSLError) as exc:
        return [*out, (WRONG, "STS", f"CA file {cafile}: {exc}")]
    sts = MTASTS(resolver, Path("/nonexistent"), ctx, port=port, timeout=timeout)
    txt_id = await sts.txt_id(domain)
    if txt_id is None:
        return [*out, (SKIP, "STS", f"no v=STSv1 record at _mta-sts.{domain} (optional; "
                                         "`poste dns records --mta-sts testing`)")]
    url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
    try:
        policy = await sts.fetch(domain)
    except HTTPSError as exc:
        return [*out, (WRONG, "STS", f"{url}: {exc}")]
    except PolicyError as exc:
        return [*out, (WRONG, "STS", f"{url}: invalid policy: {exc}")]
    left_out = [h for h in mx_hosts if not policy.matches(h)]
    if left_out:
        return [*out, (WRONG, "STS", f"policy {txt_id} (mode {policy.mode}) leaves out MX "
                                          f"{', '.join(left_out)}: senders refuse it in enforce")]
    return [*out, (OK, "STS", f"policy {txt_id}: mode {policy.mode}, mx "
                                   f"{' '.join(policy.mx)}, max_age {policy.max_age}")]


async def _tlsrpt(domain: str, resolver: dns.asyncresolver.Resolver) -> Check:
    name = f"_smtp._tls.{domain}"
    try:
        answer = await resolver.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return (SKIP, "TLSRPT", f"no v=TLSRPTv1 record at {name} (optional)")
    found = [u for r in answer if (u := parse_tlsrpt([s.decode("ascii", "replace")
                                                      for s in r.strings]))]
    if len(found) != 1:
        return (WRONG, "TLSRPT", f"{len(found)} v=TLSRPTv1 records with rua= at {name}")
    bad = [u for u in found[0] if not u.startswith(("mailto:", "https:"))]
    if bad:
        return (WRONG, "TLSRPT", f"{name}: rua {', '.join(bad)} is neither mailto: nor "
                                      "https:")
    return (OK, "TLSRPT", f"{name}: reports to {', '.join(found[0])}")
