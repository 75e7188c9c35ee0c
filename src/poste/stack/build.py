"""Assemble the five services in one process from a `StackConfig` (`poste up`).

Each service is made by its own builder, the one its command uses (the
relay's `build_relay`, the verifier's and submission's `build_stage`, the
signer's `make_signer` + `SignerStage`, the spamfilter's `build_stage`),
so a key means what the flag means and the two cannot
drift.  Only the hops differ from separate processes: verifier -> spamfilter
-> relay and submission -> signer -> relay are chained with `StageHop`, so
each in-memory hop still adds its own `Received:` and each RCPT/DATA reply is
the next stage's, and the relay's queue is the final hop.  Only the entry
listeners open sockets.  The services count their own metrics; nothing here
wraps them, so every series moves once per event, as with separate processes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from poste.services.relay.delivery import Result
from poste.services.relay.scheduler import Policy
from poste.services.relay.service import RelayParts
from poste.services.relay.stage import MAX_RECEIVED
from poste.smtp.chain import StageHop
from poste.smtp.hop import Hop
from poste.smtp.server import SMTPService
from poste.smtp.stage import Envelope, Stage
from poste.smtp.tls import TLSConfigError, server_context
from poste.stack.config import ConfigError, Section, StackConfig

log = logging.getLogger("poste.up")


def split_hostport(text: str, default_port: int, where: str) -> tuple[str, int]:
    from poste.runtime.hostport import parse_hostport

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
    relay: RelayParts
    tls: list[TLSFiles] = field(default_factory=list)
    mailbox: Path | None = None
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    spam_stage: Stage | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def watcher(self) -> Any:  # poste.users.repo.UsersWatcher, shared by relay and submission
        return self.relay.watcher

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
        """The relay's start (spool resumed), then the listeners, then the background jobs."""
        for job in self.on_start:
            await job()
        await self.relay.start()
        started: list[SMTPService] = []
        try:
            for service in self.services:
                await service.start()
                started.append(service)
        except OSError as exc:
            for s in started:
                await s.stop()
            await self.relay.stop()
            raise click.ClickException(
                f"{service.stage.name}: cannot listen on {service.host}:{service.port}:"
                f" {exc.strerror or exc}"
            ) from None
        self._tasks = [asyncio.create_task(job()) for job in self.relay.background()]

    async def stop(self) -> None:
        """As `poste relay`: listeners closed first, delivery stopped after."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for service in self.services:
            await service.stop()
        for job in self.on_stop:
            await job()
        await self.relay.stop()

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


def config_error(section: str, exc: click.ClickException) -> ConfigError:
    """A service builder's complaint about a flag, told as the config key it came from."""
    if isinstance(exc, click.BadParameter) and exc.param_hint:
        hint = exc.param_hint if isinstance(exc.param_hint, str) else exc.param_hint[0]
        key = hint.strip("'\"").lstrip("-")
        return ConfigError(f"[{section}] {key}: {exc.message}")
    return ConfigError(f"[{section}] {exc.format_message()}")


def _spam_stage(section: Section) -> Stage:
    """The spamfilter service's own stage (it counts its labels itself)."""
    from poste.services.spamfilter.service import build_stage
    from poste.spam.model import Params

    try:
        return build_stage(
            section.get("db"),
            str(section.get("header-name", "X-Spamtacus")),
            bool(section.get("detail", False)),
            float(section.get("ham-cutoff", Params.ham_cutoff)),
            float(section.get("spam-cutoff", Params.spam_cutoff)),
        )
    except click.ClickException as exc:
        raise config_error("spamfilter", exc) from None


def _listen_host(section: Section, key: str, default_port: int) -> str | None:
    value = section.get(key)
    if not section.enabled or not value:
        return None
    return split_hostport(str(value), default_port, f"[{section.name}] {key}")[0]


def _relay(cfg: StackConfig, check: bool) -> tuple[RelayParts, Path | None]:
    """The relay from `build_relay`, as `poste relay` has it."""
    from poste.services.relay.service import build_relay

    relay, sub, verifier = cfg["relay"], cfg["submission"], cfg["verifier"]
    if not relay.enabled:
        raise ConfigError("[relay] cannot be disabled in `poste up`: it is where mail rests")
    domains = [d.lower().rstrip(".") for d in relay.need("domain")]
    users = relay.need("users")
    spool = relay.need("spool")
    if sub.enabled and sub.get("users") and Path(sub.get("users")) != Path(users):
        raise ConfigError("[submission] users must be the relay's repository in `poste up`")
    retry_min = float(relay.get("retry-min", 300.0))
    policy = Policy(
        retry_min=retry_min,
        retry_max=max(float(relay.get("retry-max", 4 * 3600.0)), retry_min),
        lifetime=float(relay.get("lifetime", 5 * 86400.0)),
        warn_after=float(relay.get("warn-after", 4 * 3600.0)),
        max_per_domain=int(relay.get("domain-concurrency", 10)),
        rescan=float(relay.get("queue-rescan", 30.0)),
    )
    # Our MX is the verifier here: mail whose MX resolves to it would loop.
    listen_hosts = [h for h in (_listen_host(relay, "listen", 25),
                                _listen_host(verifier, "listen", 25)) if h]
    mailbox = relay.get("mailbox")
    try:
        parts = build_relay(
            domains=domains,
            postmaster=str(relay.get("postmaster") or f"postmaster@{domains[0]}"),
            users_repo=users,
            spool_dir=spool,
            nameservers=relay.get("nameserver") or [],
            smtp_port=int(relay.get("smtp-port", 25)),
            granted=relay.get("granted") or [],
            srs_secret=relay.get("srs-secret"),
            srs_secret_file=relay.get("srs-secret-file"),
            hostname=relay.get("hostname"),
            policy=policy,
            users_poll=float(relay.get("users-poll", 2.0)),
            max_received=int(relay.get("max-received", MAX_RECEIVED)),
            ipv6=not relay.get("no-ipv6", False),
            listen_hosts=listen_hosts,
            self_addresses=relay.get("self-address") or [],
            extra_domains=sub.get("domain") or [],
            deliver=MailboxDeliverer(Path(mailbox)).deliver if mailbox else None,
            lock=not check,
        )
    except click.ClickException as exc:
        raise config_error("relay", exc) from None
    return parts, Path(mailbox) if mailbox else None


def build(cfg: StackConfig, *, check: bool = False) -> Stack:
    """Every stage, hop and listener of the config; raises ConfigError (one line).

    The relay owns its spool from here on (`stop()` releases it); with
    `check`, nothing is locked (`poste up --check` beside a running stack).
    """
    relay_parts, mailbox = _relay(cfg, check)
    try:
        return _assemble(cfg, relay_parts, mailbox)
    except BaseException:
        relay_parts.spool.unlock()
        raise


def _assemble(cfg: StackConfig, parts: RelayParts, mailbox: Path | None) -> Stack:
    relay = cfg["relay"]
    domains = [d.lower().rstrip(".") for d in relay.need("domain")]
    postmaster = str(relay.get("postmaster") or f"postmaster@{domains[0]}")
    relay_name = parts.hostname
    relay_stage, queue_hop = parts.stage, parts.hop
    stack = Stack(cfg, [], parts, mailbox=mailbox)

    # -- receiving: verifier -> spamfilter -> relay
    verifier, spam = cfg["verifier"], cfg["spamfilter"]
    if verifier.enabled:
        from poste.services.verifier.service import build_stage as verifier_stage

        try:
            v_stage = verifier_stage(
                verifier.get("domain") or domains,
                postmaster=verifier.get("postmaster") or postmaster,
                nameservers=verifier.get("nameserver") or [],
                dns_timeout=float(verifier.get("dns-timeout", 5.0)),
                psl_file=verifier.get("psl"),
                hostname=_hostname(verifier),
                reject_failures=bool(verifier.get("reject-failures", False)),
            )
        except click.ClickException as exc:
            raise config_error("verifier", exc) from None
        v_name = v_stage.auth.hostname
        first: Hop = StageHop(relay_stage, queue_hop, relay_name, v_name)
        if spam.enabled:
            spam_stage = _spam_stage(spam)
            stack.spam_stage = spam_stage
            spam_name = _hostname(spam)
            into_relay = StageHop(relay_stage, queue_hop, relay_name, spam_name)
            first = StageHop(spam_stage, into_relay, spam_name, v_name)
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
    sub, signer = cfg["submission"], cfg["signer"]
    if sub.enabled:
        from poste.services.submission.service import build_stage as submission_stage
        from poste.services.submission.service import make_throttle

        s_name = _hostname(sub)
        out_hop: Hop = StageHop(relay_stage, queue_hop, relay_name, s_name)
        if signer.enabled:
            from poste.services.signer.service import SignerStage

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
        s_stage = submission_stage(
            relay.need("users"),
            tuple(sub.get("domain") or domains),
            throttle=make_throttle(
                float(sub.get("auth-delay", 0.5)),
                float(sub.get("auth-max-delay", 8.0)),
                int(sub.get("auth-max-failures", 10)),
                float(sub.get("auth-lockout", 900.0)),
                net_failures=int(sub.get("auth-net-failures", 30)),
                account_failures=int(sub.get("auth-account-failures", 10)),
                # the failed-login counters live beside the spool unless told otherwise
                state=sub.get("auth-state")
                or Path(relay.need("spool")).parent / "submission-auth.json",
            ),
            concurrency=int(sub.get("auth-concurrency", 4)),
            watcher=parts.watcher,  # one watcher: relay and submission see a commit together
        )
        stack.on_stop.append(s_stage.authenticator.brake.flush)  # the AUTH counters on disk
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
    from poste.services.signer.options import make_signer

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
        from poste.services.signer.service import publish_keys

        await publish_keys(signer, server, key, section.get("zone") or domain)

    return publish
