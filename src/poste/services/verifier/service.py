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

import click

from poste import metrics
from poste.dns.resolver import NameserverError
from poste.runtime.hostport import parse_hostport
from poste.runtime.service import (
    destination_option,
    hostname_option,
    listen_option,
    run_services,
    setup_logging,
    tls_cert_option,
    tls_context_from,
    tls_key_option,
    verbose_option,
)
from poste.services.verifier.authenticate import Authenticator, Report
from poste.services.verifier.dmarc import PSLError, load_psl
from poste.services.verifier.spf import resolver_for
from poste.smtp.client import SMTPHop
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

    async def on_data(self, env: Envelope, data: bytes) -> Verdict:
        report = await self.auth.check(env.peer_ip, env.mail_from, env.helo, data)
        log.info(
            "%s %s from=<%s> ip=%s", env.queue_id, report.summary(), env.mail_from, env.peer_ip
        )
        _count(report)
        if self.reject_failures:
            decisive = report.decisive_spf
            if decisive is not None and decisive.result == "fail":
                text = decisive.explanation or "SPF fail - not authorized"
                if decisive.identity == "helo" and decisive.sender:
                    text = f"HELO {decisive.helo}: {text}"
                return Verdict(reply=Reply(550, f"5.7.23 {_oneline(text)}"))
            if report.dmarc is not None and report.dmarc.wants_reject():
                domain = report.dmarc.from_domain
                return Verdict(reply=Reply(550, f"5.7.1 Rejected by the DMARC policy of {domain}"))
        return Verdict(prepend=self.auth.fields(report))


def _count(report: Report) -> None:
    """One result per method per mail in `poste_auth_results` (SPF: the MAIL FROM identity)."""
    counter = metrics.AUTH_RESULTS
    counter.labels("spf", report.spf.result if report.spf else "none").inc()
    for r in report.dkim or []:
        counter.labels("dkim", r.result).inc()
    if not report.dkim:
        counter.labels("dkim", "none").inc()
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

    Bad input raises click.BadParameter naming the flag (`poste up` names the
    config key instead).
    """
    for d in domains:
        if not d.strip() or "@" in d or " " in d:
            raise click.BadParameter(f"{d!r} is not a domain name", param_hint="--domain")
    if postmaster and "@" not in postmaster:
        raise click.BadParameter(f"{postmaster!r} is not an address", param_hint="--postmaster")
    if dns_timeout <= 0:
        raise click.BadParameter("must be positive", param_hint="--dns-timeout")
    try:
        resolver = resolver_for(nameservers, dns_timeout)
    except NameserverError as exc:
        raise click.BadParameter(str(exc), param_hint="--nameserver") from None
    try:
        psl = load_psl(psl_file) if psl_file else None
    except PSLError as exc:
        raise click.BadParameter(str(exc), param_hint="--psl") from None
    name = hostname or socket.getfqdn()
    return VerifierStage(
        list(domains),
        Authenticator(resolver, name, psl=psl),
        postmaster=postmaster,
        reject_failures=reject_failures,
    )


def _oneline(text: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else " " for c in text)[:400]


@click.command()
@click.option(
    "--domain",
    "domains",
    multiple=True,
    required=True,
    metavar="DOMAIN",
    help="A domain we receive mail for (repeatable).",
)
@destination_option
@click.option("--postmaster", metavar="ADDR", help="Our postmaster's address (always accepted).")
@listen_option
@tls_cert_option
@tls_key_option
@click.option(
    "--nameserver",
    "nameservers",
    multiple=True,
    metavar="[tcp:|udp:]IP[:PORT]",
    help="DNS server for SPF/DKIM/DMARC lookups (repeatable; default: the system's).",
)
@click.option("--dns-timeout", default=5.0, show_default=True, help="Seconds per DNS query.")
@click.option(
    "--psl",
    "psl_file",
    metavar="FILE",
    help="A public_suffix_list.dat fresher than the packaged one (DMARC organisational domains).",
)
@hostname_option
@click.option("--require-tls", is_flag=True, help="Refuse mail before STARTTLS (530).")
@click.option(
    "--reject-failures",
    is_flag=True,
    help="Refuse SPF fail and DMARC p=reject failures with 550 (default: label only).",
)
@verbose_option
def main(
    domains: tuple[str, ...],
    destination: str,
    postmaster: str | None,
    listen: str,
    tls_cert: str | None,
    tls_key: str | None,
    nameservers: tuple[str, ...],
    dns_timeout: float,
    psl_file: str | None,
    hostname: str | None,
    require_tls: bool,
    reject_failures: bool,
    verbose: int,
) -> None:
    """The public MX: label mail with SPF, DKIM and DMARC, pass it to --destination."""
    host, port = parse_hostport(listen, 25)
    dest_host, dest_port = parse_hostport(destination, 25)
    try:
        stage = build_stage(
            domains,
            postmaster=postmaster,
            nameservers=nameservers,
            dns_timeout=dns_timeout,
            psl_file=psl_file,
            hostname=hostname,
            reject_failures=reject_failures,
        )
    except click.BadParameter as exc:  # one line, as every poste command
        raise click.ClickException(f"{exc.param_hint}: {exc.message}") from None
    ctx = tls_context_from(tls_cert, tls_key)
    if require_tls and ctx is None:
        raise click.ClickException("--require-tls needs --tls-cert and --tls-key")
    setup_logging(verbose)
    name = stage.auth.hostname
    service = SMTPService(
        stage,
        SMTPHop(dest_host, dest_port, helo=name),
        host=host,
        port=port,
        hostname=name,
        tls_context=ctx,
        require_tls=require_tls,
    )
    run_services(service)
