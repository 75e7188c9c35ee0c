"""Login policy: failed logins slow down then lock out, checks are bounded and off the loop."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from poste.services.submission import logins
from poste.services.submission.logins import Authenticator, LoginThrottle, may_send_as, network_key
from poste.services.submission.service import AUTH_INVALID, AUTH_LOCKED, NOT_YOURS, SubmissionStage
from poste.smtp.stage import Envelope
from poste.users import passwords, store
from poste.users.repo import UsersWatcher, load_snapshot


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delay_grows_then_locks_out_then_expires() -> None:
    clock = Clock()
    t = LoginThrottle(
        base_delay=0.5, max_delay=4.0, max_failures=6, window=600, lockout=900, clock=clock
    )
    delays = [t.failure("192.0.2.1") for _ in range(5)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert t.locked_for("192.0.2.1") == 0
    assert t.failures("192.0.2.1") == 5
    t.failure("192.0.2.1")
    assert t.locked_for("192.0.2.1") == 900
    assert t.locked_for("192.0.2.2") == 0  # per client
    t.success("192.0.2.1")  # a success does not lift a lockout
    clock.now += 899
    assert t.locked_for("192.0.2.1") > 0
    clock.now += 2
    assert t.locked_for("192.0.2.1") == 0
    assert t.failure("192.0.2.1") == 0.5  # counting starts afresh
    assert list(t.delays)[-1] == 0.5 and t.lockouts_total == 1 and t.failures_total == 7


def test_failures_expire_and_success_resets() -> None:
    clock = Clock()
    t = LoginThrottle(base_delay=1, max_delay=60, max_failures=10, window=60, clock=clock)
    t.failure("198.51.100.7")
    t.failure("198.51.100.7")
    clock.now += 61
    assert t.failures("198.51.100.7") == 0
    assert t.failure("198.51.100.7") == 1
    t.success("198.51.100.7")
    assert t.failures("198.51.100.7") == 0


def test_ipv6_counts_per_64_and_memory_is_bounded() -> None:
    assert network_key("2001:db8:1:2::5") == network_key("2001:db8:1:2:ffff::1")
    assert network_key("2001:db8:1:3::5") != network_key("2001:db8:1:2::5")
    assert network_key("::ffff:192.0.2.1") == "192.0.2.1"
    t = LoginThrottle(max_tracked=100)
    for i in range(1000):
        t.failure(f"10.0.{i // 256}.{i % 256}")
    assert len(t._records) <= 100


def make_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "users"
    for local, pw, extra in [
        ("alice", passwords.blake2b_hex("pw-a"), {"aliases": ["al", "alice@other.test"]}),
        ("bob", passwords.hash_password("pw-b"), {}),
        ("list", "", {}),
    ]:
        body = {"targets": ["x@ext.test"], "password": pw, "insecure": False} | extra
        store.commit_file(repo, local, json.dumps(body).encode(), local, create=True)
    store.commit_file(repo, "other.test/carol", b'{"targets": [], "password": ""}', "carol")
    return repo


def test_senders_a_user_may_use(tmp_path: Path) -> None:
    db = load_snapshot(make_repo(tmp_path), "our.test")
    for login in ("alice", "alice@our.test", "ALICE@our.test", "al@our.test"):
        assert may_send_as(db, login, "alice@our.test")
        assert may_send_as(db, login, "al@our.test")
        assert may_send_as(db, login, "alice+tag@our.test")
        assert may_send_as(db, login, "alice@other.test")
        assert not may_send_as(db, login, "bob@our.test")
        assert not may_send_as(db, login, "alice@ext.test")
        assert not may_send_as(db, login, "")
    assert not may_send_as(db, "alice+tag", "alice@our.test")  # a +tag is not a login
    assert not may_send_as(db, "nobody", "nobody@our.test")


async def test_stage_authenticates_upgrades_and_checks_sender(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    watcher = UsersWatcher(repo, "our.test")
    auth = Authenticator(watcher, throttle=LoginThrottle(base_delay=0.001))
    stage = SubmissionStage(watcher, auth)
    env = Envelope(peer_ip="192.0.2.9")
    assert await stage.authenticate(env, "alice", "nope") == AUTH_INVALID
    assert await stage.authenticate(env, "nobody", "pw-a") == AUTH_INVALID
    assert await stage.authenticate(env, "list", "") == AUTH_INVALID  # no password: no login
    assert await stage.authenticate(env, "alice", "pw-a") is None
    await auth.drain()
    assert auth.upgrades == 1
    alice = watcher.db.lookup("alice")  # the watcher took our own commit
    assert alice is not None and alice.password is not None
    assert alice.password.startswith("$argon2id$") and alice.aliases
    assert await stage.authenticate(env, "alice@our.test", "pw-a") is None
    await auth.drain()
    assert auth.upgrades == 1  # argon2id needs no upgrade
    env.auth_user = "alice"
    assert await stage.on_mail(env, "alice@our.test") is None
    assert await stage.on_mail(env, "bob@our.test") == NOT_YOURS
    assert (await stage.on_mail(env, "")) is not None
    env.auth_user = None
    reply = await stage.on_mail(env, "alice@our.test")
    assert reply is not None and reply.code == 530


async def test_lockout_skips_the_password_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher = UsersWatcher(make_repo(tmp_path), "our.test")
    auth = Authenticator(watcher, throttle=LoginThrottle(base_delay=0, max_failures=2))
    stage = SubmissionStage(watcher, auth)
    env = Envelope(peer_ip="203.0.113.5")
    assert await stage.authenticate(env, "bob", "x") == AUTH_INVALID
    assert await stage.authenticate(env, "bob", "x") == AUTH_INVALID
    checked: list[str] = []
    monkeypatch.setattr(logins.passwords, "verify", lambda s, p: checked.append(p) or True)
    assert await stage.authenticate(env, "bob", "pw-b") == AUTH_LOCKED
    assert checked == []


async def test_checks_run_off_the_loop_with_bounded_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher = UsersWatcher(make_repo(tmp_path), "our.test")
    auth = Authenticator(watcher, throttle=LoginThrottle(base_delay=0), concurrency=3)
    running, peak = 0, 0
    lock = threading.Lock()
    loop_thread = threading.get_ident()

    def slow_verify(stored: str | None, password: str) -> bool:
        nonlocal running, peak
        assert threading.get_ident() != loop_thread
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return False

    monkeypatch.setattr(logins.passwords, "verify", slow_verify)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    tick_task = asyncio.create_task(ticker())
    results = await asyncio.gather(*(auth.check(f"10.1.0.{i}", "bob", "x") for i in range(12)))
    tick_task.cancel()
    assert all(user is None for user, _ in results)
    assert peak == 3
    assert ticks > 1  # the loop kept running while passwords were checked
