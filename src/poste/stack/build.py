"""Assemble the five services in one process from a `StackConfig` (`poste up`).

The stages are the services' own; only the hops differ from separate
processes: verifier -> spamfilter -> relay and submission -> signer -> relay
are chained with `StageHop`, so each in-memory hop still adds its own
`Received:` and each RCPT/DATA reply is the next stage's, and the relay's
queue is the final hop.  Only the entry listeners open sockets.

Counting for /metrics happens here, around the services' objects (SPF/DKIM/
DMARC results, queued and delivered mail), so separate
services only lack these extra series until their owners count them too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from poste.metrics import AUTH_RESULTS, DELIVERIES, QUEUED, delivery_outcome
from poste.relay.delivery import Deliverer, Result
from poste.relay.router import Router, parse_networks
from poste.relay.scheduler import Policy, Scheduler
from poste.relay.spool import Entry, Spool, SpoolError
from poste.relay.srs import SRS, load_secrets
from poste.relay.stage import MAX_RECEIVED, QueueHop, RelayStage
from poste.smtp.chain import StageHop
from poste.smtp.hop import Hop
from poste.smtp.server import SMTPService
from poste.smtp.stage import Envelope, Stage
from poste.smtp.tls import TLSConfigError, server_context
from poste.stack.config import ConfigError, Section, StackConfig

log = logging.getLogger("poste.up")

DeliverFn = Callable[[str, str, Sequence[str], bytes], Awaitable[dict[str, Result]]]


def split_hostport(text: str, default_port: int, where: str) -> tuple[str, int]:
    from poste.services.common import parse_hostport

    try:
        return parse_hostport(text, default_port)
    except click.BadParameter as exc:
        raise ConfigError(f"{where}: {exc.message}") from None


@dataclass
class TLSFiles:
    """A server context and the files it came from, so SIGHUP can load new ones into it."""

    ctx: ssl.SSLContext
    cert: str
    key: str

    def reload(self) -> None:
        # New handshakes use the new chain; open connections keep theirs.
        self.ctx.load_cert_chain(self.cert, self.key)


@dataclass
class Stack:
    config: StackConfig
    services: list[SMTPService]
    scheduler: Scheduler
    watcher: Any  # poste.users.repo.UsersWatcher
    spool: Spool
    tls: list[TLSFiles] = field(default_factory=list)
    mailbox: Path | None = None
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    spam_stage: Stage | None = None

    def listeners(self) -> list[tuple[str, str, int, str]]:
        """(service, host, port, note) for each socket, after start()."""
        out = []
        for s in self.services:
            note = "implicit TLS" if s.implicit_tls else ("STARTTLS" if s.tls_context else "")
            if s.require_tls:
                note += " required"
            out.append((s.stage.name, s.sockname[0], s.sockname[1], note.strip()))
        return out

    async def start(self) -> None:
        for job in self.on_start:
            await job()
        await self.scheduler.start()
        started: list[SMTPService] = []
        try:
            for service in self.services:
                await service.start()
                started.append(service)
        except OSError as exc:
            for s in started:
                await s.stop()
            await self.scheduler.stop()
            raise click.ClickException(
                f"{service.stage.name}: cannot listen on {service.host}:{service.port}:"
                f" {exc.strerror or exc}"
            ) from None

    async def stop(self) -> None:
        for service in self.services:
            await service.stop()
        await self.scheduler.stop()

    async def reload(self) -> None:
        """SIGHUP: users, certificates, the spam database; config changes are reported."""
        changed = await self.watcher.areload()
        log.info("reload: users %s", "reloaded" if changed else "unchanged")
        fresh: StackConfig | None = None
        if self.config.path is not None:
            from poste.stack.config import load

            try:
                fresh = load(self.config.path)
            except ConfigError as exc:
                log.error("reload: config refused, keeping the running one: %s", exc)
        if fresh is not None:
            for name, section in fresh.sections.items():
                old = self.config.sections[name].values
                for key in sorted(set(section.values) | set(old)):
                    if key in ("tls-cert", "tls-key"):
                        continue
                    if section.values.get(key) != old.get(key):
                        log.warning("reload: [%s] %s changed: restart to apply it", name, key)
            for t in self.tls:  # cert/key paths may have moved
                for name in ("verifier", "submission"):
                    sec = self.config.sections[name]
                    if sec.get("tls-cert") == t.cert and sec.get("tls-key") == t.key:
                        t.cert = fresh.sections[name].get("tls-cert", t.cert)
                        t.key = fresh.sections[name].get("tls-key", t.key)
            self.config = fresh
        for t in self.tls:
            try:
                await asyncio.to_thread(t.reload)
                log.info("reload: certificate %s", t.cert)
            except (OSError, ssl.SSLError) as exc:
                log.error("reload: certificate %s refused, keeping the old one: %s", t.cert, exc)
        reload_db = getattr(self.spam_stage, "reload", None)
        if callable(reload_db):
            try:
                result = reload_db()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as exc:  # a bad database must not stop the stack
                log.error("reload: spam database refused: %s", exc)


# -- metering wrappers (metrics the services do not count themselves) --------


def _verifier_counts_itself() -> bool:
    """Whether VerifierStage.on_data feeds poste_auth_results (then we must not count too)."""
    import inspect

    from poste.services.verifier import VerifierStage

    try:
        return "_count(" in inspect.getsource(VerifierStage.on_data)
    except (OSError, TypeError):
        return False


def meter_authenticator(auth: Any) -> Any:
    """Count SPF/DKIM/DMARC results of the verifier's Authenticator.check.

    Only while the verifier does not count them itself (it means to: see its
    `_count`); then this wrapper steps aside so nothing is counted twice.
    """
    if getattr(auth, "_poste_metered", False) or _verifier_counts_itself():
        return auth
    check = auth.check

    async def metered(ip: str, sender: str, helo: str, message: bytes) -> Any:
        report = await check(ip, sender, helo, message)
        AUTH_RESULTS.labels("spf", report.spf.result if report.spf else "none").inc()
        for r in report.dkim or []:
            AUTH_RESULTS.labels("dkim", r.result).inc()
        if not report.dkim:
            AUTH_RESULTS.labels("dkim", "none").inc()
        AUTH_RESULTS.labels("dmarc", report.dmarc.result if report.dmarc else "none").inc()
        return report

    auth.check = metered
    auth._poste_metered = True
    return auth


def meter_deliver(deliver: DeliverFn) -> DeliverFn:
    async def metered(
        domain: str, sender: str, recipients: Sequence[str], message: bytes
    ) -> dict[str, Result]:
        results = await deliver(domain, sender, recipients, message)
        for r in results.values():
            DELIVERIES.labels(delivery_outcome(r.code)).inc()
        return results

    return metered


class MeteredScheduler(Scheduler):
    async def enqueue(self, entry: Entry, message: bytes) -> None:
        await super().enqueue(entry, message)
        QUEUED.inc()


class MailboxDeliverer:
    """Delivers every mail into a folder (`[relay] mailbox`): the demo's stand-in for the Internet."""

    def __init__(self, folder: Path) -> None:
        from poste.tools.srv import Mailbox

        self.folder = folder
        self.box = Mailbox(str(folder).rstrip("/") + "/", count=0, with_data=True)

    async def deliver(
        self, domain: str, sender: str, recipients: Sequence[str], message: bytes
    ) -> dict[str, Result]:
        env = Envelope(mail_from=sender, rcpt_tos=list(recipients))
        path = await asyncio.to_thread(self.box.store, env, message)
        return {r: Result(250, f"250 2.0.0 Ok: stored as {path}", "mailbox") for r in recipients}


# -- the builders ------------------------------------------------------------


def _hostname(section: Section) -> str:
    return str(section.get("hostname") or socket.getfqdn())


def _tls(section: Section, required: bool) -> TLSFiles | None:
    cert, key = section.get("tls-cert"), section.get("tls-key")
    if not cert and not key:
        if required:
            raise ConfigError(f"[{section.name}] needs tls-cert and tls-key (AUTH only under TLS)")
        return None
    if not cert or not key:
        raise ConfigError(f"[{section.name}] tls-cert and tls-key go together")
    try:
        return TLSFiles(server_context(cert, key), cert, key)
    except TLSConfigError as exc:
        raise ConfigError(f"[{section.name}] {exc}") from None


def _srs_secrets(section: Section, spool: Path) -> list[bytes]:
    try:
        found = load_secrets(section.get("srs-secret"), section.get("srs-secret-file"))
    except OSError as exc:
        raise ConfigError(f"[relay] cannot read srs-secret-file: {exc.strerror}") from None
    if found:
        return found
    path = spool / "srs-secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    return load_secrets(None, str(path))


def _spam_stage(section: Section) -> Stage:
    """The spamfilter service's own stage (it counts its labels itself)."""
    try:
        from poste.services.spamfilter import SpamfilterStage, load_classifier
    except ImportError:  # not built in this tree: a stand-in that labels the same way
        from poste.stack.spam_fallback import FallbackSpamStage

        try:
            return FallbackSpamStage(
                section.get("db"),
                header=str(section.get("header-name", "X-Spamtacus")),
                detail=bool(section.get("detail", False)),
                ham_cutoff=section.get("ham-cutoff"),
                spam_cutoff=section.get("spam-cutoff"),
            )
        except Exception as exc:
            raise ConfigError(f"[spamfilter] cannot load the spam database: {exc}") from None
    from poste.spam.model import Params

    header = str(section.get("header-name", "X-Spamtacus"))
    if not header or not all(33 <= ord(c) <= 126 and c != ":" for c in header):
        raise ConfigError(f"[spamfilter] header-name: not a header field name: {header!r}")
    try:
        classifier = load_classifier(
            section.get("db"),
            float(section.get("ham-cutoff", Params.ham_cutoff)),
            float(section.get("spam-cutoff", Params.spam_cutoff)),
        )
    except click.ClickException as exc:
        raise ConfigError(f"[spamfilter] {exc.format_message()}") from None
    return SpamfilterStage(classifier, header, bool(section.get("detail", False)),
                           section.get("db"))


def build(cfg: StackConfig) -> Stack:
    """Every stage, hop and listener of the config; raises ConfigError (one line)."""
    from poste.dns.resolver import NameserverError, make_resolver
    from poste.users.repo import UsersRepoError, UsersWatcher

    relay = cfg["relay"]
    if not relay.enabled:
        raise ConfigError("[relay] cannot be disabled in `poste up`: it is where mail rests")
    domains = [d.lower().rstrip(".") for d in relay.need("domain")]
    postmaster = str(relay.get("postmaster") or f"postmaster@{domains[0]}")
    if "@" not in postmaster:
        raise ConfigError(f"[relay] postmaster {postmaster!r} is not an address")
    users_path = relay.need("users")
    spool_dir = relay.need("spool")
    try:
        spool = Spool(spool_dir)
    except (OSError, SpoolError) as exc:
        raise ConfigError(f"[relay] spool {spool_dir}: {exc}") from None
    sub = cfg["submission"]
    sub_domains = [d.lower().rstrip(".") for d in (sub.get("domain") or domains)]
    extra = tuple(d for d in dict.fromkeys(domains[1:] + sub_domains) if d != domains[0])
    try:
        watcher = UsersWatcher(
            users_path, domains[0], poll_interval=float(relay.get("users-poll", 2.0)),
            extra_domains=extra,
        )
    except UsersRepoError as exc:
        raise ConfigError(f"[relay] users repository: {exc}") from None
    if sub.enabled and sub.get("users") and Path(sub.get("users")) != Path(users_path):
        raise ConfigError("[submission] users must be the relay's repository in `poste up`")

    try:
        nets = parse_networks(relay.get("granted") or ["127.0.0.0/8", "::1/128"])
    except ValueError as exc:
        raise ConfigError(f"[relay] granted: {exc}") from None
    try:
        resolver = make_resolver(relay.get("nameserver") or [])
    except NameserverError as exc:
        raise ConfigError(f"[relay] nameserver: {exc}") from None
    srs = SRS(domains[0], _srs_secrets(relay, spool.path))
    router = Router(domains, postmaster, srs, lambda: watcher.db, nets)
    relay_name = _hostname(relay)
    mailbox = relay.get("mailbox")
    deliver: DeliverFn
    if mailbox:
        deliver = MailboxDeliverer(Path(mailbox)).deliver
    else:
        deliverer = Deliverer(
            resolver, helo=relay_name, port=int(relay.get("smtp-port", 25)),
            ipv6=not relay.get("no-ipv6", False),
        )
        deliver = deliverer.deliver
    retry_min = float(relay.get("retry-min", 300.0))
    policy = Policy(
        retry_min=retry_min,
        retry_max=max(float(relay.get("retry-max", 4 * 3600.0)), retry_min),
        lifetime=float(relay.get("lifetime", 5 * 86400.0)),
        warn_after=float(relay.get("warn-after", 4 * 3600.0)),
        max_per_domain=int(relay.get("domain-concurrency", 10)),
        rescan=float(relay.get("queue-rescan", 30.0)),
    )
    scheduler = MeteredScheduler(
        spool, meter_deliver(deliver), hostname=relay_name, domain=domains[0], policy=policy,
        expand=router.dsn_targets,
    )
    relay_stage = RelayStage(router, int(relay.get("max-received", MAX_RECEIVED)))
    queue_hop = QueueHop(router, scheduler)
    stack = Stack(cfg, [], scheduler, watcher, spool, mailbox=Path(mailbox) if mailbox else None)

    # -- receiving: verifier -> spamfilter -> relay
    verifier, spam = cfg["verifier"], cfg["spamfilter"]
    if verifier.enabled:
        from poste.auth.authenticate import Authenticator
        from poste.auth.spf import resolver_for
        from poste.services.verifier import VerifierStage

        v_name = _hostname(verifier)
        into_relay: Hop = StageHop(relay_stage, queue_hop, relay_name, v_name)
        if spam.enabled:
            spam_stage = _spam_stage(spam)
            stack.spam_stage = spam_stage
            spam_name = _hostname(spam)
            into_relay = StageHop(relay_stage, queue_hop, relay_name, spam_name)
            first: Hop = StageHop(spam_stage, into_relay, spam_name, v_name)
        else:
            first = into_relay
        try:
            v_resolver = resolver_for(
                verifier.get("nameserver") or [], float(verifier.get("dns-timeout", 5.0))
            )
        except NameserverError as exc:
            raise ConfigError(f"[verifier] nameserver: {exc}") from None
        v_domains = verifier.get("domain") or domains
        v_stage = VerifierStage(
            list(v_domains),
            meter_authenticator(Authenticator(v_resolver, v_name)),
            postmaster=verifier.get("postmaster") or postmaster,
            reject_failures=bool(verifier.get("reject-failures", False)),
        )
        v_tls = _tls(verifier, required=False)
        if verifier.get("require-tls") and v_tls is None:
            raise ConfigError("[verifier] require-tls needs tls-cert and tls-key")
        host, port = split_hostport(
            str(verifier.get("listen", "0.0.0.0:25")), 25, "[verifier] listen"
        )
        stack.services.append(
            SMTPService(
                v_stage, first, host=host, port=port, hostname=v_name,
                tls_context=v_tls.ctx if v_tls else None,
                require_tls=bool(verifier.get("require-tls", False)),
            )
        )
        if v_tls:
            stack.tls.append(v_tls)

    # -- sending: submission -> signer -> relay
    signer = cfg["signer"]
    if sub.enabled:
        from poste.services.submission import SubmissionStage
        from poste.users.logins import Authenticator as LoginAuthenticator
        from poste.users.logins import LoginThrottle

        s_name = _hostname(sub)
        out_hop: Hop = StageHop(relay_stage, queue_hop, relay_name, s_name)
        if signer.enabled:
            from poste.services.signer import SignerStage

            g_name = _hostname(signer)
            signer_obj = _signer(signer, domains[0])
            out_hop = StageHop(
                SignerStage(signer_obj),
                StageHop(relay_stage, queue_hop, relay_name, g_name),
                g_name,
                s_name,
            )
            if signer.get("dns-server") or signer.get("dns-key"):
                stack.on_start.append(_publisher(signer, signer_obj, domains[0]))
        lockout = float(sub.get("auth-lockout", 900.0))
        throttle = LoginThrottle(
            base_delay=float(sub.get("auth-delay", 0.5)),
            max_delay=float(sub.get("auth-max-delay", 8.0)),
            max_failures=int(sub.get("auth-max-failures", 10)),
            window=max(lockout, 60.0),
            lockout=lockout,
        )
        s_stage = SubmissionStage(
            watcher,
            LoginAuthenticator(
                watcher, throttle=throttle, concurrency=int(sub.get("auth-concurrency", 4))
            ),
        )
        s_tls = _tls(sub, required=True)
        assert s_tls is not None
        stack.tls.append(s_tls)
        listen_tls, listen = sub.get("listen-tls"), sub.get("listen")
        if listen_tls is None and listen is None:
            listen_tls, listen = "0.0.0.0:465", "0.0.0.0:587"
        if listen_tls:
            host, port = split_hostport(str(listen_tls), 465, "[submission] listen-tls")
            stack.services.append(
                SMTPService(
                    s_stage, out_hop, host=host, port=port, hostname=s_name,
                    tls_context=s_tls.ctx, implicit_tls=True,
                )
            )
        if listen:
            host, port = split_hostport(str(listen), 587, "[submission] listen")
            stack.services.append(
                SMTPService(
                    s_stage, out_hop, host=host, port=port, hostname=s_name,
                    tls_context=s_tls.ctx, require_tls=True,
                )
            )

    # -- the relay's own listener (other MTAs of ours, `poste send` by hand)
    if relay.get("listen"):
        host, port = split_hostport(str(relay.get("listen")), 25, "[relay] listen")
        stack.services.append(
            SMTPService(relay_stage, queue_hop, host=host, port=port, hostname=relay_name)
        )
    if not stack.services:
        raise ConfigError("nothing to listen on: enable [verifier], [submission] or [relay] listen")
    return stack


def _signer(section: Section, default_domain: str) -> Any:
    from poste.dkim.cli import make_signer

    domain = str(section.get("domain") or default_domain)
    try:
        return make_signer(
            domain,
            section.need("selector"),
            section.need("private-key"),
            section.get("sign-headers"),
            section.get("oversign"),
        )
    except click.ClickException as exc:
        raise ConfigError(f"[signer] {exc.format_message()}") from None


def _publisher(section: Section, signer: Any, domain: str) -> Callable[[], Awaitable[None]]:
    server, key = section.get("dns-server"), section.get("dns-key")
    if not server or not key:
        raise ConfigError("[signer] dns-server and dns-key go together")

    async def publish() -> None:
        from poste.services.signer import publish_keys

        await publish_keys(signer, server, key, section.get("zone") or domain)

    return publish
