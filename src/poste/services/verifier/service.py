"""`poste verifier`: the public MX (ptt's verifier).

It labels, it does not judge: each accepted mail gets `Received-SPF:` and
one `Authentication-Results:` (spf for MAIL FROM and HELO, dkim, dmarc) and
goes on to `--destination`; the peer's forward-confirmed rDNS name, looked
up before the greeting, goes into the `Received:` field.  Not an open
relay: recipients outside `--domain` get 550 5.7.1 at RCPT; postmaster@
each domain is always accepted (RFC 5321 4.5.1), and the null sender too
(bounces must reach us).  With `--reject-failures`, SPF `fail` (MAIL FROM
or HELO) and DMARC failures under `p=reject` are refused with 550 at the
end of DATA instead of labelled.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import Any

from poste import metrics
from poste.dns.records import mta_sts_policy
from poste.dns.resolver import NameserverError
from poste.runtime.certs import server_tls, tls_parts
from poste.runtime.hostport import parse_hostport
from poste.runtime.run import Parts
from poste.runtime.settings import ConfigError, Values
from poste.runtime.tls import TLSFiles
from poste.services.verifier.authenticate import Authenticator, Report
from poste.services.verifier.dmarc import PSLError, load_psl
from poste.services.verifier.mta_sts import PolicyServer
from poste.services.verifier.spf import resolver_for
from poste.smtp.client import HOP_KEEP, SMTPHop
from poste.smtp.hop import Hop
from poste.smtp.message import Message
from poste.smtp.server import SMTPService
from poste.smtp.stage import Envelope, Reply, Stage, Verdict

log = logging.getLogger("poste.verifier")


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().rstrip(".").lower()


class VerifierStage(Stage):
    """Accepts mail for our domains only and labels it with SPF, DKIM and DMARC."""

    name = "verifier"

    def __init__(
        self,
        domains: list[str],
        authenticator: Authenticator,
        *,
        postmaster: str | None = None,
        reject_failures: bool = False,
    ) -> None:
        self.domains = {d.strip().rstrip(".").lower() for d in domains}
        self.auth = authenticator
        self.postmaster = (postmaster or "").lower()
        self.reject_failures = reject_failures

    async def on_connect(self, env: Envelope) -> Reply | None:
        """Name the peer for `Received:` (FCrDNS); no name is no reason to refuse."""
        if env.peer_name is None and env.peer_ip:
            env.peer_name = await self.auth.peer_name(env.peer_ip)
        return None

    async def on_rcpt(self, env: Envelope, rcpt: str) -> Reply | None:
        address = rcpt.strip().strip("<>")
        low = address.lower()
        if low == "postmaster" or (self.postmaster and low == self.postmaster):
            return None
        if "@" in address and _domain_of(address) in self.domains:
            return None
        log.info("%s refused rcpt <%s> from %s", env.queue_id, address, env.peer_ip)
        return Reply(550, "5.7.1 Relaying denied: we do not accept mail for that domain")

    async def on_data(self, env: Envelope, message: Message) -> Verdict:
        report = await self.auth.check(env.peer_ip, env.mail_from, env.helo, message)
        note = f"ip={env.peer_ip or '-'} {report.summary()}"  # in the core's line of this mail
        _count(report)
        if self.reject_failures:
            decisive = report.decisive_spf
            if decisive is not None and decisive.result == "fail":
                text = decisive.explanation or "SPF fail - not authorized"
                if decisive.identity == "helo" and decisive.sender:
                    text = f"HELO {decisive.helo}: {text}"
                log.info("%s refused: %s from=<%s>", env.queue_id, note, env.mail_from)
                return Verdict(reply=Reply(550, f"5.7.23 {_oneline(text)}"), note=note)
            if report.dmarc is not None and report.dmarc.wants_reject():
                domain = report.dmarc.from_domain
                log.info("%s refused: %s from=<%s>", env.queue_id, note, env.mail_from)
                return Verdict(reply=Reply(550, f"5.7.1 Rejected by the DMARC policy of {domain}"),
                               note=note)
        return Verdict(prepend=self.auth.fields(report, ip=env.peer_ip), note=note)


def _count(report: Report) -> None:
    """One result per method per mail in `poste_auth_results` (SPF: the MAIL FROM identity)."""
    counter = metrics.AUTH_RESULTS
    counter.labels("spf", report.spf.result if report.spf else "none").inc()
    for r in report.dkim or []:
        counter.labels("dkim", r.result).inc()
    if not report.dkim:
        counter.labels("dkim", "none").inc()
    counter.labels("arc", report.arc.result if report.arc else "none").inc()
    counter.labels("dmarc", report.dmarc.result if report.dmarc else "none").inc()


def build_stage(
    domains: Sequence[str],
    *,
    postmaster: str | None = None,
    nameservers: Sequence[str] = (),
    dns_timeout: float = 5.0,
    psl_file: str | None = None,
    hostname: str | None = None,
    reject_failures: bool = False,
) -> VerifierStage:
    """Check the settings and build the stage, for `poste verifier` and `poste up` alike.

    Bad input raises a ConfigError naming the setting.
    """
    for d in domains:
        if not d.strip() or "@" in d or " " in d:
            raise ConfigError("domain", f"{d!r} is not a domain name")
    if postmaster and "@" not in postmaster:
        raise ConfigError("postmaster", f"{postmaster!r} is not an address")
    if dns_timeout <= 0:
        raise ConfigError("dns-timeout", "must be positive")
    try:
        resolver = resolver_for(nameservers, dns_timeout)
    except NameserverError as exc:
        raise ConfigError("nameserver", str(exc)) from None
    try:
        psl = load_psl(psl_file) if psl_file else None
    except PSLError as exc:
        raise ConfigError("psl", str(exc)) from None
    name = hostname or socket.getfqdn()
    return VerifierStage(
        list(domains),
        Authenticator(resolver, name, psl=psl),
        postmaster=postmaster,
        reject_failures=reject_failures,
    )


def _oneline(text: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else " " for c in text)[:400]


def stage(values: Values) -> VerifierStage:
    """The stage of the settings (`poste up` chains it to the spamfilter in memory)."""
    return build_stage(
        values["domain"],
        postmaster=values["postmaster"],
        nameservers=values["nameserver"],
        dns_timeout=float(values["dns-timeout"]),
        psl_file=values["psl"],
        hostname=values["hostname"],
        reject_failures=bool(values["reject-failures"]),
    )


def with_mta_sts_names(values: Values) -> dict[str, Any]:
    """With MTA-STS on, the ACME certificate also names mta-sts.DOMAIN of each domain."""
    if values.get("mta-sts", "off") == "off" or not values.get("acme-directory"):
        return dict(values)
    names = list(values.get("acme-name") or [values.get("hostname") or socket.getfqdn()])
    names += [f"mta-sts.{d.rstrip('.').lower()}" for d in values.get("domain") or []]
    return {**values, "acme-name": list(dict.fromkeys(names))}


def tls_of(values: Values) -> TLSFiles | None:
    tls = server_tls(with_mta_sts_names(values))
    if values["require-tls"] and tls is None:
        raise ConfigError(None, "{0} needs {1} and {2} (or {3})",
                          names=("require-tls", "tls-cert", "tls-key", "acme-directory"))
    if values["mta-sts"] != "off" and tls is None:
        raise ConfigError(None, "{0} needs {1} and {2} (or {3})",
                          names=("mta-sts", "tls-cert", "tls-key", "acme-directory"))
    return tls


def mta_sts_server(values: Values, tls: TLSFiles | None, hostname: str) -> PolicyServer | None:
    """The HTTPS listener of our MTA-STS policy, when `mta-sts` is on."""
    if values["mta-sts"] == "off" or tls is None:
        return None
    host, port = parse_hostport(values["mta-sts-listen"], 443, "mta-sts-listen")
    policy = mta_sts_policy(values["mta-sts"], values["mta-sts-mx"] or [hostname],
                            int(float(values["mta-sts-max-age"])))
    return PolicyServer(host, port, tls.ctx, list(values["domain"]), policy)


def listener(values: Values, stage: VerifierStage, hop: Hop, tls: TLSFiles | None) -> Parts:
    """The MX's listener in front of `hop`; SIGHUP loads its certificate again, ACME renews it."""
    host, port = parse_hostport(values["listen"], 25, "listen")
    service = SMTPService(
        stage, hop, host=host, port=port, hostname=stage.auth.hostname,
        tls_context=tls.ctx if tls else None, require_tls=bool(values["require-tls"]),
    )
    parts = Parts([service])
    if tls:
        parts.add(tls_parts(tls))
    policy = mta_sts_server(values, tls, stage.auth.hostname)
    if policy is not None:  # after the certificate is obtained, before the listeners
        parts.add(Parts(before=[policy.start], after=[policy.stop]))
    return parts


def build(values: Values) -> Parts:
    """`poste verifier`: the stage, and the next hop over SMTP."""
    dest_host, dest_port = parse_hostport(values["destination"], 25, "destination")
    parse_hostport(values["listen"], 25, "listen")
    st = stage(values)
    tls = tls_of(values)
    # sessions to the next hop kept open between mails (smtp/client.py, issue 16)
    hop = SMTPHop(dest_host, dest_port, helo=st.auth.hostname, keep=HOP_KEEP)
    return listener(values, st, hop, tls)
