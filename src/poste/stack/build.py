"""Assemble the five services in one process from a `StackConfig` (`poste up`).

Each service is made by the builder its own command uses, from the same
settings (a section's keys are the command's flags, with the same defaults,
see runtime/settings.py), so a key means what the flag means and the two
cannot drift.  Only the hops differ from separate processes: verifier ->
spamfilter -> relay and submission -> signer -> relay are chained with
`StageHop`, so each in-memory hop still adds its own `Received:` and each
RCPT/DATA reply is the next stage's, and the relay's queue is the final hop.
Only the entry listeners open sockets.  The services count their own
metrics; nothing here wraps them, so every series moves once per event, as
with separate processes.  The result runs on the same `Runtime` as every
service command.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poste.runtime.run import Job, Parts, Runtime
from poste.runtime.settings import ConfigError
from poste.runtime.tls import TLSFiles
from poste.services.relay.service import RelayParts
from poste.smtp import listen
from poste.smtp.chain import StageHop
from poste.smtp.hop import Hop
from poste.smtp.message import Message
from poste.smtp.server import SMTPService
from poste.smtp.stage import Envelope, Reply, Stage
from poste.stack.config import Section, StackConfig, load

log = logging.getLogger("poste.up")


@dataclass
class Stack:
    config: StackConfig
    relay: RelayParts
    parts: Parts = field(default_factory=Parts)
    tls: list[TLSFiles] = field(default_factory=list)
    mailbox: Path | None = None
    spam_stage: Stage | None = None

    def __post_init__(self) -> None:
        self.parts.name_listeners = True
        self.runtime = Runtime(self.parts)

    @property
    def services(self) -> list[SMTPService]:
        return self.parts.listeners

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
        await self.runtime.start()

    async def stop(self) -> None:
        await self.runtime.stop()

    async def reload(self) -> None:
        """SIGHUP: users, then the config (changes reported), certificates, the spam database."""
        await self.runtime.reload()

    async def reread_config(self) -> None:
        """Report each changed key that needs a restart; follow moved certificate files."""
        if self.config.path is None:
            return
        try:
            fresh = load(self.config.path)
        except ConfigError as exc:
            log.error("reload: config refused, keeping the running one: %s", exc)
            return
        for name, section in fresh.sections.items():
            old = self.config.sections[name].values
            for key in sorted(set(section.values) | set(old)):
                if key not in ("tls-cert", "tls-key") and section.values.get(key) != old.get(key):
                    log.warning("reload: [%s] %s changed: restart to apply it", name, key)
        for t in self.tls:  # cert/key paths may have moved
            for name in ("verifier", "submission"):
                sec = self.config.sections[name]
                if sec.get("tls-cert") == t.cert and sec.get("tls-key") == t.key:
                    t.cert = fresh.sections[name].get("tls-cert", t.cert)
                    t.key = fresh.sections[name].get("tls-key", t.key)
        self.config = fresh


class MailboxDeliverer:
    """Delivers every mail into a folder (`[relay] mailbox`): the demo's stand-in for the Internet."""

    def __init__(self, folder: Path) -> None:
        from poste.tools.srv import Mailbox

        self.folder = folder
        self.box = Mailbox(str(folder).rstrip("/") + "/", count=0, with_data=True)

    async def deliver(
        self, domain: str, sender: str, recipients: Sequence[str], message: Message
    ) -> dict[str, Reply]:
        env = Envelope(mail_from=sender, rcpt_tos=list(recipients))
        path = await asyncio.to_thread(self.box.store, env, message)
        return {r: Reply(250, f"2.0.0 Ok: stored as {path}", "mailbox", remote=True)
                for r in recipients}


def _listen_host(section: Section, default_port: int) -> str | None:
    from poste.runtime.hostport import parse_hostport

    value = section.get("listen")
    if not section.enabled or not value:
        return None
    try:
        return parse_hostport(str(value), default_port, "listen")[0]
    except ConfigError as exc:
        raise section.error(exc) from None


def _relay(cfg: StackConfig, check: bool) -> tuple[RelayParts, Path | None]:
    """The relay from the builder `poste relay` uses."""
    from poste.services.relay.service import relay_of

    relay, sub, verifier = cfg["relay"], cfg["submission"], cfg["verifier"]
    if not relay.enabled:
        raise ConfigError(None, "[relay] cannot be disabled in `poste up`: it is where mail rests")
    relay.need("domain")
    users = relay.need("users")
    relay.need("spool")
    if sub.enabled and sub.get("users") and Path(sub.get("users")) != Path(users):
        raise ConfigError(None, "[submission] users must be the relay's repository in `poste up`")
    # Our MX is the verifier here: mail whose MX resolves to it would loop.
    listen_hosts = [h for h in (_listen_host(relay, 25), _listen_host(verifier, 25)) if h]
    values = relay.settings()
    if not values["postmaster"]:
        values["postmaster"] = f"postmaster@{values['domain'][0].lower().rstrip('.')}"
    signer = cfg["signer"]
    if not values["dkim-key"] and signer.enabled and signer.get("private-key"):
        # the domain's keys are the signer's: DSNs signed, forwarded mail sealed with them
        values["dkim-selector"] = signer.get("selector") or []
        values["dkim-key"] = signer.get("private-key")
    if not values["arc-authserv-id"] and verifier.enabled:
        # the seal carries the verifier's results, found by its name (as verifier.build_stage)
        values["arc-authserv-id"] = verifier.get("hostname") or socket.getfqdn()
    spamfilter = cfg["spamfilter"]
    if relay.get("spam-label") is None and spamfilter.enabled and spamfilter.get("header-name"):
        # the spam policy acts on the label the spamfilter writes, under its name
        values["spam-label"] = spamfilter.get("header-name")
    if not values["learn-db"] and spamfilter.enabled and spamfilter.get("db"):
        # learn mails train the database the spamfilter reads (it sees each new file)
        values["learn-db"] = spamfilter.get("db")
    mailbox = values["mailbox"]
    try:
        parts = relay_of(
            values, listen_hosts=listen_hosts, extra_domains=sub.get("domain") or [],
            deliver=MailboxDeliverer(Path(mailbox)).deliver if mailbox else None, lock=not check,
        )
    except ConfigError as exc:
        raise relay.error(exc) from None
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


def _assemble(cfg: StackConfig, relay: RelayParts, mailbox: Path | None) -> Stack:
    stack = Stack(cfg, relay, mailbox=mailbox)
    domains = [d.lower().rstrip(".") for d in cfg["relay"].need("domain")]
    postmaster = cfg["relay"].get("postmaster") or f"postmaster@{domains[0]}"
    # Submission (and the signer behind it) runs in worker 0 only: the AUTH brake's
    # counters are one process's (runtime/workers.py); the other workers receive.
    sending = _sending(stack, domains) if listen.first() else Parts()
    entries = [_receiving(stack, domains, postmaster), sending, _relay_listener(stack)]
    # As `poste relay`, and the signer's keys published first; on SIGHUP the users,
    # then the config (which may move the certificates), the certificates, the rest.
    parts = stack.parts
    for entry in entries:
        parts.before += entry.before
        parts.listeners += entry.listeners
        parts.background += entry.background  # ACME renewal
        parts.after += entry.after
    parts.add(relay.runtime([]))
    parts.reloads.append(("config", stack.reread_config))
    reloads = [r for e in entries for r in e.reloads]
    parts.reloads += sorted(reloads, key=lambda r: r[0] != "certificate")
    if not parts.listeners and listen.first():
        raise ConfigError(
            None, "nothing to listen on: enable [verifier], [submission] or [relay] listen")
    return stack


def _acme_state(cfg: StackConfig, values: dict[str, Any]) -> None:
    """The ACME account and certificate live beside the spool unless told otherwise: the
    verifier's and submission's then share one certificate (both host names)."""
    if values.get("acme-directory") and not values.get("acme-state"):
        values["acme-state"] = str(Path(cfg["relay"].need("spool")).parent / "acme")


def acme_of(cfg: StackConfig) -> list[Any]:
    """The certificates `poste up` would obtain (`ACMESettings`, one per state folder, with
    the names of every section sharing it): what `poste cert --config` works on."""
    from poste.runtime.certs import acme_settings

    found: dict[Path, Any] = {}
    for name in ("verifier", "submission"):
        section = cfg[name]
        if not section.enabled:
            continue
        values = section.settings()
        _acme_state(cfg, values)
        if name == "verifier":  # mta-sts.DOMAIN too, as the verifier's tls_of names it
            from poste.services.verifier.service import with_mta_sts_names

            values["domain"] = values["domain"] or cfg["relay"].need("domain")
            values = with_mta_sts_names(values)
        try:
            acme = acme_settings(values)
        except ConfigError as exc:
            raise section.error(exc) from None
        if acme is None:
            continue
        key = acme.store.folder.resolve()
        if key in found:
            names = found[key].names + tuple(n for n in acme.names if n not in found[key].names)
            acme = dataclasses.replace(found[key], names=names)
        found[key] = acme
    return list(found.values())


def _into_relay(stack: Stack, name: str, *, own_hop: bool = False) -> Hop:
    """The relay as the next stage; `own_hop`: what comes this way may relay anywhere."""
    return StageHop(stack.relay.stage, stack.relay.hop, stack.relay.hostname, name,
                    own_hop=own_hop)


def _receiving(stack: Stack, domains: list[str], postmaster: str) -> Parts:
    """verifier -> spamfilter -> relay."""
    from poste.services.spamfilter import service as spamfilter
    from poste.services.verifier import service as verifier

    section, spam = stack.config["verifier"], stack.config["spamfilter"]
    if not section.enabled:
        return Parts()
    values = section.settings()
    values["domain"] = values["domain"] or domains
    values["postmaster"] = values["postmaster"] or postmaster
    _acme_state(stack.config, values)
    try:
        v_stage = verifier.stage(values)
    except ConfigError as exc:
        raise section.error(exc) from None
    v_name = v_stage.auth.hostname
    first = _into_relay(stack, v_name)
    more: list[tuple[str, Job]] = []
    if spam.enabled:
        spam_values = spam.settings()
        try:
            spam_stage = spamfilter.stage(spam_values)
        except ConfigError as exc:
            raise spam.error(exc) from None
        stack.spam_stage = spam_stage
        spam_name = spam_values["hostname"] or socket.getfqdn()
        first = StageHop(spam_stage, _into_relay(stack, spam_name), spam_name, v_name)
        more.append(("spam database", spam_stage.reload))
    try:
        tls = verifier.tls_of(values)
        parts = verifier.listener(values, v_stage, first, tls)
    except ConfigError as exc:
        raise section.error(exc) from None
    stack.tls += [tls] if tls else []
    parts.reloads += more
    return parts


def _sending(stack: Stack, domains: list[str]) -> Parts:
    """submission -> signer -> relay, with the relay's users watcher."""
    from poste.services.signer import service as signer
    from poste.services.submission import service as submission

    section, sig = stack.config["submission"], stack.config["signer"]
    if not section.enabled:
        return Parts()
    values = section.settings()
    values["domain"] = values["domain"] or domains
    values["hostname"] = s_name = values["hostname"] or socket.getfqdn()
    # the failed-login counters live beside the spool unless told otherwise
    values["auth-state"] = values["auth-state"] or str(
        Path(stack.config["relay"].need("spool")).parent / "submission-auth.json")
    _acme_state(stack.config, values)
    out: Hop = _into_relay(stack, s_name, own_hop=True)  # the sending path may relay anywhere
    before: list[Job] = []
    rotating: list[Job] = []
    if sig.enabled:
        sig_values = sig.settings()
        if not sig_values["key-dir"]:
            sig_values["selector"] = sig.need("selector")
            sig_values["private-key"] = sig.need("private-key")
        sig_values["domain"] = sig_values["domain"] or domains[0]
        g_name = sig_values["hostname"] or socket.getfqdn()
        try:
            signer_obj = signer.signer_of(sig_values)
            before = signer.publisher(sig_values, signer_obj)
            sig_stage = signer.SignerStage(signer_obj)
            rotating = signer.rotation(sig_values, sig_stage)
        except ConfigError as exc:
            raise sig.error(exc) from None
        out = StageHop(sig_stage, _into_relay(stack, g_name, own_hop=True), g_name, s_name)
    try:
        tls = submission.tls_of(values)
        # one watcher: relay and submission see a commit at the same moment
        sub_stage = submission.stage(values, watcher=stack.relay.watcher)
        parts = submission.listeners(values, sub_stage, out, tls)
    except ConfigError as exc:
        raise section.error(exc) from None
    stack.tls.append(tls)
    parts.before[:0] = before  # the DKIM keys published, then the certificate obtained
    parts.background += rotating  # the DKIM keys moved on as they age
    parts.after.append(sub_stage.authenticator.brake.flush)  # the AUTH counters on disk
    return parts


def _relay_listener(stack: Stack) -> Parts:
    """The relay's own listener (other MTAs of ours, `poste send` by hand), when asked for."""

    from poste.services.relay.service import listeners

    section = stack.config["relay"]
    try:
        return Parts(listeners(stack.relay, section.get("listen"), section.get("local-socket")))
    except ConfigError as exc:
        raise section.error(exc) from None
