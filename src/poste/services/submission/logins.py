"""Checking logins against the users repository, for the submission server.

The password check is slow on purpose (argon2id: ~64 MiB and tens of ms),
so it runs in threads behind a semaphore: a burst of logins cannot stall the
event loop or take all the memory.  Failed logins are slowed per client
network, growing with each failure, and past a threshold that network is
refused for a while without checking anything (so brute force costs the
attacker time and us nothing).  A successful login with ptt's unsalted
BLAKE2B hash rewrites it as argon2id in the repository, in the background.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from poste.users import passwords, store
from poste.users.repo import User, UsersDB, UsersRepoError, UsersWatcher

log = logging.getLogger("poste.submission")


def network_key(ip: str) -> str:
    """IPv4 address, or the /64 of an IPv6 address (one host owns a whole /64)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr.ipv4_mapped or addr) if isinstance(addr, ipaddress.IPv6Address) else str(addr)


@dataclass
class _Record:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


class LoginThrottle:
    """Per-network failed-login accounting: a growing delay, then a lockout.

    The n-th failure within `window` seconds is answered after
    `min(max_delay, base_delay * 2**(n-1))` seconds; the `max_failures`-th
    locks the network out for `lockout` seconds.  Every delay it hands out is
    recorded in `delays` (the last 1000), so operators and tests can see it.
    """

    def __init__(
        self,
        *,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        max_failures: int = 10,
        window: float = 900.0,
        lockout: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = 100_000,
    ) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self.clock = clock
        self.max_tracked = max_tracked
        self._records: dict[str, _Record] = {}
        self.delays: deque[float] = deque(maxlen=1000)
        self.failures_total = 0
        self.lockouts_total = 0

    def _record(self, ip: str, create: bool) -> _Record | None:
        key = network_key(ip)
        record = self._records.get(key)
        if record is None and create:
            if len(self._records) >= self.max_tracked:
                self._prune()
            record = self._records[key] = _Record()
        return record

    def _prune(self) -> None:
        now = self.clock()
        for key in [k for k, r in self._records.items() if not self._active(r, now)]:
            del self._records[key]
        while len(self._records) >= self.max_tracked:  # still full: forget the oldest
            del self._records[next(iter(self._records))]

    def _active(self, record: _Record, now: float) -> bool:
        while record.failures and record.failures[0] < now - self.window:
            record.failures.popleft()
        return bool(record.failures) or record.locked_until > now

    def failures(self, ip: str) -> int:
        record = self._record(ip, create=False)
        if record is None:
            return 0
        self._active(record, self.clock())
        return len(record.failures)

    def locked_for(self, ip: str) -> float:
        """Seconds this client's network stays refused (0: not locked)."""
        record = self._record(ip, create=False)
        if record is None:
            return 0.0
        return max(0.0, record.locked_until - self.clock())

    def failure(self, ip: str) -> float:
        """Record a failed login; returns the delay to wait before answering it."""
        now = self.clock()
        record = self._record(ip, create=True)
        assert record is not None
        self._active(record, now)
        record.failures.append(now)
        self.failures_total += 1
        n = len(record.failures)
        if n >= self.max_failures:
            record.locked_until = now + self.lockout
            record.failures.clear()
            self.lockouts_total += 1
        delay = min(self.max_delay, self.base_delay * 2 ** (n - 1))
        self.delays.append(delay)
        return float(delay)

    def success(self, ip: str) -> None:
        record = self._record(ip, create=False)
        if record is not None and record.locked_until <= self.clock():
            del self._records[network_key(ip)]


def resolve_login(db: UsersDB, login: str) -> User | None:
    """The user a login names: full address, alias, or bare local part of the default domain.

    `user+tag` is not a login (it is an address to receive at).
    """
    user = db.lookup(login)
    if user is None:
        return None
    typed = login.strip().lower()
    if "@" not in typed:
        typed = f"{typed}@{db.default_domain}"
    if typed in (a.lower() for a in user.addresses):
        return user
    return None


def may_send_as(db: UsersDB, login: str, sender: str) -> bool:
    """Whether the logged-in user owns `sender`: their address, an alias, or one with a +tag."""
    user = resolve_login(db, login)
    if user is None or not sender:
        return False
    owner = db.lookup(sender)
    return owner is not None and owner.path == user.path


class Authenticator:
    """Checks logins off the event loop, throttles failures, upgrades old hashes."""

    def __init__(
        self,
        watcher: UsersWatcher,
        *,
        throttle: LoginThrottle | None = None,
        concurrency: int = 4,
        upgrade: bool = True,
    ) -> None:
        self.watcher = watcher
        self.throttle = throttle or LoginThrottle()
        self.upgrade = upgrade
        self._sem = asyncio.Semaphore(concurrency)
        # Unknown users cost an argon2id check too, so timing does not tell who exists.
        self._dummy = passwords.hash_password(secrets.token_hex(16))
        self._upgrading: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.upgrades = 0

    async def _verify(self, stored: str | None, password: str) -> bool:
        async with self._sem:
            return await asyncio.to_thread(passwords.verify, stored, password)

    async def check(self, ip: str, login: str, password: str) -> tuple[User | None, str | None]:
        """(user, None) on success, or (None, reason) where reason is "locked" or "invalid".

        A failure has already waited its delay when this returns.
        """
        locked = self.throttle.locked_for(ip)
        if locked > 0:
            log.warning("auth refused ip=%s login=%r: locked out for %.0fs", ip, login, locked)
            return None, "locked"
        user = resolve_login(self.watcher.db, login)
        stored = user.password if user is not None else None
        ok = await self._verify(stored or self._dummy, password)
        if ok and user is not None and stored:
            self.throttle.success(ip)
            log.info("auth ok ip=%s user=%s", ip, user.address)
            if self.upgrade and passwords.needs_upgrade(stored):
                self._start_upgrade(user, stored, password)
            return user, None
        failures = self.throttle.failures(ip) + 1
        delay = self.throttle.failure(ip)
        locked_now = self.throttle.locked_for(ip) > 0
        log.warning(
            "auth failed ip=%s login=%r failures=%d delay=%.2fs%s",
            ip,
            login,
            failures,
            delay,
            " (locked out)" if locked_now else "",
        )
        await asyncio.sleep(delay)
        return None, "invalid"

    def _start_upgrade(self, user: User, stored: str, password: str) -> None:
        if user.path in self._upgrading:
            return
        self._upgrading.add(user.path)
        task = asyncio.get_running_loop().create_task(self._upgrade(user, stored, password))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _upgrade(self, user: User, stored: str, password: str) -> None:
        try:
            async with self._sem:
                new_hash = await asyncio.to_thread(passwords.hash_password, password)
            commit = await asyncio.to_thread(self._commit_upgrade, user, stored, new_hash)
            if commit is None:
                log.info("hash upgrade for %s skipped: the entry changed meanwhile", user.address)
                return
            self.upgrades += 1
            log.info("hash upgrade for %s: argon2id (commit %s)", user.address, commit[:12])
            await self.watcher.areload()
        except (UsersRepoError, OSError) as exc:
            log.error("hash upgrade for %s failed: %s", user.address, exc)
        except Exception:
            log.exception("hash upgrade for %s failed", user.address)
        finally:
            self._upgrading.discard(user.path)

    def _commit_upgrade(self, user: User, stored: str, new_hash: str) -> str | None:
        def transform(current: bytes | None) -> bytes | store._Skip:
            if current is None:
                return store.SKIP
            try:
                obj = json.loads(current)
            except ValueError:
                return store.SKIP
            if not isinstance(obj, dict) or obj.get("password") != stored:
                return store.SKIP
            obj["password"] = new_hash  # every other field is kept as it was
            return (json.dumps(obj, indent=2) + "\n").encode("utf-8")

        commit = store.update_file(
            self.watcher.repo_path,
            user.path,
            transform,
            f"users: upgrade {user.address}'s password hash to argon2id",
        )
        if commit is not None and store.has_remote(self.watcher.repo_path):
            try:
                store.push(self.watcher.repo_path)
            except UsersRepoError as exc:
                log.warning("hash upgrade committed locally; %s", exc)
        return commit

    async def drain(self) -> None:
        """Wait for background upgrades (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
