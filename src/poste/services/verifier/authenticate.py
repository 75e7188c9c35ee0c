"""SPF, DKIM, ARC and DMARC for one message, and the header fields that report them.

SPF (MAIL FROM and HELO identities), DKIM, the ARC chain and DMARC (which needs
SPF and DKIM) run one after the other in one trip to the auth thread pool.  Nothing here raises on bad input or bad DNS: every
failure becomes a result word (`permerror`, `temperror`), because the
verifier labels mail and must never lose it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from publicsuffixlist import PublicSuffixList

from poste.dkim import arc as dkim_arc
from poste.dkim import verify as dkim_verify
from poste.dns.resolver import SyncResolver
from poste.services.verifier import dmarc, rdns, spf, workers
from poste.services.verifier.results import authentication_results
from poste.services.verifier.spf import SPFResult
from poste.smtp.message import Message

log = logging.getLogger("poste.verifier")


# A mail up to this size is checked on the event loop when its DNS answers are cached.
# DKIM hashes the whole mail: at 32 KB, ~0.2 ms of the loop (the spam judge's bound too).
INLINE_BYTES = 32 * 1024


@dataclass
class Report:
    spf: spf.SPFResult | None  # the MAIL FROM identity (HELO's for the null sender): DMARC's
    dkim: list[dkim_verify.DKIMResult] = field(default_factory=list)
    dmarc: dmarc.DMARCResult | None = None
    helo_spf: SPFResult | None = None  # the HELO identity, when checked on its own
    arc: dkim_arc.ARCResult | None = None  # the ARC chain as it arrived

    @property
    def decisive_spf(self) -> SPFResult | None:
        """The SPF result that decides: HELO's `fail`, else MAIL FROM's (RFC 7208 2.3)."""
        if self.helo_spf is not None and self.helo_spf.result == "fail":
            return self.helo_spf
        return self.spf

    def summary(self) -> str:
        dk = ",".join(r.result for r in self.dkim) or "none"
        helo = f" spf-helo={self.helo_spf.result}" if self.helo_spf else ""
        return (
            f"spf={self.spf.result if self.spf else 'none'}{helo} dkim={dk} "
            f"arc={self.arc.result if self.arc else 'none'} "
            f"dmarc={self.dmarc.result if self.dmarc else 'none'}"
        )


@contextlib.asynccontextmanager
async def _no_body() -> AsyncIterator[bytes]:
    yield b""


class Authenticator:
    """Holds the resolver, our name and the PSL; `check` is called once per message."""

    def __init__(
        self,
        resolver: SyncResolver,
        hostname: str,
        *,
        psl: PublicSuffixList | None = None,
        rdns_timeout: float = rdns.TIMEOUT,
    ) -> None:
        self.resolver = resolver
        self.hostname = hostname
        self.psl = psl
        self.rdns_timeout = rdns_timeout
        self._async_resolver = rdns.async_twin(resolver)
        self.checked_inline = 0  # mails checked on the loop, every answer cached (`check`)

    async def check(self, ip: str, sender: str, helo: str, message: Message) -> Report:
        """All of SPF (both identities), DKIM, ARC and DMARC in one trip to the auth pool.

        One hand-off per mail, not five (issue 16: the trips to and from the pool were
        11% of `poste up`'s CPU at 5 KB and each added a loop turn to the mail's
        latency).  The checks run one after the other on that thread; with DNS answers
        cached by TTL (the resolver's cache) they are CPU work, and a mail whose lookups
        wait on a slow DNS server holds only its own thread, never another session.
        """
        header = message.header()
        signed, sealed = dkim_verify.has_signature(header), dkim_arc.has_arc(header)
        # Only a signed or sealed mail is read whole, once for both, a big one under the
        # memory budget.
        async with message.whole() if signed or sealed else _no_body() as data:
            def run() -> Report:
                return self.check_sync(ip, sender, helo, header, data if signed else None,
                                       data if sealed else None)

            if message.size <= INLINE_BYTES:
                # On the loop when every DNS answer it needs is cached (the same senders'
                # domains, most mail): a small mail's checks cost less than the trip to
                # the pool and back (issue 16); one lookup not cached and the result is
                # thrown away, the checks run in the pool as before.
                with self.resolver.cached_only() as misses:
                    report = run()
                if not misses:
                    self.checked_inline += 1
                    return report
            return await workers.run(run)

    def check_sync(
        self, ip: str, sender: str, helo: str, header: bytes,
        signed: bytes | None, sealed: bytes | None,
    ) -> Report:
        """`check` on this thread (blocking: DNS and hashing); `signed`/`sealed` is the
        whole mail when it has a DKIM signature / an ARC set, else None."""
        spf_result = self._spf(ip, sender, helo)
        helo_result = self._helo_spf(ip, sender, helo)
        dkim_results = self._dkim(signed) if signed is not None else []
        arc_result = self._arc(sealed) if sealed is not None else dkim_arc.ARCResult("none")
        try:
            dmarc_result = dmarc.evaluate_sync(
                header, spf_result, dkim_results, self.resolver, psl=self.psl
            )
        except Exception as exc:  # a label must never cost the mail
            log.exception("dmarc evaluation failed")
            dmarc_result = dmarc.DMARCResult("permerror", reason=exc.__class__.__name__)
        return Report(spf_result, dkim_results, dmarc_result, helo_result, arc_result)

    async def peer_name(self, ip: str) -> str | None:
        """The forward-confirmed rDNS name of `ip`, or None (no name, DNS trouble, timeout)."""
        if not ip:
            return None
        return await rdns.confirmed_name(
            self._async_resolver,
            ip,
            tcp=bool(getattr(self.resolver, "use_tcp", False)),
            timeout=min(self.rdns_timeout, self.resolver.lifetime),
        )

    def _spf(self, ip: str, sender: str, helo: str) -> spf.SPFResult | None:
        if not ip:
            return None
        if not sender and not spf.helo_checkable(helo):
            # postmaster@[192.0.2.1] has no domain to ask about (RFC 7208 4.3): none, no DNS
            return spf.SPFResult("none", "helo", helo, spf.normal_ip(ip), "", helo)
        return self._one_spf(ip, sender, helo, "mailfrom")

    def _helo_spf(self, ip: str, sender: str, helo: str) -> spf.SPFResult | None:
        """HELO on its own (RFC 7208 2.3), when it is a name and not already MAIL FROM's stand-in."""
        if not ip or not sender or not spf.helo_checkable(helo):
            return None
        return self._one_spf(ip, sender, helo, "helo")

    def _one_spf(self, ip: str, sender: str, helo: str, identity: str) -> spf.SPFResult:
        try:
            return spf.check_sync(
                ip, sender, helo, self.resolver, receiver=self.hostname, identity=identity
            )
        except Exception as exc:
            log.exception("spf evaluation failed")
            if identity == "helo" or not sender:
                identity, domain = "helo", helo
            else:
                domain = sender.rpartition("@")[2] or sender
            return spf.SPFResult(
                "temperror", identity, domain, ip, sender, helo, problem=exc.__class__.__name__
            )

    def _dkim(self, data: bytes) -> list[dkim_verify.DKIMResult]:
        try:
            return dkim_verify.verify(data, self.resolver)
        except Exception as exc:
            log.exception("dkim verification failed")
            return [dkim_verify.DKIMResult("permerror", reason=exc.__class__.__name__)]

    def _arc(self, data: bytes) -> dkim_arc.ARCResult:
        try:
            return dkim_arc.verify(data, self.resolver)
        except Exception as exc:
            log.exception("arc validation failed")
            return dkim_arc.ARCResult("fail", reason=exc.__class__.__name__)

    def fields(self, report: Report, disposition: str = "none", ip: str = "") -> bytes:
        """`Received-SPF:` then `Authentication-Results:`, each ending in CRLF."""
        lines = []
        decisive = report.decisive_spf
        if decisive is not None:
            lines.append(decisive.field(self.hostname))
        lines.append(
            authentication_results(
                self.hostname,
                report.spf,
                report.dkim,
                report.dmarc,
                disposition=disposition,
                helo_spf=report.helo_spf,
                arc=report.arc,
                remote_ip=ip,
            )
        )
        return "".join(line + "\r\n" for line in lines).encode("ascii", "replace")
