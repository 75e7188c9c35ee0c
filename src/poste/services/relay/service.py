"""`poste relay`: deliver to local users' targets and to remote MX, with a durable queue."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import socket
import ssl
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poste.dns.resolver import NameserverError, make_resolver, make_sync_resolver
from poste.runtime import reloads
from poste.runtime.hostport import parse_hostport
from poste.runtime.run import Parts, StartError
from poste.runtime.settings import ConfigError, Values
from poste.services.relay.delivery import Deliverer
from poste.services.relay.digest import Digest, Schedule
from poste.services.relay.from_rewrite import Forwarding
from poste.services.relay.fwd_token import FwdTokens
from poste.services.relay.learn import Learning, check_learn_db
from poste.services.relay.own_mail import ForwardSeal, own_keys
from poste.services.relay.quarantine import Quarantine
from poste.services.relay.router import Router, parse_networks
from poste.services.relay.scheduler import INFLOW_BACKLOG, DeliverFn, Policy, Scheduler
from poste.services.relay.shards import adopt, shard_path
from poste.services.relay.spam_policy import SpamPolicy
from poste.services.relay.spool import Spool, SpoolError, SpoolLocked
from poste.services.relay.srs import DAY, SRS, SRSDatabase, load_secrets
from poste.services.relay.stage import MAX_RECEIVED, QueueHop, RelayStage
from poste.services.relay.tls_policy.policy import TransportPolicy, verifying_context
from poste.services.relay.tls_policy.reports import daily, spool_mail
from poste.services.relay.tls_policy.tlsrpt import Reporter
from poste.smtp import listen
from poste.smtp.server import SMTPService
from poste.users.repo import UsersRepoError, UsersWatcher

log = logging.getLogger("poste.relay")

def _given_secrets(secret: str | None, secret_file: str | None) -> list[bytes]:
    """The SRS secrets of the flags ([] when neither is given); a bad file is one line."""
    try:
        from_file = load_secrets(None, secret_file)
    except OSError as exc:
        raise ConfigError(None, f"cannot read {{0}}: {exc.strerror}",
                          names=["srs-secret-file"], usage=False) from None
    except ValueError:  # not UTF-8 text
        raise ConfigError(None, f"{{0}} {secret_file}: not a text file of secrets",
                          names=["srs-secret-file"], usage=False) from None
    if secret_file and not from_file:
        # Going on without the file's secrets would silently break a secret
        # shared by several relays.
        raise ConfigError(None, f"{{0}} {secret_file}: no secret in it",
                          names=["srs-secret-file"], usage=False)
    return load_secrets(secret, None) + from_file


def _own_secret(spool: Path) -> list[bytes]:
    """No secret given: keep one of our own beside the queue, so that bounces
    to addresses signed before a restart still verify."""
    path = spool / "srs-secret"
    try:
        if not path.exists():
            # written aside and linked into place: a worker starting beside us reads
            # the whole secret or none, and only one of two made at once is kept
            tmp = spool / f".tmp-srs-secret-{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
                log.info("no --srs-secret given: generated %s", path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        found = load_secrets(None, str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(None, f"SRS secret {path}: {exc}") from None
    if not found:
        raise ConfigError(None, f"SRS secret {path}: no secret in it")
    return found


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
    reporter: Reporter | None = None  # TLS-RPT reports of the outbound sessions
    digest: Digest | None = None

    async def start(self) -> None:
        self.scheduler.own_keys.say_what_is_missing()
        if self.hop.quarantine is not None:
            # beside other workers, spare what one of them may be writing now
            grace = 3600.0 if listen.worker() else 0.0
            await asyncio.to_thread(self.hop.quarantine.recover, grace)
        if listen.first():  # worker 0 takes in the shards of a run with more workers
            found = listen.worker()
            await asyncio.to_thread(adopt, self.spool, found[1] if found else 1)
        try:
            await self.scheduler.start()
        except SpoolLocked as exc:
            raise StartError(str(exc)) from None

    async def stop(self) -> None:
        await self.scheduler.stop()  # also releases the spool lock
        await self.deliverer.aclose()
        sync = self.spool.folder_sync
        if sync.asked:  # how much the group commit shared (folder_sync.py)
            log.info("spool %s: %d folder fsyncs for %d writes", self.spool.path, sync.syncs,
                     sync.asked)

    def runtime(self, listeners: list[SMTPService]) -> Parts:
        """The relay's jobs around `listeners`: spool resumed before them, stopped after."""
        return Parts(
            listeners, before=[self.start], background=list(self.background()),
            after=[self.stop], reloads=[("users", reloads.users(self.watcher))],
        )

    def background(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        jobs: list[Callable[[], Coroutine[Any, Any, None]]] = [self.watcher.run]
        if not listen.first():
            return jobs  # the jobs that must run once are worker 0's
        jobs.append(self.prune_srs_db)
        if self.reporter is not None:
            reporter = self.reporter
            jobs.append(lambda: daily(reporter))
        if self.digest is not None:
            jobs.append(self.digest.run)
        return jobs

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
    dkim_selectors: Sequence[str] = (),
    dkim_keys: Sequence[str] = (),
    arc_authserv_id: str | None = None,
    tls_ca_file: str | None = None,
    mta_sts: bool = True,
    dane: bool = True,
    mta_sts_port: int = 443,
    from_rewrite: bool = True,
    spam_label: str = "X-Spamtacus",
    quarantine_digest: str = "06:00",
    quarantine_days: int = 30,
    learn_db: str | None = None,
) -> RelayParts:
    """Check the settings and build the relay; bad input is a ConfigError.

    `listen_hosts`: where we (or, in `poste up`, our MX) listen; mail whose MX
    resolves there loops.  `extra_domains`: more domains of the users
    repository besides `domains` (`poste up`: submission's).  `deliver`
    replaces MX delivery (`poste up`'s `[relay] mailbox`).  `lock=False`
    builds without owning the spool (`poste up --check` beside a running one).
    `preflight` runs once the flags are checked, before any file is touched
    (`poste relay`: can --listen be bound?).  `dkim_selectors`/`dkim_keys`:
    the domain's keys, for DSNs and ARC seals over `arc_authserv_id`'s
    results (default: our hostname).  `tls_ca_file`, `mta_sts`, `dane`,
    `mta_sts_port`: the outbound transport policy (`tls_policy/`).
    `from_rewrite`: the DMARC From rewrite of forwarded mail (from_rewrite.py)
    may happen.  `spam_label`, `quarantine_digest`, `quarantine_days`: the
    per-user spam policy (spam_policy.py, digest.py).
    `learn_db`: the spam database that learn mails train (learn.py; None:
    learn addresses are not special).
    """
    from poste.services.relay.metrics import watch_spool

    if not domains:
        raise ConfigError(None, "the relay needs at least one {0}", names=["domain"])
    if "@" not in postmaster:
        raise ConfigError("postmaster", f"{postmaster!r} is not an address")
    try:
        resolver = make_resolver(nameservers or [])
        sync_resolver = make_sync_resolver(nameservers or [])
    except NameserverError as exc:
        raise ConfigError("nameserver", str(exc)) from None
    try:
        nets = parse_networks(granted or [])
    except ValueError as exc:
        raise ConfigError("granted", str(exc)) from None
    domain = domains[0].lower().rstrip(".")
    ours = _self_addresses(listen_hosts, self_addresses or [])
    me = hostname or socket.getfqdn()
    keys = own_keys(domain, dkim_selectors, dkim_keys, arc_authserv_id or me)
    try:
        verifying_context(tls_ca_file)  # a CA file that cannot be used: one line, now
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls-ca-file", f"cannot use {tls_ca_file}: {exc}") from None
    schedule = Schedule.parse(quarantine_digest)
    if not spam_label or not all(33 <= ord(c) <= 126 and c != ":" for c in spam_label):
        raise ConfigError("spam-label", f"not a header field name: {spam_label!r}")
    if learn_db:
        check_learn_db(learn_db)
    if preflight is not None:
        preflight()
    root = Path(spool_dir)  # what is not mail (SRS, TLS, quarantine) stays here, shared
    try:
        Spool(root) if listen.index() else None  # worker 0 may not have made it yet
        spool = Spool(shard_path(root, listen.index()))  # this worker's own (shards.py)
        # One relay per spool: refuse now, before anything else is read or written.
        if lock:
            spool.lock()
    except SpoolLocked as exc:
        raise ConfigError(None, str(exc)) from None
    except (OSError, SpoolError) as exc:
        raise ConfigError(None, f"spool {spool_dir}: {exc}") from None
    try:
        # Every check that can fail comes before the users watcher, whose
        # loading logs a line: a refused start prints its one error line alone.
        secrets_ = _given_secrets(srs_secret, srs_secret_file)
        try:
            srs_db = SRSDatabase(root / "srs-db")
        except OSError as exc:
            raise ConfigError(None, f"SRS database in {root}: {exc}") from None
        more = tuple(
            d for d in dict.fromkeys(x.lower().rstrip(".") for x in [*domains[1:], *extra_domains])
            if d != domain
        )
        try:
            watcher = UsersWatcher(users_repo, domain, poll_interval=users_poll, extra_domains=more)
        except UsersRepoError as exc:
            raise ConfigError(None, f"users repository: {exc}") from None
        secrets_ = secrets_ or _own_secret(root)
    except BaseException:
        spool.unlock()  # a relay that does not run must not keep the spool
        raise
    srs = SRS(domain, secrets_, db=srs_db)
    tokens = FwdTokens(srs)
    router = Router(domains, postmaster, srs, lambda: watcher.db, nets, tokens)
    transport = TransportPolicy(resolver, root / "tls", ca_file=tls_ca_file,
                                mta_sts_port=mta_sts_port, mta_sts=mta_sts, dane=dane)
    deliverer = Deliverer(resolver, helo=me, port=smtp_port, ipv6=ipv6, self_addresses=ours,
                          transport=transport)
    scheduler = Scheduler(
        spool, deliver or deliverer.deliver, hostname=me, domain=domain,
        policy=policy or Policy(), expand=router.dsn_targets, own_keys=keys,
    )
    seal = ForwardSeal(keys.sealer, router.is_local_domain) if keys.sealer else None
    reporter = Reporter(
        transport.recorder.folder, resolver, transport.verify_ctx, submitter=domain,
        sender=postmaster, mail=spool_mail(spool, postmaster, keys, scheduler.submit))
    forwarding = Forwarding(
        domain=domain, server=arc_authserv_id or me, tokens=tokens, resolver=sync_resolver,
        signer=keys.signer, is_local=router.is_local_domain, enabled=from_rewrite,
        targets=lambda rcpt: [address for address, _ in router.dsn_targets(rcpt)],
    )
    learning = None
    if learn_db:
        learning = Learning(learn_db, arc_authserv_id or me, lambda: watcher.db,
                            router.is_local_domain)
    watch_spool(spool.path)  # poste_spool_messages, poste_spool_oldest_age_seconds
    try:
        quarantine = Quarantine(root)
    except OSError as exc:
        spool.unlock()
        raise ConfigError(None, f"quarantine in {root}: {exc}") from None
    spam = SpamPolicy(lambda: watcher.db, router.is_local_domain, spam_label)
    digest = Digest(quarantine, scheduler, router.dsn_targets, domain=domain, hostname=me,
                    schedule=schedule, keep_days=quarantine_days)
    return RelayParts(
        stage=RelayStage(max_received, seal, forwarding),
        hop=QueueHop(router, scheduler, spam, quarantine, learning),
        scheduler=scheduler,
        watcher=watcher,
        router=router,
        hostname=me,
        spool=spool,
        deliverer=deliverer,
        srs_db=srs_db,
        srs_max_age=srs.max_age_days,
        reporter=reporter if deliver is None else None,
        digest=digest,
    )


def _check_bindable(host: str, port: int) -> None:
    """Refuse a --listen address we cannot bind before the spool and users are loaded.

    The listener itself opens only after the spool is resumed (and logged),
    so a busy port found then would follow several log lines; found here it
    is the one line of a refused start.  (A port taken in between still
    fails cleanly, at the listener.)
    """
    if listen.worker() is not None:
        return  # the parent binds it once for every worker (smtp/listen.py)
    try:
        socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError("listen", f"cannot resolve {host!r}: {exc}") from None
    try:
        for sock in listen.bind_tcp(host, port):  # as the listener will bind
            sock.close()
    except OSError as exc:
        raise StartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _self_addresses(listen_hosts: Sequence[str], extra: list[str]) -> list[str]:
    """Our own IPs: --self-address and the --listen addresses (a name is resolved)."""
    found: list[str] = []
    for text in extra:
        try:
            found.append(str(ipaddress.ip_address(text.strip())))
        except ValueError:
            raise ConfigError("self-address", f"{text!r} is not an IP address") from None
    for where in listen_hosts:
        host = where.strip("[]")
        if not host:
            continue
        try:
            found.append(str(ipaddress.ip_address(host)))
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            except OSError as exc:
                raise ConfigError("listen", f"cannot resolve {host!r}: {exc}") from None
            found.extend(str(info[4][0]) for info in infos)
    return found


def policy_of(values: Values) -> Policy:
    """The scheduler's policy; the inflow backlog is this worker's share of the
    whole relay's, so that N workers together hold no more mail than one did (measured:
    two workers with 50 each let the spool reach 122 mails at 50 sessions)."""
    retry_min = float(values["retry-min"])
    me = listen.worker()
    return Policy(
        inflow_backlog=max(1, INFLOW_BACKLOG // (me[1] if me else 1)),
        retry_min=retry_min,
        retry_max=max(float(values["retry-max"]), retry_min),
        lifetime=float(values["lifetime"]),
        warn_after=float(values["warn-after"]),
        max_per_domain=int(values["domain-concurrency"]),
        rescan=float(values["queue-rescan"]),
    )


def relay_of(values: Values, **more: Any) -> RelayParts:
    """`build_relay` from the settings; `more`: what only the process around it knows
    (listen_hosts, preflight; in `poste up` extra_domains, deliver, lock)."""
    return build_relay(
        domains=[d.lower().rstrip(".") for d in values["domain"]],
        postmaster=str(values["postmaster"]),
        users_repo=values["users"],
        spool_dir=values["spool"],
        nameservers=values["nameserver"],
        smtp_port=int(values["smtp-port"]),
        granted=values["granted"],
        srs_secret=values["srs-secret"],
        srs_secret_file=values["srs-secret-file"],
        hostname=values["hostname"],
        policy=policy_of(values),
        users_poll=float(values["users-poll"]),
        max_received=int(values["max-received"]),
        ipv6=not values["no-ipv6"],
        self_addresses=values["self-address"],
        dkim_selectors=values["dkim-selector"],
        dkim_keys=values["dkim-key"],
        arc_authserv_id=values["arc-authserv-id"],
        tls_ca_file=values["tls-ca-file"],
        mta_sts=not values["no-mta-sts"],
        dane=not values["no-dane"],
        mta_sts_port=int(values["mta-sts-port"]),
        from_rewrite=not values["no-from-rewrite"],
        spam_label=str(values["spam-label"]),
        quarantine_digest=str(values["quarantine-digest"]),
        quarantine_days=int(values["quarantine-days"]),
        learn_db=values["learn-db"],
        **more,
    )


def listeners(parts: RelayParts, listen: str | None, local_socket: str | None) -> list[SMTPService]:
    """`listen`: the inbound hop's way in (local recipients only, unless --granted);
    `local-socket`: our own sending path's, which may relay anywhere (see hostport)."""
    out = []
    if listen:
        host, port = parse_hostport(listen, 25, "listen")
        out.append(SMTPService(parts.stage, parts.hop, host=host, port=port,
                               hostname=parts.hostname))
    if local_socket:
        out.append(SMTPService(parts.stage, parts.hop, host=os.path.abspath(local_socket),
                               port=0, hostname=parts.hostname))
    return out


def build(values: Values) -> Parts:
    """`poste relay`: its listeners in front of the queue."""
    host, port = parse_hostport(values["listen"], 25, "listen")
    preflight = None if host.startswith("/") else (lambda: _check_bindable(host, port))
    parts = relay_of(values, listen_hosts=[] if host.startswith("/") else [host],
                     preflight=preflight)
    return parts.runtime(listeners(parts, values["listen"], values["local-socket"]))
