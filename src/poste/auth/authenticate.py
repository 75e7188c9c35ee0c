"""SPF, DKIM and DMARC for one message, and the header fields that report them.

SPF and DKIM run at the same time in the auth thread pool; DMARC follows,
since it needs both.  Nothing here raises on bad input or bad DNS: every
failure becomes a result word (`permerror`, `temperror`), because the
verifier labels mail and must never lose it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from poste.auth import dkim_verify, dmarc, spf, workers
from poste.auth.results import authentication_results
from poste.dns.resolver import SyncResolver

log = logging.getLogger("poste.verifier")


@dataclass
class Report:
    spf: spf.SPFResult | None
    dkim: list[dkim_verify.DKIMResult] = field(default_factory=list)
    dmarc: dmarc.DMARCResult | None = None

    def summary(self) -> str:
        dk = ",".join(r.result for r in self.dkim) or "none"
        return (
            f"spf={self.spf.result if self.spf else 'none'} dkim={dk} "
            f"dmarc={self.dmarc.result if self.dmarc else 'none'}"
        )


class Authenticator:
    """Holds the resolver and our name; `check` is called once per message."""

    def __init__(self, resolver: SyncResolver, hostname: str) -> None:
        self.resolver = resolver
        self.hostname = hostname

    async def check(self, ip: str, sender: str, helo: str, message: bytes) -> Report:
        spf_task = self._spf(ip, sender, helo)
        dkim_task = self._dkim(message)
        spf_result, dkim_results = await asyncio.gather(spf_task, dkim_task)
        try:
            dmarc_result = await workers.run(
                lambda: dmarc.evaluate_sync(message, spf_result, dkim_results, self.resolver)
            )
        except Exception as exc:  # a label must never cost the mail
            log.exception("dmarc evaluation failed")
            dmarc_result = dmarc.DMARCResult("permerror", reason=exc.__class__.__name__)
        return Report(spf_result, dkim_results, dmarc_result)

    async def _spf(self, ip: str, sender: str, helo: str) -> spf.SPFResult | None:
        if not ip:
            return None
        try:
            return await spf.check(ip, sender, helo or ip, self.resolver, receiver=self.hostname)
        except Exception as exc:
            log.exception("spf evaluation failed")
            identity = "mailfrom" if sender else "helo"
            domain = sender.rpartition("@")[2] if sender else helo
            return spf.SPFResult(
                "temperror", identity, domain, ip, sender, helo, problem=exc.__class__.__name__
            )

    async def _dkim(self, message: bytes) -> list[dkim_verify.DKIMResult]:
        try:
            return await dkim_verify.verify(message, self.resolver)
        except Exception as exc:
            log.exception("dkim verification failed")
            return [dkim_verify.DKIMResult("permerror", reason=exc.__class__.__name__)]

    def fields(self, report: Report, disposition: str = "none") -> bytes:
        """`Received-SPF:` then `Authentication-Results:`, each ending in CRLF."""
        lines = []
        if report.spf is not None:
            lines.append(report.spf.field(self.hostname))
        lines.append(
            authentication_results(
                self.hostname, report.spf, report.dkim, report.dmarc, disposition=disposition
            )
        )
        return "".join(line + "\r\n" for line in lines).encode("ascii", "replace")
