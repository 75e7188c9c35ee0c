"""No loss under crash: every mail that got a 250 is delivered after a SIGKILL and a restart."""

from __future__ import annotations

import os
import random
import re
import smtplib
import threading
import time
from collections.abc import Callable
from pathlib import Path

from support.knot import KnotServer, knot_factory  # noqa: F401
from support.relay_env import MX, Relay, make_users, mx_zones
from support.standin import StandIns

TOTAL = 500
SENDERS = 4
MSGID = re.compile(rb"^Message-ID: <crash-(\d+)@example\.org>", re.MULTILINE | re.IGNORECASE)


def test_sigkill_loses_no_accepted_mail(
    poste_bin: str, tmp_path: Path, knot_factory: Callable[..., KnotServer]  # noqa: F811
) -> None:
    seed = int(os.environ.get("POSTE_CRASH_SEED", time.time_ns() % 100000))
    rnd = random.Random(seed)
    kill_after = rnd.randint(20, TOTAL - 50)  # acknowledged mails before the SIGKILL

    ns = knot_factory(mx_zones())
    # late.test's port is held (bound, not listening: refused) until its stand-in comes up.
    mx = StandIns([MX["late.test"]])
    port = mx.port
    make_users(poste_bin, tmp_path / "users", {"carol": ["carol@late.test"]})
    relay_args = ("--retry-min", "0.3s", "--retry-max", "1s")
    relay = Relay(poste_bin, tmp_path, ns.nameserver, port, *relay_args).start()

    lock = threading.Lock()
    next_n = iter(range(TOTAL))
    attempted: set[int] = set()
    acked: set[int] = set()
    killed = threading.Event()

    def sender() -> None:
        try:
            s = smtplib.SMTP(relay.host, relay.port, timeout=30)
            s.ehlo("client.test")
        except OSError:
            return
        try:
            while True:
                with lock:
                    n = next(next_n, None)
                    if n is None:
                        return
                    attempted.add(n)
                body = (
                    f"From: bob@example.org\r\nTo: carol@our.test\r\nSubject: crash {n}\r\n"
                    f"Message-ID: <crash-{n}@example.org>\r\n\r\nmail number {n}\r\n"
                ).encode()
                try:
                    s.sendmail("bob@example.org", ["carol@our.test"], body)
                except (smtplib.SMTPException, OSError):
                    return  # the relay died under us: this one was not acknowledged
                with lock:
                    acked.add(n)
                    if len(acked) >= kill_after and not killed.is_set():
                        killed.set()
                        relay.kill()  # SIGKILL, mid-stream
        finally:
            try:
                s.close()
            except OSError:
                pass

    threads = [threading.Thread(target=sender) for _ in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert killed.is_set(), "the relay was not killed"
    relay.kill()

    # Restart on the same spool, then bring the destination up.
    relay = Relay(poste_bin, tmp_path, ns.nameserver, port, *relay_args)
    relay.start()
    dest = mx.start(MX["late.test"], tmp_path / "late")
    try:
        deadline = time.monotonic() + 120
        delivered: list[int] = []
        while True:
            delivered = []
            for m in dest.mails():
                found = MSGID.search(m)
                if found:
                    delivered.append(int(found.group(1)))
            spool_empty = not list((tmp_path / "spool").glob("*.json"))
            if acked <= set(delivered) and spool_empty:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        unique = set(delivered)
        lost = sorted(acked - unique)
        print(
            f"\ncrash test (seed {seed}): attempted={len(attempted)} got-250={len(acked)} "
            f"killed-after={kill_after} delivered={len(delivered)} unique={len(unique)} "
            f"duplicates={len(delivered) - len(unique)} "
            f"delivered-without-250={len(unique - acked)} lost={len(lost)}"
        )
        assert not lost, f"accepted but never delivered: {lost[:20]}\n{relay.log()[-3000:]}"
        assert len(acked) >= kill_after
    finally:
        relay.stop()
        mx.close()


def test_concurrent_sessions_are_each_acknowledged_and_kept(
    poste_bin: str, tmp_path: Path, knot_factory: Callable[..., KnotServer]  # noqa: F811
) -> None:
    """40 sessions at once, 5 mails each (their folder fsyncs shared, spool/folder_sync.py):
    every mail gets its 250, every one is in the spool after a SIGKILL, and each is
    delivered once after the restart."""
    ns = knot_factory(mx_zones())
    mx = StandIns([MX["late.test"]])  # held down until the restart: nothing leaves before
    make_users(poste_bin, tmp_path / "users", {"carol": ["carol@late.test"]})
    relay_args = ("--retry-min", "0.3s", "--retry-max", "1s")
    relay = Relay(poste_bin, tmp_path, ns.nameserver, mx.port, *relay_args).start()
    sessions, each = 40, 5
    start = threading.Barrier(sessions)
    lock = threading.Lock()
    acked: set[int] = set()

    def session(k: int) -> None:
        start.wait()
        with smtplib.SMTP(relay.host, relay.port, timeout=60) as s:
            s.ehlo("client.test")
            for j in range(each):
                n = k * each + j
                s.sendmail("bob@example.org", ["carol@our.test"], (
                    f"From: bob@example.org\r\nTo: carol@our.test\r\nSubject: many {n}\r\n"
                    f"Message-ID: <crash-{n}@example.org>\r\n\r\nmail number {n}\r\n"
                ).encode())
                with lock:
                    acked.add(n)

    try:
        threads = [threading.Thread(target=session, args=(k,)) for k in range(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert acked == set(range(sessions * each)), relay.log()[-3000:]
        relay.kill()
        queued = {p.name[:-5] for p in (tmp_path / "spool").glob("*.json")}
        assert len(queued) == sessions * each
        assert all((tmp_path / "spool" / f"{qid}.eml").stat().st_size > 0 for qid in queued)
        relay = Relay(poste_bin, tmp_path, ns.nameserver, mx.port, *relay_args).start()
        dest = mx.start(MX["late.test"], tmp_path / "late")
        deadline = time.monotonic() + 120
        while True:
            delivered = [int(m.group(1)) for mail in dest.mails()
                         if (m := MSGID.search(mail))]
            done = not list((tmp_path / "spool").glob("*.json"))
            if (done and set(delivered) >= acked) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert sorted(delivered) == sorted(acked), relay.log()[-3000:]
    finally:
        relay.stop()
        mx.close()
