"""`poste submission`: where the users' mail clients send from (ptt's lipap, fixed).

Two listeners share one stage: 465 with implicit TLS and 587 with mandatory
STARTTLS.  The core offers AUTH PLAIN/LOGIN only under TLS and only because
the stage has `authenticate`; MAIL before AUTH gets 530.  What ptt did not
check, poste does: the envelope sender must be the logged-in user's own
address (or an alias, or a +tag of it), else 553 5.7.1, so a stolen or
shared login cannot send as someone else of the domain; and so must the
header From:/Sender: (sender_policy.py), so nothing is signed in another's
name.  The AUTH brake (brake.py) keeps password guessing slow.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from poste.runtime import reloads
from poste.runtime.certs import server_tls, tls_parts
from poste.runtime.hostport import parse_hostport
from poste.runtime.run import Parts
from poste.runtime.settings import ConfigError, Values
from poste.runtime.tls import TLSFiles
from poste.services.submission.brake import AuthBrake
from poste.services.submission.logins import Authenticator, may_send_as, resolve_login
from poste.services.submission.sender_policy import check_header
from poste.smtp.client import HOP_KEEP, SMTPHop
from poste.smtp.hop import Hop
from poste.smtp.message import Message
from poste.smtp.server import SMTPService
from poste.smtp.stage import Envelope, Reply, Stage, Verdict
from poste.users.repo import UsersRepoError, UsersWatcher

log = logging.getLogger("poste.submission")

AUTH_INVALID = Reply(535, "5.7.8 Authentication credentials invalid")
AUTH_LOCKED = Reply(454, "4.7.0 Too many failed logins, try again later")
AUTH_BUSY = Reply(454, "4.7.0 Another login from your address is being checked, try again later")
NOT_YOURS = Reply(553, "5.7.1 Sender address not owned by the authenticated user")
NULL_SENDER = Reply(553, "5.7.1 The null sender is not allowed in submission")


class SubmissionStage(Stage):
    """Authenticates users and holds them to their own sender addresses."""

    name = "submission"
    auth_required = True

    def __init__(self, watcher: UsersWatcher, authenticator: Authenticator) -> None:
        self.watcher = watcher
        self.authenticator = authenticator

    async def authenticate(self, env: Envelope, username: str, password: str) -> Reply | None:
        user, reason = await self.authenticator.check(env.peer_ip, username, password)
        if user is not None:
            return None
        return {"locked": AUTH_LOCKED, "busy": AUTH_BUSY}.get(reason or "", AUTH_INVALID)

    async def on_mail(self, env: Envelope, sender: str) -> Reply | None:
        if not env.auth_user:  # the core refuses this first; a chained use must not skip it
            return Reply(530, "5.7.0 Authentication required")
        if not sender:
            return NULL_SENDER
        if not may_send_as(self.watcher.db, env.auth_user, sender):
            log.warning(
                "%s user %r may not send as <%s> (ip=%s)",
                env.queue_id,
                env.auth_user,
                sender,
                env.peer_ip,
            )
            return NOT_YOURS
        return None

    async def on_data(self, env: Envelope, message: Message) -> Verdict:
        db = self.watcher.db
        user = resolve_login(db, env.auth_user or "")
        header = message.header()
        if user is None:
            reply: Reply | None = NOT_YOURS
        elif len(header) > 65536:  # a long header section is read off the event loop
            reply = await asyncio.to_thread(check_header, db, user, header)
        else:
            reply = check_header(db, user, header)
        if reply is not None:
            log.warning(
                "%s user %r: header refused: %s (ip=%s)",
                env.queue_id,
                env.auth_user,
                reply,
                env.peer_ip,
            )
            return Verdict(reply=reply)
        return Verdict()


def make_throttle(
    delay: float = 0.5,
    max_delay: float = 8.0,
    max_failures: int = 10,
    lockout: float = 900.0,
    *,
    net_failures: int = 30,
    account_failures: int = 10,
    state: str | Path | None = None,
) -> AuthBrake:
    """The AUTH brake of the --auth-* flags (failures count within the lockout, >= 60 s)."""
    return AuthBrake(
        base_delay=delay,
        max_delay=max_delay,
        addr_budget=max_failures,
        net_budget=net_failures,
        account_budget=account_failures,
        window=max(lockout, 60.0),
        lockout=lockout,
        state_file=state,
    )


def build_stage(
    users: str | Path,
    domains: tuple[str, ...],
    *,
    poll_interval: float = 2.0,
    throttle: AuthBrake | None = None,
    concurrency: int = 4,
    watcher: UsersWatcher | None = None,
    cache_ttl: float = 60.0,
) -> SubmissionStage:
    """The stage with its users watcher (for `poste submission` and `poste up`).

    `watcher`: one already watching `users` (`poste up` shares the relay's,
    so both see a commit at the same moment); then `domains` and
    `poll_interval` are that watcher's business.  Without one, a new watcher
    is opened: run `stage.watcher.run()` in the background.  Raises
    UsersRepoError when the repository cannot be read.
    """
    if watcher is None:
        watcher = UsersWatcher(users, domains[0], poll_interval, extra_domains=tuple(domains[1:]))
    authenticator = Authenticator(watcher, throttle=throttle, concurrency=concurrency,
                                  cache_ttl=cache_ttl)
    return SubmissionStage(watcher, authenticator)


def stage(values: Values, watcher: UsersWatcher | None = None) -> SubmissionStage:
    """The stage of the settings; `watcher` as for `build_stage`."""
    throttle = make_throttle(
        float(values["auth-delay"]), float(values["auth-max-delay"]),
        int(values["auth-max-failures"]), float(values["auth-lockout"]),
        net_failures=int(values["auth-net-failures"]),
        account_failures=int(values["auth-account-failures"]),
        state=values["auth-state"],
    )
    try:
        return build_stage(
            values["users"], tuple(values["domain"]), poll_interval=float(values["poll-interval"]),
            throttle=throttle, concurrency=int(values["auth-concurrency"]), watcher=watcher,
            cache_ttl=float(values["auth-cache"]),
        )
    except (UsersRepoError, ValueError) as exc:
        raise ConfigError(None, str(exc)) from None


def listeners(values: Values, stage: SubmissionStage, hop: Hop, tls: TLSFiles) -> Parts:
    """The two listeners (or the one asked for), TLS on both; SIGHUP reloads the certificate,
    ACME renews it."""
    listen_tls, listen = values["listen-tls"], values["listen"]
    if listen_tls is None and listen is None:
        listen_tls, listen = "0.0.0.0:465", "0.0.0.0:587"
    services: list[SMTPService] = []
    name = values["hostname"]
    if listen_tls:
        host, port = parse_hostport(listen_tls, 465, "listen-tls")
        services.append(SMTPService(stage, hop, host=host, port=port, hostname=name,
                                    tls_context=tls.ctx, implicit_tls=True))
    if listen:
        host, port = parse_hostport(listen, 587, "listen")
        services.append(SMTPService(stage, hop, host=host, port=port, hostname=name,
                                    tls_context=tls.ctx, require_tls=True))
    parts = Parts(services)
    parts.add(tls_parts(tls))
    return parts


def tls_of(values: Values) -> TLSFiles:
    """AUTH is offered only under TLS: no certificate, no submission."""
    acme = bool(values.get("acme-directory"))
    tls = server_tls(values) if acme or (values["tls-cert"] and values["tls-key"]) else None
    if tls is None:
        raise ConfigError(None, "submission needs {0} and {1}, or {2} (AUTH only under TLS)",
                          names=("tls-cert", "tls-key", "acme-directory"))
    return tls


def build(values: Values) -> Parts:
    """`poste submission`: its own users watcher, and the next hop over SMTP."""
    tls = tls_of(values)
    dest_host, dest_port = parse_hostport(values["destination"], 25, "destination")
    for key, port in (("listen-tls", 465), ("listen", 587)):  # every flag checked before
        if values[key] is not None:                            # the users are read
            parse_hostport(values[key], port, key)
    st = stage(values)
    # kept sessions to the signer: the next mail starts at MAIL (issue 16, item 5)
    hop = SMTPHop(dest_host, dest_port, helo=values["hostname"], keep=HOP_KEEP)
    parts = listeners(values, st, hop, tls)
    parts.background.append(st.watcher.run)
    parts.reloads.insert(0, ("users", reloads.users(st.watcher)))
    parts.after.append(st.authenticator.brake.flush)  # the AUTH counters on disk
    return parts
