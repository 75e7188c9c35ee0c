"""The spool on disk and `poste queue`: what an admin sees and does."""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
import threading
import time
from pathlib import Path

from poste.services.relay.dsn import DELAYED, FAILED, make_dsn
from poste.services.relay.spool import DELIVERED, Entry, Recipient, Spool

MSG = b"From: bob@example.org\r\nTo: alice@our.test\r\nSubject: hi\r\n\r\nhello\r\n"


def entry(qid: str = "ABC123") -> Entry:
    return Entry(
        id=qid,
        return_path="bob@example.org",
        recipients=[
            Recipient("alice@gmail.test", "SRS0=x@our.test", "alice@our.test"),
            Recipient("alice2@outlook.test", "SRS0=x@our.test", "alice@our.test"),
        ],
        peer="127.0.0.1",
    )


def test_put_load_update_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "q")
    e = entry()
    spool.put(e, MSG)
    assert (tmp_path / "q" / "ABC123.eml").read_bytes() == MSG
    data = json.loads((tmp_path / "q" / "ABC123.json").read_text())
    assert data["return_path"] == "bob@example.org" and data["version"] == 1
    assert [r["address"] for r in data["recipients"]] == ["alice@gmail.test", "alice2@outlook.test"]
    again = Spool(tmp_path / "q").load("ABC123")
    assert again == e
    e.recipients[0].state = DELIVERED
    spool.update(e)
    assert [r.address for r in spool.load("ABC123").pending] == ["alice2@outlook.test"]
    assert spool.ids() == ["ABC123"]
    spool.remove("ABC123")
    assert spool.ids() == []
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["VERSION"]


def test_recover_removes_interrupted_writes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.put(entry("KEEP"), MSG)
    (tmp_path / "HALF.eml").write_bytes(MSG)  # crash between message and envelope
    (tmp_path / ".tmp-X.json-1234").write_bytes(b"{")  # crash mid-write
    removed = spool.recover()
    assert sorted(removed) == [".tmp-X.json-1234", "HALF.eml"]
    assert spool.ids() == ["KEEP"] and spool.read_message("KEEP") == MSG


def test_queue_cli(tmp_path: Path, poste_bin: str) -> None:
    spool = Spool(tmp_path)
    spool.put(entry("Q1"), MSG)
    e2 = entry("Q2")
    e2.next_attempt = time.time() + 3600
    spool.put(e2, MSG)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [poste_bin, "queue", *args, "--spool", str(tmp_path)],
            capture_output=True, text=True, timeout=30,
        )

    out = run("list")
    assert out.returncode == 0, out.stderr
    assert "Q1" in out.stdout and "Q2" in out.stdout and "alice2@outlook.test" in out.stdout
    assert "2 message(s)" in out.stderr
    show = run("show", "Q1", "--body")
    assert show.returncode == 0
    assert "return-path:  <bob@example.org>" in show.stdout and "Subject: hi" in show.stdout
    assert run("retry", "Q2").returncode == 0
    assert spool.load("Q2").next_attempt <= time.time()
    assert run("delete", "Q1").returncode == 0
    assert spool.ids() == ["Q2"]
    missing = run("show", "NOPE")
    assert missing.returncode != 0 and "NOPE" in missing.stderr and "Traceback" not in missing.stderr
    nodir = subprocess.run(
        [poste_bin, "queue", "list", "--spool", str(tmp_path / "absent")],
        capture_output=True, text=True, timeout=30,
    )
    assert nodir.returncode != 0 and "no spool folder" in nodir.stderr


def test_queue_check_finds_what_is_not_on_its_way(tmp_path: Path, poste_bin: str) -> None:
    spool = Spool(tmp_path)
    fresh = entry("FRESH")
    fresh.next_attempt = time.time() + 60
    spool.put(fresh, MSG)

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([poste_bin, "queue", "check", "--spool", str(tmp_path)],
                              capture_output=True, text=True, timeout=30)

    ok = check()
    assert ok.returncode == 0 and ok.stdout == "", ok.stdout + ok.stderr
    assert "1 message(s) checked, 0 problem(s)" in ok.stderr
    stalled = entry("STALLED")
    stalled.next_attempt = time.time() - 3600  # due an hour ago: the scheduler lost it
    spool.put(stalled, MSG)
    done = entry("DONE")
    for r in done.recipients:
        r.state = DELIVERED
    spool.put(done, MSG)
    nofile = entry("NOFILE")
    nofile.next_attempt = time.time() + 60
    spool.put(nofile, MSG)
    (tmp_path / "NOFILE.eml").unlink()
    (tmp_path / "BROKEN.json").write_text("{")
    bad = check()
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    lines = sorted(bad.stdout.splitlines())
    assert [line.split(":")[0:2] for line in lines] == [
        ["BROKEN", " unreadable"], ["DONE", " nothing pending"], ["NOFILE", " no message file"],
        ["STALLED", " overdue"]], lines
    assert "5 message(s) checked, 4 problem(s)" in bad.stderr


def test_dsn_is_a_multipart_report() -> None:
    r = Recipient("alice@gmail.test", "SRS0=x@our.test", "alice@our.test")
    r.last_reply = "550 5.1.1 No such user"
    r.remote_mta = "mx.gmail.test"
    r.last_attempt = time.time()
    raw = make_dsn(
        action=FAILED, reporting_mta="relay.our.test", postmaster_domain="our.test",
        to="bob@example.org", recipients=[r], original=MSG, queue_id="Q1", arrival=time.time(),
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "<bob@example.org>" and msg["Auto-Submitted"] == "auto-replied"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers",
    ]
    status = raw.split(b"message/delivery-status")[1].decode()
    assert "Final-Recipient: rfc822; alice@gmail.test" in status
    assert "Original-Recipient: rfc822; alice@our.test" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user" in status
    assert "Remote-MTA: dns; mx.gmail.test" in status
    assert b"Subject: hi" in raw and b"hello" not in raw.split(b"text/rfc822-headers")[1]

    delayed = make_dsn(
        action=DELAYED, reporting_mta="relay.our.test", postmaster_domain="our.test",
        to="bob@example.org", recipients=[r], original=MSG, queue_id="Q1", arrival=time.time(),
        retry_until=time.time() + 86400,
    )
    assert b"Action: delayed" in delayed and b"Will-Retry-Until:" in delayed


def test_dsn_status_of_local_failures() -> None:
    from poste.services.relay.dsn import status_of

    assert status_of("550 5.1.1 No such user", "5.0.0") == "5.1.1"
    assert status_of("5.1.2 Domain nosuch.test does not exist", "5.0.0") == "5.1.2"
    assert status_of("5.4.6 mail for a.test loops back to myself", "5.0.0") == "5.4.6"
    assert status_of("556 5.1.10 null MX", "5.0.0") == "5.1.10"
    assert status_of("554 Spam", "5.0.0") == "5.0.0"
    assert status_of("connection refused", "4.0.0") == "4.0.0"


def test_concurrent_puts_are_each_durable_and_share_folder_fsyncs(tmp_path: Path) -> None:
    """Many mails stored at once (threads, as the relay's arrivals pool): every put returns,
    every mail reads back whole from a fresh Spool, and the folder fsyncs are at most one
    per mail (group commit, folder_sync.py: concurrent puts share them)."""
    spool = Spool(tmp_path / "q")
    n = 64
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def put(i: int) -> None:
        body = MSG + f"mail {i}\r\n".encode() * (i + 1)
        start.wait()
        try:
            spool.put(entry(f"CONC{i:04d}"), body)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    again = Spool(tmp_path / "q")
    assert again.ids() == [f"CONC{i:04d}" for i in range(n)]
    for i in range(n):
        assert again.read_message(f"CONC{i:04d}") == MSG + f"mail {i}\r\n".encode() * (i + 1)
        assert again.load(f"CONC{i:04d}").recipients == entry().recipients
    assert spool.folder_sync.asked == n
    assert 1 <= spool.folder_sync.syncs <= n
    # updates and removals go through the same shared fsync
    removers = [threading.Thread(target=spool.remove, args=(f"CONC{i:04d}",)) for i in range(n)]
    for t in removers:
        t.start()
    for t in removers:
        t.join(60)
    assert Spool(tmp_path / "q").ids() == []
    assert spool.folder_sync.asked == 2 * n and spool.folder_sync.syncs <= 2 * n


def test_the_envelope_says_whether_the_file_goes_out_unscanned(tmp_path: Path) -> None:
    """A body the DATA reader vouched for, below our own fields, is noted wire-clean, and
    the file opened for delivery says so; a prefix line that needs stuffing, or a mail
    nobody vouched for, is scanned as it is sent."""
    from poste.smtp.message import BodyWriter

    spool = Spool(tmp_path / "q")
    cases = {"CLEAN1": (b"X-Top: 1\r\n", True), "DOTTED": (b"X-Top: 1\r\n.x\r\n", False),
             "BARELF": (b"X-Top: 1\n", False)}
    for qid, (prefix, want) in cases.items():
        body = BodyWriter()
        body.write(MSG)
        spool.put(entry(qid), body.finish(wire_clean=True).prepend(prefix))
        assert spool.load(qid).wire_clean is want
        sent = spool.open_message(qid, spool.load(qid).wire_clean)
        assert sent.wire_clean is want
        assert b"".join(sent.wire_chunks()).endswith(MSG)
        sent.close()
    spool.put(entry("PLAIN1"), MSG)
    assert spool.load("PLAIN1").wire_clean is False
    old = json.loads((tmp_path / "q" / "PLAIN1.json").read_text())
    del old["wire_clean"]  # an envelope written before the field existed
    assert Entry.from_json(old).wire_clean is False
