"""The AUTH brake: password guessing that cannot be outrun (issue 15, item 5).

Every AUTH goes through four gates before its password is checked:

- **One check at a time per client.**  A client (an IPv4 address, or the
  /64 of an IPv6 address: one host owns a whole /64) has at most one
  password check in flight; a few more may wait their turn, the rest get 454
  at once.  Parallel connections buy an attacker nothing.
- **Budgets.**  Failures are counted per client (`addr_budget`), per network
  (IPv4 /24, IPv6 /48: `net_budget`) and per account (`account_budget`),
  within `window` seconds.  A client or network over its budget is refused
  (454, no check) for `lockout` seconds.
- **The account's attackers, not the account.**  An account over its budget
  is "under attack": from then on, a client that has failed against it
  within the window is refused for that account, while a client with no
  failure against it still gets its password checked.  So the real user,
  from a clean address, still logs in; each attacking address gets one
  guess.  A client where this account logged in before (a *known* pair,
  remembered for `trust` seconds) keeps a small budget of its own
  (`pair_budget`) even when its address or network is locked out: a user
  behind the attacker's NAT still logs in.
- **Counted before it is checked.**  The failure is charged to every counter
  before the check starts and refunded only if the password was right, so
  checks in flight count against the budgets.  A success never resets a
  counter (an attacker with an account of their own could otherwise wash
  their address clean between guesses).

Every failed answer is held until `delay(n)` after its check began (n: the
client's failures in the window, so it depends on neither the account nor
the hash), and never sooner than 1.25 x the 90th percentile of the recent
checks' durations, so the padding still binds when the machine is loaded and
a check takes longer than `delay(n)`.  The caller always runs exactly one
argon2id check (see logins.Authenticator), so a failure costs the same time
whatever the account.

The counters are persisted in `state_file` (JSON, written to a temporary
file, fsynced, renamed), by one writer task off the event loop, after every
change: a restart keeps them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poste.smtp.address import ip_of

log = logging.getLogger("poste.submission")

STATE_VERSION = 1
# A known (account, client) pair's last success is rewritten at most this often: its trust
# lasts 30 days, and a rewrite per login would be a state file write per login.
KNOWN_REFRESH = 3600.0


def network_key(ip: str) -> str:
    """The client: an IPv4 address, or the /64 of an IPv6 address (one host owns a /64)."""
    addr = ip_of(ip)
    if addr is None:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def wide_network_key(ip: str) -> str:
    """The client's network: the IPv4 /24, or the IPv6 /48."""
    addr = ip_of(ip)
    if addr is None:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 48), strict=False))
    return str(ipaddress.IPv4Network((addr, 24), strict=False))


@dataclass
class _Entry:
    failures: list[float] = field(default_factory=list)
    locked_until: float = 0.0


class _Counter:
    """Failures per key within a window; over `budget` the key is locked for `lockout`."""

    def __init__(self, budget: int, window: float, lockout: float, max_tracked: int) -> None:
        self.budget = budget
        self.window = window
        self.lockout = lockout
        self.max_tracked = max_tracked
        self.entries: dict[str, _Entry] = {}

    def _fresh(self, entry: _Entry, now: float) -> _Entry:
        cut = now - self.window
        if entry.failures and entry.failures[0] < cut:
            entry.failures = [t for t in entry.failures if t >= cut]
        return entry

    def count(self, key: str, now: float) -> int:
        entry = self.entries.get(key)
        return 0 if entry is None else len(self._fresh(entry, now).failures)

    def locked_for(self, key: str, now: float) -> float:
        """Seconds `key` stays refused; while over budget (pending checks too) at least 1."""
        entry = self.entries.get(key)
        if entry is None:
            return 0.0
        left = max(0.0, entry.locked_until - now)
        if len(self._fresh(entry, now).failures) >= self.budget:
            left = max(left, 1.0)
        return left

    def add(self, key: str, now: float) -> None:
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.max_tracked:
                self.prune(now)
            entry = self.entries[key] = _Entry()
        self._fresh(entry, now).failures.append(now)

    def remove(self, key: str, stamp: float) -> None:
        entry = self.entries.get(key)
        if entry is not None and stamp in entry.failures:
            entry.failures.remove(stamp)

    def confirm(self, key: str, now: float) -> bool:
        """After a failure was confirmed: lock `key` if it reached its budget (True then)."""
        entry = self.entries.get(key)
        if entry is None or len(self._fresh(entry, now).failures) < self.budget:
            return False
        entry.locked_until = max(entry.locked_until, now + self.lockout)
        return True

    def prune(self, now: float) -> None:
        for key in [
            k
            for k, e in self.entries.items()
            if not self._fresh(e, now).failures and e.locked_until <= now
        ]:
            del self.entries[key]
        while len(self.entries) >= self.max_tracked:  # still full: forget the oldest
            del self.entries[next(iter(self.entries))]

    def dump(self, now: float) -> dict[str, Any]:
        self.prune(now)
        return {
            k: {"failures": [round(t, 3) for t in e.failures], "locked_until": e.locked_until}
            for k, e in self.entries.items()
        }

    def load(self, data: object, now: float) -> None:
        if not isinstance(data, dict):
            return
        for key, value in data.items():
            if not isinstance(key, str) or not isinstance(value, dict):
                continue
            stamps = value.get("failures", [])
            locked = value.get("locked_until", 0.0)
            if not isinstance(stamps, list) or not isinstance(locked, (int, float)):
                continue
            failures = sorted(float(t) for t in stamps if isinstance(t, (int, float)))
            self.entries[key] = _Entry(failures, float(locked))
        self.prune(now)


@dataclass
class Ticket:
    """One AUTH that may be checked: its keys and the failure charged in advance."""

    ip: str
    account: str
    addr: str
    net: str
    pair: str
    started: float  # the brake's clock when the check began
    stamp: float  # the failure charged to every counter (refunded on success)
    known: bool  # a pair that logged in before, within its own budget


class Refused(Exception):
    """The AUTH is answered 454 without a password check; `reason` says which gate."""

    def __init__(self, reason: str, seconds: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.seconds = seconds


class AuthBrake:
    """The four gates (module docstring) and their persisted counters."""

    def __init__(
        self,
        *,
        addr_budget: int = 10,
        net_budget: int = 30,
        account_budget: int = 10,
        pair_budget: int = 3,
        base_delay: float = 0.5,
        max_delay: float = 8.0,
        window: float = 900.0,
        lockout: float = 900.0,
        trust: float = 30 * 86400.0,
        max_waiting: int = 2,
        state_file: str | Path | None = None,
        clock: Callable[[], float] = time.time,
        max_tracked: int = 100_000,
    ) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.trust = trust
        self.max_waiting = max_waiting
        self.clock = clock
        self.max_tracked = max_tracked
        self.addr = _Counter(addr_budget, window, lockout, max_tracked)
        self.net = _Counter(net_budget, window, lockout, max_tracked)
        self.account = _Counter(account_budget, window, lockout, max_tracked)
        self.pair = _Counter(pair_budget, window, lockout, max_tracked)
        self.known: dict[str, float] = {}  # pair -> last successful login
        self._gates: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self.state_file = Path(state_file) if state_file is not None else None
        self._dirty = False
        self._writer: asyncio.Task[None] | None = None
        self._written = b""  # the state last written (without its time): unchanged, not rewritten
        self.failures_total = 0
        self.refusals_total = 0
        self.lockouts_total = 0
        self.delays: list[float] = []  # the last delays handed out (operators, tests)
        self._durations: deque[float] = deque(maxlen=16)  # the last checks' own durations
        if self.state_file is not None:
            self._load()

    @property
    def addr_budget(self) -> int:
        return self.addr.budget

    # -- the in-flight gate ------------------------------------------------

    def gate(self, ip: str) -> _Gate:
        """`async with brake.gate(ip):` one check at a time per client; Refused when crowded."""
        return _Gate(self, network_key(ip))

    # -- the budgets -------------------------------------------------------

    def _keys(self, ip: str, account: str) -> tuple[str, str, str]:
        addr = network_key(ip)
        return addr, wide_network_key(ip), f"{account}|{addr}"

    def _known(self, pair: str, now: float) -> bool:
        seen = self.known.get(pair)
        if seen is None:
            return False
        if seen < now - self.trust:
            del self.known[pair]
            return False
        return self.pair.count(pair, now) < self.pair.budget

    def admit(self, ip: str, account: str) -> Ticket:
        """Raise Refused, or charge a failure in advance and return the ticket for the check."""
        now = self.clock()
        addr, net, pair = self._keys(ip, account)
        known = self._known(pair, now)
        if not known:
            for reason, counter, key in (("address", self.addr, addr), ("network", self.net, net)):
                left = counter.locked_for(key, now)
                if left > 0:
                    self.refusals_total += 1
                    raise Refused(reason, left)
            if self.account.locked_for(account, now) > 0 and self.pair.count(pair, now) > 0:
                self.refusals_total += 1
                raise Refused("account", self.account.window)
        for counter, key in (
            (self.addr, addr),
            (self.net, net),
            (self.account, account),
            (self.pair, pair),
        ):
            counter.add(key, now)
        self._changed()
        return Ticket(ip, account, addr, net, pair, now, now, known)

    def success(self, ticket: Ticket) -> None:
        """The password was right: refund the advance failure, remember the pair."""
        for counter, key in (
            (self.addr, ticket.addr),
            (self.net, ticket.net),
            (self.account, ticket.account),
            (self.pair, ticket.pair),
        ):
            counter.remove(key, ticket.stamp)
        if len(self.known) >= self.max_tracked:
            now = self.clock()
            for pair in [p for p, t in self.known.items() if t < now - self.trust]:
                del self.known[pair]
            while len(self.known) >= self.max_tracked:
                del self.known[next(iter(self.known))]
        now = self.clock()
        seen = self.known.get(ticket.pair)
        if seen is None or now - seen >= KNOWN_REFRESH:  # else the file need not change
            self.known[ticket.pair] = now
        self._changed()

    def observe(self, seconds: float) -> None:
        """How long one password check took (every check, whatever its outcome)."""
        self._durations.append(seconds)

    def floor(self) -> float:
        """No failure is answered sooner after its check began: above what checks take now."""
        if len(self._durations) < 4:
            return 0.0
        ordered = sorted(self._durations)
        return 1.25 * ordered[int(0.9 * (len(ordered) - 1))]

    def failure(self, ticket: Ticket, began: float | None = None) -> tuple[int, float, list[str]]:
        """The password was wrong: (client failures, seconds until the answer, what locked).

        `began`: when the check itself started (after waiting for a thread), on the
        brake's clock; default when the ticket was issued.
        """
        now = self.clock()
        self.failures_total += 1
        locked = [
            name
            for name, counter, key in (
                ("address", self.addr, ticket.addr),
                ("network", self.net, ticket.net),
                ("account", self.account, ticket.account),
            )
            if counter.confirm(key, now)
        ]
        self.pair.confirm(ticket.pair, now)
        if locked:
            self.lockouts_total += 1
        n = self.addr.count(ticket.addr, now)
        delay = min(self.max_delay, self.base_delay * 2 ** max(0, n - 1))
        self.delays = [*self.delays[-999:], delay]
        self._changed()
        start = ticket.started if began is None else began
        return n, max(0.0, start + max(delay, self.floor()) - now), locked

    def failures(self, ip: str) -> int:
        return self.addr.count(network_key(ip), self.clock())

    def locked_for(self, ip: str) -> float:
        """Seconds this client (or its network) stays refused (0: not locked)."""
        now = self.clock()
        addr, net, _ = self._keys(ip, "")
        return max(self.addr.locked_for(addr, now), self.net.locked_for(net, now))

    # -- persistence -------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        now = self.clock()
        for pair in [p for p, t in self.known.items() if t < now - self.trust]:
            del self.known[pair]
        return {
            "version": STATE_VERSION,
            "saved": now,
            "address": self.addr.dump(now),
            "network": self.net.dump(now),
            "account": self.account.dump(now),
            "pair": self.pair.dump(now),
            "known": dict(self.known),
        }

    def _load(self) -> None:
        assert self.state_file is not None
        try:
            data = json.loads(self.state_file.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("auth state %s unreadable, starting afresh: %s", self.state_file, exc)
            return
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            log.error("auth state %s: unknown format, starting afresh", self.state_file)
            return
        now = self.clock()
        for name, counter in (
            ("address", self.addr),
            ("network", self.net),
            ("account", self.account),
            ("pair", self.pair),
        ):
            counter.load(data.get(name), now)
        known = data.get("known")
        if isinstance(known, dict):
            self.known = {
                k: float(v)
                for k, v in known.items()
                if isinstance(k, str) and isinstance(v, (int, float)) and v >= now - self.trust
            }
        log.info(
            "auth state %s: %d clients, %d accounts with recent failures",
            self.state_file,
            len(self.addr.entries),
            len(self.account.entries),
        )

    def _changed(self) -> None:
        if self.state_file is None:
            return
        self._dirty = True
        if self._writer is None or self._writer.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous caller): write now
                self._dirty = False
                _write_atomic(self.state_file, self._serialize())
                return
            self._writer = loop.create_task(self._write_loop())

    def _serialize(self) -> bytes:
        return json.dumps(self.dump(), separators=(",", ":")).encode()

    async def _write_loop(self) -> None:
        """Write the state after each change, unless it came back to what is on disk: a
        remembered login of a known pair charges a failure and refunds it in the same
        moment (issue 16: a write and an fsync per login otherwise, 4% of `poste up`'s
        CPU at one mail per session)."""
        assert self.state_file is not None
        while self._dirty:
            self._dirty = False
            body = self.dump()
            saved = body.pop("saved")
            state = json.dumps(body, separators=(",", ":")).encode()
            if state == self._written:
                continue
            data = state[:-1] + b',"saved":' + json.dumps(saved).encode() + b"}"
            try:
                await asyncio.to_thread(_write_atomic, self.state_file, data)
            except OSError as exc:
                log.error("auth state %s not saved: %s", self.state_file, exc)
                return
            self._written = state

    async def flush(self) -> None:
        """Wait until every change so far is on disk (tests, shutdown)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)


class _Gate:
    def __init__(self, brake: AuthBrake, key: str) -> None:
        self.brake = brake
        self.key = key

    async def __aenter__(self) -> None:
        gates = self.brake._gates
        lock, users = gates.get(self.key) or gates.setdefault(self.key, (asyncio.Lock(), [0]))
        if users[0] > self.brake.max_waiting:  # one running and max_waiting queued already
            self.brake.refusals_total += 1
            raise Refused("busy")
        users[0] += 1
        try:
            await lock.acquire()
        except BaseException:
            self._leave(users)
            raise

    async def __aexit__(self, *exc: object) -> None:
        lock, users = self.brake._gates[self.key]
        lock.release()
        self._leave(users)

    def _leave(self, users: list[int]) -> None:
        users[0] -= 1
        if users[0] == 0:
            self.brake._gates.pop(self.key, None)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
