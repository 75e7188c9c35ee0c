"""Login policy: failed logins slow down then lock out, checks are bounded and off the loop."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from poste.services.submission import logins
from poste.services.submission.brake import AuthBrake, Refused, network_key, wide_network_key
from poste.services.submission.logins import Authenticator, may_send_as
from poste.services.submission.service import AUTH_INVALID, AUTH_LOCKED, NOT_YOURS, SubmissionStage
from poste.smtp.stage import Envelope
from poste.users import passwords, store
from poste.users.repo import UsersWatcher, load_snapshot


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def fail(brake: AuthBrake, ip: str, account: str = "bob") -> float:
    """One wrong password: admitted, charged, confirmed; returns the answer delay."""
    ticket = brake.admit(ip, account)
    return brake.failure(ticket)[1]


def test_delay_grows_then_locks_out_then_expires() -> None:
    clock = Clock()
    b = AuthBrake(
        base_delay=0.5, max_delay=4.0, addr_budget=6, window=600, lockout=900, clock=clock
    )
    delays = [fail(b, "192.0.2.1", f"user{i}") for i in range(5)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert b.locked_for("192.0.2.1") == 0
    assert b.failures("192.0.2.1") == 5
    fail(b, "192.0.2.1", "user5")
    assert b.locked_for("192.0.2.1") == 900
    assert b.locked_for("192.0.2.2") == 0  # per client
    with pytest.raises(Refused) as refused:
        b.admit("192.0.2.1", "anyone")
    assert refused.value.reason == "address"
    clock.now += 899
    assert b.locked_for("192.0.2.1") > 0
    clock.now += 2
    assert b.locked_for("192.0.2.1") == 0
    assert fail(b, "192.0.2.1") == 0.5  # counting starts afresh
    assert b.lockouts_total == 1 and b.failures_total == 7


def test_failures_are_padded_above_what_checks_take_now() -> None:
    clock = Clock()
    b = AuthBrake(base_delay=0.5, max_delay=0.5, clock=clock)
    ticket = b.admit("192.0.2.1", "bob")
    assert b.failure(ticket)[1] == 0.5  # no history yet: the configured delay
    for took in (0.2, 2.0, 2.0, 2.0):  # the machine got slow
        b.observe(took)
    ticket = b.admit("192.0.2.2", "bob")
    clock.now += 2.0  # this check took 2 s
    assert b.failure(ticket, began=ticket.started)[1] == pytest.approx(0.5)  # 1.25 * 2 s - 2 s


def test_a_success_refunds_its_own_charge_only() -> None:
    clock = Clock()
    b = AuthBrake(base_delay=1, max_delay=60, addr_budget=3, window=60, clock=clock)
    fail(b, "198.51.100.7")
    fail(b, "198.51.100.7")
    b.success(b.admit("198.51.100.7", "mallory"))  # the attacker's own account
    assert b.failures("198.51.100.7") == 2  # not washed clean
    clock.now += 61
    assert b.failures("198.51.100.7") == 0


def test_checks_in_flight_count_against_the_budgets() -> None:
    b = AuthBrake(addr_budget=100, net_budget=3, clock=Clock())
    tickets = [b.admit(f"203.0.113.{i}", "bob") for i in range(3)]  # none answered yet
    with pytest.raises(Refused) as refused:
        b.admit("203.0.113.99", "bob")
    assert refused.value.reason == "network"
    b.success(tickets[0])
    b.admit("203.0.113.99", "bob")  # the refund made room


def test_an_account_under_attack_refuses_its_attackers_not_its_user() -> None:
    clock = Clock()
    b = AuthBrake(addr_budget=10, net_budget=1000, account_budget=5, clock=clock)
    b.success(b.admit("192.0.2.50", "alice"))  # alice's usual address: a known pair
    for i in range(5):
        fail(b, f"10.{i}.0.1", "alice")
    for i in range(5):  # each attacker address has failed once against alice: refused
        with pytest.raises(Refused) as refused:
            b.admit(f"10.{i}.0.1", "alice")
        assert refused.value.reason == "account"
        fail(b, f"10.{i}.0.1", "carol")  # other accounts are still theirs to try
    b.success(b.admit("192.0.2.99", "alice"))  # a clean address: checked
    fail(b, "10.9.0.1", "alice")  # a new attacker gets one guess
    with pytest.raises(Refused):
        b.admit("10.9.0.1", "alice")
    # alice's known address keeps a budget of its own, even once its address is locked out
    for j in range(10):
        fail(b, "192.0.2.50", f"x{j}")
    with pytest.raises(Refused):
        b.admit("192.0.2.50", "y")
    b.success(b.admit("192.0.2.50", "alice"))
    for _ in range(b.pair.budget):
        fail(b, "192.0.2.50", "alice")
    with pytest.raises(Refused):
        b.admit("192.0.2.50", "alice")


def test_ipv6_counts_per_64_and_48_and_memory_is_bounded() -> None:
    assert network_key("2001:db8:1:2::5") == network_key("2001:db8:1:2:ffff::1")
    assert network_key("2001:db8:1:3::5") != network_key("2001:db8:1:2::5")
    assert network_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert wide_network_key("192.0.2.77") == "192.0.2.0/24"
    assert wide_network_key("2001:db8:1:2::5") == wide_network_key("2001:db8:1:ff::1")
    b = AuthBrake(max_tracked=100, net_budget=10**6, clock=Clock())
    for i in range(1000):
        fail(b, f"10.0.{i // 256}.{i % 256}", f"u{i}")
    assert len(b.addr.entries) <= 100 and len(b.account.entries) <= 100


async def test_counters_survive_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state" / "auth.json"
    clock = Clock()
    b = AuthBrake(addr_budget=2, account_budget=2, state_file=state, clock=clock)
    b.success(b.admit("192.0.2.50", "alice"))
    fail(b, "192.0.2.1", "alice")
    fail(b, "192.0.2.1", "alice")
    await b.flush()
    data = json.loads(state.read_text())
    assert data["version"] == 1 and "192.0.2.1" in data["address"]
    again = AuthBrake(addr_budget=2, account_budget=2, state_file=state, clock=clock)
    with pytest.raises(Refused):
        again.admit("192.0.2.1", "bob")
    assert again.locked_for("192.0.2.1") == 900
    again.success(again.admit("192.0.2.50", "alice"))  # the known pair is remembered too
    state.write_text("{not json")
    assert AuthBrake(state_file=state, clock=clock).locked_for("192.0.2.1") == 0


async def test_one_check_at_a_time_per_client() -> None:
    b = AuthBrake(max_waiting=2)
    inside: list[int] = []
    release = asyncio.Event()

    async def attempt(i: int) -> str:
        try:
            async with b.gate("192.0.2.1"):
                inside.append(i)
                assert len(inside) - len(done) == 1
                await release.wait()
                done.append(i)
                return "checked"
        except Refused as refused:
            return refused.reason

    done: list[int] = []
    tasks = [asyncio.create_task(attempt(i)) for i in range(10)]
    await asyncio.sleep(0.01)
    other = await asyncio.wait_for(_enter_once(b, "192.0.2.2"), 1)  # other clients: no wait
    release.set()
    results = await asyncio.gather(*tasks)
    assert results.count("checked") == 3 and results.count("busy") == 7
    assert other == "checked" and b._gates == {}


async def _enter_once(b: AuthBrake, ip: str) -> str:
    async with b.gate(ip):
        return "checked"


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
    auth = Authenticator(watcher, throttle=AuthBrake(base_delay=0.001))
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
    auth = Authenticator(watcher, throttle=AuthBrake(base_delay=0, addr_budget=2))
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
    auth = Authenticator(watcher, throttle=AuthBrake(base_delay=0), concurrency=3)
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


async def test_a_success_is_remembered_until_the_hash_changes(tmp_path: Path) -> None:
    """One password check for repeated logins; a new password in the repository ends it."""
    repo = make_repo(tmp_path)
    watcher = UsersWatcher(repo, "our.test")
    auth = Authenticator(watcher, throttle=AuthBrake(base_delay=0.001), cache_ttl=60)
    for _ in range(5):
        user, reason = await auth.check("192.0.2.7", "bob", "pw-b")
        assert user is not None and reason is None
    assert auth.checks == 1
    assert (await auth.check("192.0.2.7", "bob", "pw-x"))[1] == "invalid"  # failures: checked
    assert auth.checks == 2
    # Nothing the cache keeps is the password or contains it.
    kept = repr(list(auth.cache._entries.items())).encode()
    assert b"pw-b" not in kept
    # The admin sets a new password: the old one no longer logs in.
    body = {"targets": ["x@ext.test"], "password": passwords.hash_password("new-b")}
    store.commit_file(repo, "bob", json.dumps(body).encode(), "bob: new password")
    watcher.reload()
    assert (await auth.check("192.0.2.7", "bob", "pw-b"))[1] == "invalid"
    assert (await auth.check("192.0.2.7", "bob", "new-b"))[0] is not None
    assert auth.checks == 4
    assert len(auth.cache) == 1


async def test_the_cache_expires(tmp_path: Path) -> None:
    watcher = UsersWatcher(make_repo(tmp_path), "our.test")
    auth = Authenticator(watcher, throttle=AuthBrake(base_delay=0.001), cache_ttl=60)
    clock = Clock()
    auth.cache.clock = clock
    assert (await auth.check("192.0.2.7", "bob", "pw-b"))[0] is not None
    clock.now += 61
    assert (await auth.check("192.0.2.7", "bob", "pw-b"))[0] is not None
    assert auth.checks == 2
    off = Authenticator(watcher, throttle=AuthBrake(base_delay=0.001), cache_ttl=0)
    for _ in range(2):
        assert (await off.check("192.0.2.7", "bob", "pw-b"))[0] is not None
    assert off.checks == 2


async def test_an_old_64_mib_hash_still_logs_in_and_is_rewritten(tmp_path: Path) -> None:
    """poste's earlier argon2id parameters (RFC 9106's 64 MiB, t=3, p=4) keep working."""
    from argon2 import PasswordHasher

    old = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4).hash("pw-o")
    repo = make_repo(tmp_path)
    body = {"targets": ["x@ext.test"], "password": old}
    store.commit_file(repo, "olga", json.dumps(body).encode(), "olga", create=True)
    watcher = UsersWatcher(repo, "our.test")
    auth = Authenticator(watcher, throttle=AuthBrake(base_delay=0.001))
    assert (await auth.check("192.0.2.8", "olga", "pw-o"))[0] is not None
    await auth.drain()
    assert auth.upgrades == 1
    olga = watcher.db.lookup("olga")
    assert olga is not None and olga.password is not None
    assert "$m=19456,t=2,p=1$" in olga.password
    assert (await auth.check("192.0.2.8", "olga", "pw-o"))[0] is not None
    assert (await auth.check("192.0.2.8", "olga", "wrong"))[1] == "invalid"
