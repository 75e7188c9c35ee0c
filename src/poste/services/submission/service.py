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

import click

from poste.runtime.hostport import parse_hostport
from poste.runtime.service import (
    destination_option,
    hostname_option,
    run_services,
    setup_logging,
    tls_cert_option,
    tls_context_from,
    tls_key_option,
    verbose_option,
)
from poste.services.submission.brake import AuthBrake
from poste.services.submission.logins import Authenticator, may_send_as, resolve_login
from poste.services.submission.sender_policy import check_header
from poste.smtp.client import SMTPHop
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

    async def on_data(self, env: Envelope, data: bytes) -> Verdict:
        db = self.watcher.db
        user = resolve_login(db, env.auth_user or "")
        if user is None:
            reply: Reply | None = NOT_YOURS
        elif len(data) > 65536:  # a long header section is read off the event loop
            reply = await asyncio.to_thread(check_header, db, user, data)
        else:
            reply = check_header(db, user, data)
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
    authenticator = Authenticator(watcher, throttle=throttle, concurrency=concurrency)
    return SubmissionStage(watcher, authenticator)


@click.command()
@click.option(
    "--domain",
    "domains",
    multiple=True,
    required=True,
    help="Our domain: the users repository's root entries (repeat for more domains).",
)
@destination_option
@click.option(
    "--users",
    required=True,
    type=click.Path(file_okay=False),
    help="The Git users repository.",
)
@tls_cert_option
@tls_key_option
@click.option(
    "--listen-tls",
    default=None,
    metavar="ADDR:PORT",
    help="Implicit TLS listener (port 465 style; default 0.0.0.0:465).",
)
@click.option(
    "--listen",
    default=None,
    metavar="ADDR:PORT",
    help="STARTTLS listener, TLS mandatory (port 587 style; default 0.0.0.0:587).",
)
@hostname_option
@click.option(
    "--poll-interval",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="Seconds between checks of the users repository's HEAD (SIGHUP reloads at once).",
)
@click.option(
    "--auth-delay",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Delay before answering the first failed login of a client; doubles per failure.",
)
@click.option("--auth-max-delay", default=8.0, show_default=True, type=click.FloatRange(min=0))
@click.option(
    "--auth-max-failures",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Failed logins (within --auth-lockout seconds) before a client address is locked out.",
)
@click.option(
    "--auth-net-failures",
    default=30,
    show_default=True,
    type=click.IntRange(min=1),
    help="Failed logins before a client network (IPv4 /24, IPv6 /48) is locked out.",
)
@click.option(
    "--auth-account-failures",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Failed logins against one account after which only clients that have not "
    "failed against it may try it.",
)
@click.option(
    "--auth-state",
    default=None,
    type=click.Path(dir_okay=False),
    help="File keeping the failed-login counters across restarts (JSON; default: memory only).",
)
@click.option(
    "--auth-lockout",
    default=900.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds a locked-out client or network gets 454 to AUTH.",
)
@click.option(
    "--auth-concurrency",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Password checks running at once (argon2id takes 64 MiB each).",
)
@verbose_option
def main(
    domains: tuple[str, ...],
    destination: str,
    users: str,
    tls_cert: str | None,
    tls_key: str | None,
    listen_tls: str | None,
    listen: str | None,
    hostname: str | None,
    poll_interval: float,
    auth_delay: float,
    auth_max_delay: float,
    auth_max_failures: int,
    auth_net_failures: int,
    auth_account_failures: int,
    auth_state: str | None,
    auth_lockout: float,
    auth_concurrency: int,
    verbose: int,
) -> None:
    """Authenticated submission: 465 (implicit TLS) and 587 (STARTTLS), AUTH PLAIN/LOGIN.

    With neither --listen-tls nor --listen, both listen on their standard
    ports; with one of them, only that one.
    """
    setup_logging(verbose)
    if not tls_cert or not tls_key:
        raise click.UsageError("submission needs --tls-cert and --tls-key (AUTH only under TLS)")
    ctx = tls_context_from(tls_cert, tls_key)
    if listen_tls is None and listen is None:
        listen_tls, listen = "0.0.0.0:465", "0.0.0.0:587"
    dest_host, dest_port = parse_hostport(destination, 25)
    tls_addr = parse_hostport(listen_tls, 465) if listen_tls is not None else None
    starttls_addr = parse_hostport(listen, 587) if listen is not None else None
    throttle = make_throttle(
        auth_delay,
        auth_max_delay,
        auth_max_failures,
        auth_lockout,
        net_failures=auth_net_failures,
        account_failures=auth_account_failures,
        state=auth_state,
    )
    try:
        stage = build_stage(
            users,
            domains,
            poll_interval=poll_interval,
            throttle=throttle,
            concurrency=auth_concurrency,
        )
    except (UsersRepoError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    hop = SMTPHop(dest_host, dest_port, helo=hostname)
    services: list[SMTPService] = []
    if tls_addr is not None:
        host, port = tls_addr
        services.append(
            SMTPService(
                stage,
                hop,
                host=host,
                port=port,
                hostname=hostname,
                tls_context=ctx,
                implicit_tls=True,
            )
        )
    if starttls_addr is not None:
        host, port = starttls_addr
        services.append(
            SMTPService(
                stage,
                hop,
                host=host,
                port=port,
                hostname=hostname,
                tls_context=ctx,
                require_tls=True,
            )
        )

    hup_tasks: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = asyncio.get_running_loop().create_task(stage.watcher.areload())
        hup_tasks.add(task)
        task.add_done_callback(hup_tasks.discard)

    run_services(
        *services,
        background=[stage.watcher.run],
        on_hup=on_hup,
        on_stop=stage.authenticator.brake.flush,
    )
