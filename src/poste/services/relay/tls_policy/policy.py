"""What TLS a session to one MX host needs, and the STARTTLS that applies it.

Per destination domain the MTA-STS policy is looked up once (`domain()`);
per MX host, DANE first (RFC 8461 2: a host with usable TLSA records is
DANE's), else the MTA-STS mode, else opportunistic TLS as before (`host()`).
`starttls()` then runs the handshake the plan asks for and records the
outcome for TLS-RPT.  A plan that requires TLS never falls back to clear
text: it raises `TLSRefused` (a 4.7.5 deferral for this host; the next MX
may do better, and the spool retries).
"""

from __future__ import annotations

import _ssl
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import dns.asyncresolver

from poste.services.relay.tls_policy.dane import DANE, TLSA, match
from poste.services.relay.tls_policy.mta_sts import MTASTS, Lookup
from poste.services.relay.tls_policy.tlsrpt import SUCCESS, Outcome, Recorder

log = logging.getLogger("poste.relay.tls_policy")

OPPORTUNISTIC, STS_TESTING, STS_ENFORCE, DANE_AUTH, DANE_TLS = (
    "opportunistic", "sts-testing", "sts-enforce", "dane", "dane-tls")


class TLSRefused(Exception):
    """The host cannot be used under the policy: the text is the 4.7.5 reply."""


class TLSUnavailable(Exception):
    """Opportunistic TLS did not work: the caller may try again (`verified`: the
    handshake worked, only the certificate was refused, so TLS without checks may)."""

    def __init__(self, verified: bool = False) -> None:
        super().__init__()
        self.verified = verified


@dataclass(frozen=True)
class DomainPlan:
    domain: str
    sts: Lookup
    mx_secure: bool = False


@dataclass(frozen=True)
class HostPlan:
    domain: str
    kind: str
    tlsa: tuple[TLSA, ...] = ()
    policy_type: str = "no-policy-found"
    policy: tuple[str, ...] = ()
    refused: str | None = None  # do not even connect: why
    failure: str = ""  # the TLS-RPT result type of `refused`

    @property
    def required(self) -> bool:
        return self.kind in (STS_ENFORCE, DANE_AUTH, DANE_TLS)


def _result_type(exc: ssl.SSLCertVerificationError) -> str:
    code = getattr(exc, "verify_code", 0)
    if code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
        return "certificate-host-mismatch"
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return "certificate-expired"
    if code in (18, 19, 20, 21, 2):  # self-signed, unknown issuer...
        return "certificate-not-trusted"
    return "validation-failure"


def verifying_context(ca_file: str | None) -> ssl.SSLContext:
    """WebPKI checks (MTA-STS hosts and policy servers) against `ca_file` or the system's CAs."""
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _unchecked_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _chain(client: aiosmtplib.SMTP) -> list[bytes]:
    """The certificates the server sent, leaf first.

    Python 3.13 has SSLObject.get_unverified_chain(); before, the C object has
    it under the same name (3.10+).  Without it, only the leaf (DANE-EE works).
    """
    transport = client.transport
    obj = transport.get_extra_info("ssl_object") if transport else None
    if obj is None:
        return []
    inner = getattr(obj, "_sslobj", obj)
    getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        return [c.public_bytes(_ssl.ENCODING_DER) for c in getter() or []]
    leaf = obj.getpeercert(binary_form=True)
    return [leaf] if leaf else []


class TransportPolicy:
    """MTA-STS, DANE and TLS-RPT for the relay's deliveries."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        state: Path,
        *,
        ca_file: str | None = None,
        mta_sts_port: int = 443,
        mta_sts: bool = True,
        dane: bool = True,
    ) -> None:
        self.verify_ctx = verifying_context(ca_file)
        self.unchecked_ctx = _unchecked_context()
        self.sts = MTASTS(resolver, state / "mta-sts", self.verify_ctx, port=mta_sts_port) \
            if mta_sts else None
        self.dane = DANE(resolver) if dane else None
        self.recorder = Recorder(state / "tlsrpt")

    async def domain(self, domain: str) -> DomainPlan:
        sts = await self.sts.lookup(domain) if self.sts else Lookup(None)
        secure = await self.dane.mx_secure(domain) if self.dane else False
        plan = DomainPlan(domain, sts, secure)
        if sts.failure:  # the policy could not be had: a session-less failure to report
            self.recorder.record(Outcome(domain, "sts", (), "", "", sts.failure, sts.reason))
        return plan

    async def host(self, plan: DomainPlan, host: str) -> HostPlan:
        if self.dane and plan.mx_secure:
            found = await self.dane.lookup(host)
            if found.failure:
                self.recorder.record(Outcome(plan.domain, "tlsa", (), host, "", found.failure,
                                             found.reason))
                return HostPlan(plan.domain, DANE_AUTH, policy_type="tlsa",
                                refused=f"4.7.5 {found.reason}: DANE status unknown, will retry",
                                failure=found.failure)
            if found.records is not None:
                kind = DANE_AUTH if found.records else DANE_TLS
                return HostPlan(plan.domain, kind, found.records, "tlsa",
                                tuple(r.text() for r in found.records))
        policy = plan.sts.policy
        if policy is None or policy.mode == "none":
            return HostPlan(plan.domain, OPPORTUNISTIC)
        strings = tuple(policy.strings())
        kind = STS_ENFORCE if policy.mode == "enforce" else STS_TESTING
        if not policy.matches(host):
            reason = f"MX host {host} is not in the MTA-STS policy of {plan.domain}"
            self.recorder.record(Outcome(plan.domain, "sts", strings, host, "",
                                         "validation-failure", reason))
            if kind == STS_ENFORCE:
                return HostPlan(plan.domain, kind, policy_type="sts", policy=strings,
                                refused=f"4.7.5 {reason} (mode enforce), will retry")
            log.info("%s (mode testing): delivering anyway", reason)
        return HostPlan(plan.domain, kind, policy_type="sts", policy=strings)

    def _record(self, client: aiosmtplib.SMTP, plan: HostPlan, host: str, ip: str, result: str,
                reason: str = "") -> None:
        sock = client.transport.get_extra_info("sockname") if client.transport else None
        self.recorder.record(Outcome(plan.domain, plan.policy_type, plan.policy, host, ip,
                                     result, reason, str(sock[0]) if sock else ""))

    async def starttls(
        self, client: aiosmtplib.SMTP, plan: HostPlan, host: str, ip: str, *, unchecked: bool
    ) -> bool:
        """STARTTLS as `plan` wants it; whether TLS is on.

        `unchecked`: the retry of a testing-mode host whose certificate was
        refused (already recorded): encrypt without checking.
        """
        if not client.supports_extension("starttls"):
            self._record(client, plan, host, ip, "starttls-not-supported")
            if plan.required:
                raise TLSRefused(f"4.7.5 {host} does not offer STARTTLS, which the "
                                 f"{_what(plan)} of {plan.domain} requires, will retry")
            return False
        verify = plan.kind in (STS_ENFORCE, STS_TESTING) and not unchecked
        ctx = self.verify_ctx if verify else self.unchecked_ctx
        try:
            await client.starttls(tls_context=ctx, server_hostname=host.rstrip("."))
        except ssl.SSLCertVerificationError as exc:
            kind = _result_type(exc)
            self._record(client, plan, host, ip, kind, exc.verify_message or str(exc))
            if plan.required:
                raise TLSRefused(f"4.7.5 certificate of {host} refused under the MTA-STS policy "
                                 f"of {plan.domain}: {(exc.verify_message or str(exc)).rstrip('.')}, will retry"
                                 ) from None
            raise TLSUnavailable(verified=True) from None
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
            self._record(client, plan, host, ip, "validation-failure", f"TLS handshake failed: {exc}")
            if plan.required:
                raise TLSRefused(f"4.7.5 TLS handshake with {host} failed, which the "
                                 f"{_what(plan)} of {plan.domain} requires, will retry") from None
            raise TLSUnavailable() from None
        if plan.kind == DANE_AUTH:
            why = match(plan.tlsa, _chain(client), host)
            if why is not None:
                self._record(client, plan, host, ip, "validation-failure", why)
                raise TLSRefused(f"4.7.5 DANE: {why} ({host}), will retry")
        if not unchecked:
            self._record(client, plan, host, ip, SUCCESS)
        return True


def _what(plan: HostPlan) -> str:
    return "DANE TLSA record" if plan.kind in (DANE_AUTH, DANE_TLS) else "MTA-STS policy"
