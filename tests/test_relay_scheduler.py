"""The scheduler's policy: backoff bounds, per-domain concurrency cap, resume from the spool."""

from __future__ import annotations

import asyncio
from pathlib import Path

from poste.services.relay.scheduler import Policy, Scheduler
from poste.services.relay.spool import Entry, Recipient, Spool
from poste.smtp.stage import Reply

MSG = b"Subject: x\r\n\r\nx\r\n"


def test_backoff_grows_with_jitter_and_cap() -> None:
    p = Policy(retry_min=10, retry_max=100, jitter=0.25)
    for attempts, base in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (20, 100)]:
        values = {p.backoff(attempts) for _ in range(50)}
        assert all(base * 0.75 <= v <= base * 1.25 for v in values)
        assert len(values) > 1  # jittered


async def test_per_domain_cap_and_resume(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    # Messages already in the spool (as after a restart): resumed at start.
    for i in range(12):
        dom = "a.test" if i % 2 else "b.test"
        spool.put(Entry(id=f"M{i:02}", return_path="", recipients=[
            Recipient(f"u{i}@{dom}", "s@our.test")]), MSG)
    active: dict[str, int] = {}
    peak: dict[str, int] = {}
    done: list[str] = []

    async def deliver(domain: str, sender: str, rcpts: list[str], msg: bytes) -> dict[str, Reply]:
        active[domain] = active.get(domain, 0) + 1
        peak[domain] = max(peak.get(domain, 0), active[domain])
        await asyncio.sleep(0.05)
        active[domain] -= 1
        done.extend(rcpts)
        return {r: Reply(250, "2.0.0 Ok", "mx", remote=True) for r in rcpts}

    sched = Scheduler(spool, deliver, hostname="relay.our.test", domain="our.test",
                      policy=Policy(max_per_domain=2, rescan=3600))
    await sched.start()
    try:
        for _ in range(200):
            if len(done) == 12 and not spool.ids():
                break
            await asyncio.sleep(0.02)
    finally:
        await sched.stop()
    assert sorted(done) == sorted(f"u{i}@{'a.test' if i % 2 else 'b.test'}" for i in range(12))
    assert peak == {"a.test": 2, "b.test": 2}
    assert spool.ids() == []


# -- one relay per spool, and `poste queue` beside a running relay -------------------------


def test_one_owner_per_spool(tmp_path: Path) -> None:
    import os

    import pytest

    from poste.services.relay.spool import SpoolLocked

    first = Spool(tmp_path)
    first.lock()
    with pytest.raises(SpoolLocked, match=rf"in use by another relay \(pid {os.getpid()}\)"):
        Spool(tmp_path).lock()
    first.unlock()
    Spool(tmp_path).lock()  # free again (and an flock dies with its process anyway)


async def _running(
    tmp_path: Path, release: asyncio.Event, started: asyncio.Event, reply: Reply
) -> tuple[Spool, Scheduler]:
    spool = Spool(tmp_path)
    spool.put(Entry(id="Q1", return_path="", recipients=[
        Recipient("u@a.test", "s@our.test")]), MSG)

    async def deliver(domain: str, sender: str, rcpts: list[str], msg: bytes) -> dict[str, Reply]:
        started.set()
        await release.wait()
        return {r: reply for r in rcpts}

    sched = Scheduler(spool, deliver, hostname="relay.our.test", domain="our.test",
                      policy=Policy(retry_min=3600, rescan=3600, warn_after=0))
    await sched.start()
    return spool, sched


def _queue(poste_bin: str, tmp_path: Path, *args: str) -> str:
    import subprocess

    out = subprocess.run([poste_bin, "queue", *args, "--spool", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_retry_during_an_attempt_is_not_undone(tmp_path: Path, poste_bin: str) -> None:
    release, started = asyncio.Event(), asyncio.Event()
    spool, sched = await _running(tmp_path, release, started,
                                  Reply(451, "4.2.0 try later", "mx.a.test", remote=True))
    try:
        await asyncio.wait_for(started.wait(), 10)  # the relay is delivering Q1 now
        out = await asyncio.to_thread(_queue, poste_bin, tmp_path, "retry", "Q1")
        assert "Q1: retry now" in out
        started.clear()
        release.set()  # the attempt ends with a 4xx: its own next try would be ~1 hour away
        # The retry asked during the attempt is kept: a second attempt comes at once.
        await asyncio.wait_for(started.wait(), 10)
        for _ in range(200):
            if spool.load("Q1").attempts == 2:
                break
            await asyncio.sleep(0.02)
        e = spool.load("Q1")
        assert e.attempts == 2 and e.recipients[0].last_reply == "451 4.2.0 try later"
    finally:
        await sched.stop()


async def test_delete_during_an_attempt_stays_deleted(tmp_path: Path, poste_bin: str) -> None:
    release, started = asyncio.Event(), asyncio.Event()
    spool, sched = await _running(tmp_path, release, started,
                                  Reply(451, "4.2.0 try later", "mx.a.test", remote=True))
    try:
        await asyncio.wait_for(started.wait(), 10)
        assert "Q1: deleted" in await asyncio.to_thread(_queue, poste_bin, tmp_path, "delete", "Q1")
        release.set()
        for _ in range(50):
            await asyncio.sleep(0.02)
            if await sched.idle():
                break
        assert await sched.idle()
    finally:
        await sched.stop()
    # No envelope came back, no orphan message file either.
    left = await asyncio.to_thread(lambda: list(tmp_path.glob("Q1.*")))
    assert spool.ids() == [] and not left


def test_queue_retry_waits_for_the_message_lock(tmp_path: Path, poste_bin: str) -> None:
    import re
    import subprocess
    import time

    spool = Spool(tmp_path)
    spool.put(Entry(id="Q1", return_path="", recipients=[
        Recipient("u@a.test", "s@our.test")], next_attempt=2e9), MSG)
    with spool.message_lock("Q1"):  # the relay is rewriting Q1's envelope
        proc = subprocess.Popen([poste_bin, "queue", "retry", "Q1", "--spool", str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Until the kernel lists it waiting for our lock ("->" in /proc/locks), not a sleep.
        blocked = re.compile(rf"^\d+: -> FLOCK\s+ADVISORY\s+WRITE\s+{proc.pid}\s", re.M)
        deadline = time.monotonic() + 30
        while not blocked.search(Path("/proc/locks").read_text()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "queue retry never waited for the lock"
            time.sleep(0.02)
        assert proc.poll() is None  # waiting, not writing over the relay's update
        assert spool.load("Q1").next_attempt == 2e9
    assert proc.wait(30) == 0
    assert spool.load("Q1").next_attempt < 2e9


# -- metrics: counted where the scheduler decides ------------------------------------------


def _count(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_each_recipient_outcome_is_counted_once(tmp_path: Path) -> None:
    """Delivered once as delivered, a 5xx and an expired recipient once as bounced."""
    spool = Spool(tmp_path)
    calls: dict[str, int] = {}

    async def deliver(domain: str, sender: str, rcpts: list[str], msg: bytes) -> dict[str, Reply]:
        calls[domain] = calls.get(domain, 0) + 1
        reply = {
            "a.test": Reply(250, "2.0.0 Ok", "mx.a.test", remote=True),
            "b.test": Reply(451, "4.2.0 try later", "mx.b.test", remote=True),
            "c.test": Reply(550, "5.1.1 no such user", "mx.c.test", remote=True),
        }[domain]
        return {r: reply for r in rcpts}

    before = {
        "queued": _count("poste_queued_total"),
        **{w: _count("poste_deliveries_total", result=w)
           for w in ("delivered", "deferred", "bounced")},
    }
    sched = Scheduler(spool, deliver, hostname="relay.our.test", domain="our.test",
                      policy=Policy(retry_min=0.1, retry_max=0.2, lifetime=1.0, warn_after=0,
                                    rescan=3600))
    await sched.start()
    try:
        # From <>: no DSN, so every count below is this message's own.
        await sched.enqueue(Entry(id="Q1", return_path="", recipients=[
            Recipient("ok@a.test", "s@our.test"),
            Recipient("late@b.test", "s@our.test"),
            Recipient("no@c.test", "s@our.test"),
        ]), MSG)
        for _ in range(500):
            if not spool.ids():
                break
            await asyncio.sleep(0.02)
    finally:
        await sched.stop()
    assert spool.ids() == []  # every recipient reached its final outcome
    moved = {
        "queued": _count("poste_queued_total") - before["queued"],
        **{w: _count("poste_deliveries_total", result=w) - before[w]
           for w in ("delivered", "deferred", "bounced")},
    }
    assert calls["a.test"] == 1 and calls["c.test"] == 1
    assert calls["b.test"] >= 2  # retried before its lifetime ran out
    # late@b.test: deferred on each attempt but its last, bounced on the last one.
    assert moved == {"queued": 1, "delivered": 1, "deferred": calls["b.test"] - 1, "bounced": 2}


class _SlowListing(Spool):
    """A spool whose listing (a rescan) can be held open, as a large spool's is."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import threading

        self.hold = False
        self.listing = threading.Event()  # a held listing has begun
        self.go_on = threading.Event()

    def entries(self):  # type: ignore[no-untyped-def]
        listed = list(super().entries())
        if self.hold:
            self.listing.set()
            self.go_on.wait(30)
        yield from listed


async def test_mail_queued_during_a_rescan_is_delivered_before_the_next(tmp_path: Path) -> None:
    """A mail written while the spool is being re-read is tried at once, not after `rescan`."""
    spool = _SlowListing(tmp_path)
    done: list[str] = []

    async def deliver(domain: str, sender: str, rcpts: list[str], msg: bytes) -> dict[str, Reply]:
        done.extend(rcpts)
        return {r: Reply(250, "2.0.0 Ok", "mx", remote=True) for r in rcpts}

    # The first re-read comes at once; while it is held, the interval becomes an hour, so the
    # next one is an hour away (the scheduler reads the interval after each re-read).
    policy = Policy(rescan=0.05, warn_after=0)
    sched = Scheduler(spool, deliver, hostname="relay.our.test", domain="our.test",
                      policy=policy)
    await sched.start()
    spool.hold = True
    try:
        await asyncio.to_thread(spool.listing.wait, 30)
        policy.rescan = 3600
        await sched.enqueue(Entry(id="N1", return_path="", recipients=[
            Recipient("u@a.test", "s@our.test")]), MSG)
        spool.go_on.set()
        for _ in range(500):  # well before the next rescan, an hour away
            if done and not spool.ids():
                break
            await asyncio.sleep(0.02)
    finally:
        spool.go_on.set()
        await sched.stop()
    assert done == ["u@a.test"]
    assert spool.ids() == []


async def test_arrivals_wait_for_a_lagging_delivery_once_on_disk(tmp_path: Path) -> None:
    """Past the backlog, a queued mail's enqueue (its 250) waits until delivery catches up."""
    spool = Spool(tmp_path)
    release = asyncio.Event()
    done: list[str] = []

    async def deliver(domain: str, sender: str, rcpts: list[str], msg: bytes) -> dict[str, Reply]:
        await release.wait()
        done.extend(rcpts)
        return {r: Reply(250, "2.0.0 Ok", "mx", remote=True) for r in rcpts}

    sched = Scheduler(spool, deliver, hostname="relay.our.test", domain="our.test",
                      policy=Policy(max_active=1, inflow_backlog=2, inflow_delay=3600,
                                    rescan=3600, warn_after=0))
    await sched.start()

    def entry(qid: str) -> Entry:
        return Entry(id=qid, return_path="", recipients=[Recipient(f"{qid}@a.test", "s@our.test")])

    try:
        await sched.enqueue(entry("M1"), MSG)  # in its attempt
        await sched.enqueue(entry("M2"), MSG)  # waiting: the backlog is 2, not more
        third = asyncio.create_task(sched.enqueue(entry("M3"), MSG))
        for _ in range(200):
            if "M3" in spool.ids():
                break
            await asyncio.sleep(0.01)
        for _ in range(20):
            await asyncio.sleep(0)
        assert "M3" in spool.ids() and not third.done()  # on disk, its 250 held back
        release.set()
        await asyncio.wait_for(third, 30)
        for _ in range(500):
            if len(done) == 3 and not spool.ids():
                break
            await asyncio.sleep(0.02)
    finally:
        release.set()
        await sched.stop()
    assert sorted(done) == ["M1@a.test", "M2@a.test", "M3@a.test"]


async def test_first_attempt_from_memory_same_bytes_and_delete_kept(tmp_path: Path) -> None:
    """A mail just queued is first tried with the envelope and bytes it was queued with
    (no reading back): the same bytes as its spool file; a big one is read from the spool;
    one deleted right after its 250 is not delivered."""
    from poste.services.relay import scheduler as sched_mod
    from poste.smtp.message import Message

    spool = Spool(tmp_path)
    got: dict[str, bytes] = {}

    async def deliver(domain: str, sender: str, rcpts: list[str], msg: Message) -> dict[str, Reply]:
        got[rcpts[0]] = b"".join(msg.chunks())
        return {r: Reply(250, "2.0.0 Ok", "mx", remote=True) for r in rcpts}

    sched = Scheduler(spool, deliver, hostname="relay.our.test", domain="our.test",
                      policy=Policy(rescan=3600))
    await sched.start()
    big = b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * 4000
    assert len(big) > sched_mod.FRESH_MAIL
    try:
        small = Message.of(b"Subject: small\r\n\r\nbody\r\n").prepend(b"Received: x\r\n")
        await sched.enqueue(Entry(id="S1", return_path="", recipients=[
            Recipient("s@a.test", "s@our.test")]), small)
        assert "S1" in sched._fresh  # no await since: its attempt has not begun
        await sched.enqueue(Entry(id="B1", return_path="", recipients=[
            Recipient("b@a.test", "s@our.test")]), Message.of(big))
        assert "B1" not in sched._fresh  # too big to keep: read back from the spool
        # a third one, deleted before its attempt begins (the scheduler's loop has not run)
        await sched.enqueue(Entry(id="D1", return_path="", recipients=[
            Recipient("d@a.test", "s@our.test")]), Message.of(b"Subject: d\r\n\r\nd\r\n"))
        spool.remove("D1")
        for _ in range(200):
            if len(got) >= 2 and not spool.ids():
                break
            await asyncio.sleep(0.02)
    finally:
        await sched.stop()
    assert got == {"s@a.test": b"Received: x\r\nSubject: small\r\n\r\nbody\r\n", "b@a.test": big}
    assert spool.ids() == [] and sched._fresh == {} and sched._fresh_bytes == 0
