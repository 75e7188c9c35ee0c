"""The scheduler's policy: backoff bounds, per-domain concurrency cap, resume from the spool."""

from __future__ import annotations

import asyncio
from pathlib import Path

from poste.relay.delivery import Result
from poste.relay.scheduler import Policy, Scheduler
from poste.relay.spool import Entry, Recipient, Spool

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

    async def deliver(domain: str, sender: str, rcpts: list[str], msg: bytes) -> dict[str, Result]:
        active[domain] = active.get(domain, 0) + 1
        peak[domain] = max(peak.get(domain, 0), active[domain])
        await asyncio.sleep(0.05)
        active[domain] -= 1
        done.extend(rcpts)
        return {r: Result(250, "250 2.0.0 Ok", "mx") for r in rcpts}

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
