"""The DNS lookups of one message never hold up another session.

A fake DNS server holds every answer about slow.test until the test lets it
go.  While the first session waits on it, a second session (fast.test) must
go through completely; then the first one finishes too.  No clocks: the
order is forced by the gate, not by timing.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from support.dkimkit import srv_mailbox
from support.fakedns import Answer, fake_dns, rrset
from support.service import started
from support.verifierkit import find, header, mail, swaks, swaks_args, verifier_args

pytestmark = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks missing")


@contextmanager
def verifier_behind_fake_dns(
    lookup: Callable[[str, int], Answer | None], tmp_path: Path, poste_bin: str, box: Path
) -> Iterator[int]:
    """A `poste srv` mailbox in `box` behind a verifier whose DNS is `lookup`; yields its port."""
    with (
        fake_dns(lookup) as dns,
        srv_mailbox(poste_bin, box, tmp_path / "srv.log") as srv_port,
        started(
            [
                *verifier_args(poste_bin, 0, srv_port, tmp_path, dns.nameserver),
                "--dns-timeout",
                "60",
            ],
            tmp_path / "verifier.log",
        ) as (_, [port]),
    ):
        yield port


def test_slow_dns_for_one_mail_does_not_block_another(tmp_path: Path, poste_bin: str) -> None:
    gate = threading.Event()
    asked_slow = threading.Event()

    def lookup(qname: str, qtype: int) -> Answer | None:
        name = qname.rstrip(".").lower()
        if name.endswith("slow.test"):
            asked_slow.set()
            gate.wait(60)
        if name in ("slow.test", "fast.test") and qtype == 16:
            return Answer([rrset(name + ".", "TXT", b"v=spf1 ip4:127.0.0.10 -all")])
        return Answer(rcode=3)  # NXDOMAIN: no DKIM key, no DMARC record

    box = tmp_path / "box"
    with verifier_behind_fake_dns(lookup, tmp_path, poste_bin, box) as port:
        slow = subprocess.Popen(
            swaks_args(
                port, mail("slow one", sender="a@slow.test"), tmp_path, sender="a@slow.test"
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert asked_slow.wait(30), "the verifier never asked about slow.test"
            fast = swaks(
                port, mail("fast one", sender="b@fast.test"), tmp_path, sender="b@fast.test"
            )
            assert fast.returncode == 0, fast.stdout
            stored = find(box, b"Subject: fast one")
            assert header(stored, "Received-SPF").startswith("pass ")
            # the first session is still waiting on its DNS answer, unharmed
            assert slow.poll() is None
            assert not any(b"slow one" in p.read_bytes() for p in box.glob("*.eml"))
        finally:
            gate.set()
        out, _ = slow.communicate(timeout=60)
        assert slow.returncode == 0, out
        assert header(find(box, b"Subject: slow one"), "Received-SPF").startswith("pass ")


def test_many_slow_sessions_do_not_exhaust_workers(tmp_path: Path, poste_bin: str) -> None:
    """Eight sessions parked on slow DNS; a ninth still completes."""
    gate = threading.Event()
    parked = threading.Semaphore(0)

    def lookup(qname: str, qtype: int) -> Answer | None:
        name = qname.rstrip(".").lower()
        if name.endswith("slow.test") and qtype == 16 and not name.startswith("_"):
            parked.release()
            gate.wait(60)
        if qtype == 16 and name.count(".") == 1:
            return Answer([rrset(name + ".", "TXT", b"v=spf1 ip4:127.0.0.10 -all")])
        return Answer(rcode=3)

    box = tmp_path / "box"
    with verifier_behind_fake_dns(lookup, tmp_path, poste_bin, box) as port:
        procs = []
        try:
            for i in range(8):
                sender = f"a@s{i}slow.test"
                msg = mail(f"slow {i}", sender=sender)
                procs.append(
                    subprocess.Popen(
                        swaks_args(port, msg, tmp_path, sender=sender, tls=False),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            for _ in range(8):
                assert parked.acquire(timeout=30), "not every session reached its DNS lookup"
            fast = swaks(port, mail("ninth", sender="b@fast.test"), tmp_path, sender="b@fast.test")
            assert fast.returncode == 0, fast.stdout
            find(box, b"Subject: ninth")
            assert all(p.poll() is None for p in procs)
        finally:
            gate.set()
            for p in procs:
                p.wait(timeout=60)
        assert all(p.returncode == 0 for p in procs)
        deadline = time.monotonic() + 20
        while len(list(box.glob("*.eml"))) < 9 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(box.glob("*.eml"))) == 9
