"""`poste relay`: deliver to local users' targets and to remote MX, with a durable queue."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import secrets
import socket
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from poste.dns.resolver import NameserverError, make_resolver
from poste.runtime.hostport import parse_hostport
from poste.runtime.service import (
    hostname_option,
    listen_option,
    run_services,
    setup_logging,
    verbose_option,
)
from poste.services.relay.delivery import Deliverer
from poste.services.relay.router import Router, parse_networks
from poste.services.relay.scheduler import DeliverFn, Policy, Scheduler
from poste.services.relay.spool import Spool, SpoolError, SpoolLocked
from poste.services.relay.srs import DAY, SRS, SRSDatabase, load_secrets
from poste.services.relay.stage import MAX_RECEIVED, QueueHop, RelayStage
from poste.smtp.server import SMTPService
from poste.users.repo import UsersRepoError, UsersWatcher

log = logging.getLogger("poste.relay")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class Duration(click.ParamType):  # type: ignore[type-arg]
    """`300`, `300s`, `5m`, `4h`, `5d`, `200ms` -> seconds."""

    name = "duration"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        m = _DURATION.match(str(value))
        if not m:
            self.fail(f"{value!r} is not a duration (e.g. 30s, 5m, 4h, 5d)", param, ctx)
        return float(m.group(1)) * _UNITS[m.group(2) or "s"]


DURATION = Duration()


def _given_secrets(secret: str | None, secret_file: str | None) -> list[bytes]:
    """The SRS secrets of the flags ([] when neither is given); a bad file is one line."""
    try:
        from_file = load_secrets(None, secret_file)
    except OSError as exc:
        raise click.ClickException(f"cannot read --srs-secret-file: {exc.strerror}") from None
    except ValueError:  # not UTF-8 text
        raise click.ClickException(
            f"--srs-secret-file {secret_file}: not a text file of secrets") from None
    if secret_file and not from_file:
        # Going on without the file's secrets would silently break a secret
        # shared by several relays.
        raise click.ClickException(f"--srs-secret-file {secret_file}: no secret in it")
    return load_secrets(secret, None) + from_file


def _own_secret(spool: Path) -> list[bytes]:
    """No secret given: keep one of our own beside the queue, so that bounces
    to addresses signed before a restart still verify."""
    path = spool / "srs-secret"
    try:
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            log.info("no --srs-secret given: generated %s", path)
        found = load_secrets(None, str(path))
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"SRS secret {path}: {exc}") from None
    if not found:
        raise click.ClickException(f"SRS secret {path}: no secret in it")
    return found


@click.command()
@click.option("--domain", "domains", multiple=True, required=True, metavar="D",
              help="Our mail domain (repeat for more; the first is the users' default).")
@click.option("--postmaster", required=True, metavar="ADDR",
              help="Where mail to postmaster@ goes.")
@click.option("--users", "users_repo", required=True, type=click.Path(),
              help="The Git users repository.")
@click.option("--spool", "spool_dir", required=True, type=click.Path(file_okay=False),
              help="Queue folder (created if missing).")
@listen_option
@click.option("--nameserver", "nameservers", multiple=True, metavar="[tcp:|udp:]IP[:PORT]",
              help="DNS resolver for MX lookups (default: resolv.conf).")
@click.option("--smtp-port", default=25, show_default=True, type=click.IntRange(1, 65535),
              help="Port of remote MX hosts (change only for tests).")
@click.option("--granted", multiple=True, metavar="CIDR",
              help="Networks allowed to relay to non-local recipients "
                   "[default: 127.0.0.0/8, ::1/128].")
@click.option("--srs-secret", default=None, metavar="TEXT",
              help="SRS secret (prefer --srs-secret-file).")
@click.option("--srs-secret-file", default=None, type=click.Path(dir_okay=False),
              help="SRS secrets, one a line: the first signs, all verify. "
                   "Default: SPOOL/srs-secret, generated once.")
@hostname_option
@click.option("--retry-min", default="5m", show_default=True, type=DURATION,
              help="First retry delay; doubles each attempt.")
@click.option("--retry-max", default="4h", show_default=True, type=DURATION,
              help="Longest retry delay.")
@click.option("--lifetime", default="5d", show_default=True, type=DURATION,
              help="Give up (failure DSN) after this long in the queue.")
@click.option("--warn-after", default="4h", show_default=True, type=DURATION,
              help="Send a delay DSN after this long (0: never).")
@click.option("--domain-concurrency", default=10, show_default=True,
              type=click.IntRange(1, 1000), help="SMTP sessions at once per destination domain.")
@click.option("--queue-rescan", default="30s", show_default=True, type=DURATION,
              help="How often to re-read the spool (for `poste queue retry|delete`).")
@click.option("--users-poll", default="2s", show_default=True, type=DURATION,
              help="How often to check the users repository for a new commit.")
@click.option("--max-received", default=MAX_RECEIVED, show_default=True,
              type=click.IntRange(1, 1000), help="More Received: fields than this is a loop (554).")
@click.option("--no-ipv6", is_flag=True, help="Deliver over IPv4 only.")
@click.option("--self-address", "self_addresses", multiple=True, metavar="IP",
              help="Another address of ours (e.g. the public IP of our MX): mail whose MX "
                   "resolves to it, or to --listen, loops back and is bounced (5.4.6).")
@verbose_option
def main(
    domains: tuple[str, ...],
    postmaster: str,
    users_repo: str,
    spool_dir: str,
    listen: str,
    nameservers: tuple[str, ...],
    smtp_port: int,
    granted: tuple[str, ...],
    srs_secret: str | None,
    srs_secret_file: str | None,
    hostname: str | None,
    retry_min: float,
    retry_max: float,
    lifetime: float,
    warn_after: float,
    domain_concurrency: int,
    queue_rescan: float,
    users_poll: float,
    max_received: int,
    no_ipv6: bool,
    self_addresses: tuple[str, ...],
    verbose: int,
) -> None:
    """Deliver mail: local addresses to their targets (SRS), others to their MX (--granted only).

    Every accepted mail is on disk (fsync) before the 250; undeliverable mail
    is retried with backoff and bounced (RFC 3464 DSN) after --lifetime.
    """
    setup_logging(verbose)
    try:
        host, port = parse_hostport(listen, 25)
    except click.BadParameter as exc:
        raise click.BadParameter(exc.message, param_hint="--listen") from None
    policy = Policy(
        retry_min=retry_min,
        retry_max=max(retry_max, retry_min),
        lifetime=lifetime,
        warn_after=warn_after,
        max_per_domain=domain_concurrency,
        rescan=queue_rescan,
    )
    parts = build_relay(
        domains=list(domains),
        postmaster=postmaster,
        users_repo=users_repo,
        spool_dir=spool_dir,
        nameservers=list(nameservers),
        smtp_port=smtp_port,
        granted=list(granted),
        srs_secret=srs_secret,
        srs_secret_file=srs_secret_file,
        hostname=hostname,
        policy=policy,
        users_poll=users_poll,
        max_received=max_received,
        ipv6=not no_ipv6,
        listen_hosts=[host],
        self_addresses=list(self_addresses),
        preflight=lambda: _check_bindable(host, port),
    )
    service = SMTPService(parts.stage, parts.hop, host=host, port=port, hostname=parts.hostname)

    def on_hup() -> None:
        asyncio.get_running_loop().create_task(parts.watcher.areload())

    # The spool is resumed (and cleaned of half-written files) before we listen;
    # delivery stops after the listener closed, so no mail is accepted once the
    # spool lock is gone.
    run_services(
        service,
        on_start=parts.start,
        background=parts.background(),
        on_hup=on_hup,
        on_stop=parts.stop,
    )


@dataclass
class RelayParts:
    """What `poste relay` runs; `poste up` chains `stage` and `hop` in memory.

    Life cycle, the same in both: `await start()` (resumes the spool and
    removes half-written files) must finish before anything can reach `hop`;
    run each of `background()` as a task; `await stop()` once the listeners
    are closed.
    """

    stage: RelayStage
    hop: QueueHop
    scheduler: Scheduler
    watcher: UsersWatcher
    router: Router
    hostname: str
    spool: Spool
    deliverer: Deliverer
    srs_db: SRSDatabase
    srs_max_age: int

    async def start(self) -> None:
        await self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()  # also releases the spool lock
        await self.deliverer.aclose()

    def background(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return [self.watcher.run, self.prune_srs_db]

    async def prune_srs_db(self) -> None:
        """Hourly: drop SRS database entries unused for longer than an SRS address lives."""
        while True:
            try:
                n = await asyncio.to_thread(self.srs_db.prune, (self.srs_max_age + 1) * DAY)
            except OSError as exc:
                log.warning("SRS database %s: prune failed: %s", self.srs_db.path, exc)
            else:
                if n:
                    log.info("SRS database: %d expired entr%s removed", n, "y" if n == 1 else "ies")
            await asyncio.sleep(3600)


def build_relay(
    *,
    domains: list[str],
    postmaster: str,
    users_repo: str,
    spool_dir: str,
    nameservers: list[str] | None = None,
    smtp_port: int = 25,
    granted: list[str] | None = None,
    srs_secret: str | None = None,
    srs_secret_file: str | None = None,
    hostname: str | None = None,
    policy: Policy | None = None,
    users_poll: float = 2.0,
    max_received: int = MAX_RECEIVED,
    ipv6: bool = True,
    listen_hosts: Sequence[str] = (),
    self_addresses: list[str] | None = None,
    extra_domains: Sequence[str] = (),
    deliver: DeliverFn | None = None,
    lock: bool = True,
    preflight: Callable[[], None] | None = None,
) -> RelayParts:
    """Check the settings and build the relay; bad input is a one-line ClickException.

    `listen_hosts`: where we (or, in `poste up`, our MX) listen; mail whose MX
    resolves there loops.  `extra_domains`: more domains of the users
    repository besides `domains` (`poste up`: submission's).  `deliver`
    replaces MX delivery (`poste up`'s `[relay] mailbox`).  `lock=False`
    builds without owning the spool (`poste up --check` beside a running one).
    `preflight` runs once the flags are checked, before any file is touched
    (`poste relay`: can --listen be bound?).
    """
    from poste.services.relay.metrics import watch_spool

    if not domains:
        raise click.UsageError("the relay needs at least one --domain")
    if "@" not in postmaster:
        raise click.BadParameter(f"{postmaster!r} is not an address", param_hint="--postmaster")
    try:
        resolver = make_resolver(nameservers or [])
    except NameserverError as exc:
        raise click.BadParameter(str(exc), param_hint="--nameserver") from None
    try:
        nets = parse_networks(granted or ["127.0.0.0/8", "::1/128"])
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--granted") from None
    domain = domains[0].lower().rstrip(".")
    ours = _self_addresses(listen_hosts, self_addresses or [])
    if preflight is not None:
        preflight()
    try:
        spool = Spool(spool_dir)
        # One relay per spool: refuse now, before anything else is read or written.
        if lock:
            spool.lock()
    except SpoolLocked:
        raise
    except (OSError, SpoolError) as exc:
        raise click.ClickException(f"spool {spool_dir}: {exc}") from None
    try:
        # Every check that can fail comes before the users watcher, whose
        # loading logs a line: a refused start prints its one error line alone.
        secrets_ = _given_secrets(srs_secret, srs_secret_file)
        try:
            srs_db = SRSDatabase(spool.path / "srs-db")
        except OSError as exc:
            raise click.ClickException(f"SRS database in {spool.path}: {exc}") from None
        more = tuple(
            d for d in dict.fromkeys(x.lower().rstrip(".") for x in [*domains[1:], *extra_domains])
            if d != domain
        )
        try:
            watcher = UsersWatcher(users_repo, domain, poll_interval=users_poll, extra_domains=more)
        except UsersRepoError as exc:
            raise click.ClickException(f"users repository: {exc}") from None
        secrets_ = secrets_ or _own_secret(spool.path)
    except BaseException:
        spool.unlock()  # a relay that does not run must not keep the spool
        raise
    me = hostname or socket.getfqdn()
    srs = SRS(domain, secrets_, db=srs_db)
    router = Router(domains, postmaster, srs, lambda: watcher.db, nets)
    deliverer = Deliverer(resolver, helo=me, port=smtp_port, ipv6=ipv6, self_addresses=ours)
    scheduler = Scheduler(
        spool, deliver or deliverer.deliver, hostname=me, domain=domain,
        policy=policy or Policy(), expand=router.dsn_targets,
    )
    watch_spool(spool.path)  # poste_spool_messages, poste_spool_oldest_age_seconds
    return RelayParts(
        stage=RelayStage(router, max_received),
        hop=QueueHop(router, scheduler),
        scheduler=scheduler,
        watcher=watcher,
        router=router,
        hostname=me,
        spool=spool,
        deliverer=deliverer,
        srs_db=srs_db,
        srs_max_age=srs.max_age_days,
    )


def _check_bindable(host: str, port: int) -> None:
    """Refuse a --listen address we cannot bind before the spool and users are loaded.

    The listener itself opens only after the spool is resumed (and logged),
    so a busy port found then would follow several log lines; found here it
    is the one line of a refused start.  (A port taken in between still
    fails cleanly, at the listener.)
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise click.BadParameter(f"cannot resolve {host!r}: {exc}", param_hint="--listen") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            # As asyncio's create_server binds: reuse, and v6 sockets v6-only.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                raise click.ClickException(
                    f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _self_addresses(listen_hosts: Sequence[str], extra: list[str]) -> list[str]:
    """Our own IPs: --self-address and the --listen addresses (a name is resolved)."""
    found: list[str] = []
    for text in extra:
        try:
            found.append(str(ipaddress.ip_address(text.strip())))
        except ValueError:
            raise click.BadParameter(f"{text!r} is not an IP address",
                                     param_hint="--self-address") from None
    for listen in listen_hosts:
        host = listen.strip("[]")
        if not host:
            continue
        try:
            found.append(str(ipaddress.ip_address(host)))
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            except OSError as exc:
                raise click.BadParameter(f"cannot resolve {host!r}: {exc}",
                                         param_hint="--listen") from None
            found.extend(str(info[4][0]) for info in infos)
    return found
