"""Learning from users: the forwarded original, the locked update, who is trusted, the relay's replies.

The end-to-end path (verifier, spamfilter and relay, both topologies) is in
test_spam_learn_e2e.py; here each part is checked on its own, the relay as
a real `poste relay` process that we talk to as its verifier would (we
write the Authentication-Results field it judges by).
"""

from __future__ import annotations

import base64
import multiprocessing
import shutil
import smtplib
import socket
from pathlib import Path

import pytest

from poste.services.relay.learn import learn_kind, sender_of
from poste.services.spamfilter.service import build_stage
from poste.spam import default_db_file
from poste.spam.database import BIAS, Database
from poste.spam.learn import MAX_STEPS, SPAM_GOAL, forwarded, learn_into, teach
from poste.spam.tokenizer import tokenize
from support.cli import run_poste
from support.relay_env import Relay, make_users
from support.spamkit import corpus, write_mbox

ORIGINAL = (
    b"From: \"Crypto Desk\" <desk@profit-wave.test>\r\nTo: alice@our.test\r\n"
    b"Subject: Your wallet bonus is waiting\r\nMessage-ID: <a1@profit-wave.test>\r\n"
    b"Received: from spam.example ([192.0.2.7]) by mx.our.test\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Your account holds a pending bonus of 0.42 BTC. Confirm your wallet today: "
    b"https://claim.profit-wave.test/r/8812\r\n"
)
SRV = "mx.our.test"


def wrapper(sender: str, to: str, body: bytes, results: str = "") -> bytes:
    return (
        (results.encode() if results else b"")
        + f"From: Alice <{sender}>\r\nTo: {to}\r\nSubject: Fwd: look\r\n".encode()
        + b"Message-ID: <w1@gmail.test>\r\nMIME-Version: 1.0\r\n"
        + body
    )


def attached(original: bytes = ORIGINAL) -> bytes:
    return (b'Content-Type: multipart/mixed; boundary="w"\r\n\r\n--w\r\n'
            b"Content-Type: text/plain\r\n\r\nspam!\r\n--w\r\n"
            b"Content-Type: message/rfc822\r\n\r\n" + original + b"\r\n--w--\r\n")


GMAIL_INLINE = (
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nsee below\r\n\r\n"
    b"---------- Forwarded message ---------\r\n"
    b"From: Crypto Desk <desk@profit-wave.test>\r\n"
    b"Date: Tue, Dec 1, 2026 at 9:00 AM\r\n"
    b"Subject: Your wallet bonus is waiting\r\n"
    b"To: <alice@our.test>\r\n\r\n"
    b"Your account holds a pending bonus of 0.42 BTC. Confirm your wallet today: "
    b"https://claim.profit-wave.test/r/8812\r\n"
)


# -- the original out of the wrapper --------------------------------------------------


def test_an_attached_mail_is_taken_whole() -> None:
    got = forwarded(wrapper("alice@gmail.test", "learn-spam@our.test", attached()))
    assert got is not None and got.how == "attached"
    tokens = tokenize(got.raw)
    assert "subject:wallet" in tokens and "url:profit-wave.test" in tokens
    assert "received:192.0.2" in tokens  # the original's own header came with it
    assert not any("gmail" in t for t in tokens)  # nothing of the wrapper


def test_an_eml_attachment_in_base64_is_taken() -> None:
    body = (b'Content-Type: multipart/mixed; boundary="w"\r\n\r\n--w\r\n'
            b"Content-Type: text/plain\r\n\r\nspam!\r\n--w\r\n"
            b'Content-Type: application/octet-stream; name="x.eml"\r\n'
            b'Content-Disposition: attachment; filename="x.eml"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(ORIGINAL).replace(b"\n", b"\r\n") + b"--w--\r\n")
    got = forwarded(wrapper("alice@gmail.test", "learn-spam@our.test", body))
    assert got is not None and got.how == "attached" and got.raw == ORIGINAL


def test_an_inline_forward_gives_the_quoted_header_and_body() -> None:
    got = forwarded(wrapper("alice@gmail.test", "learn-spam@our.test", GMAIL_INLINE))
    assert got is not None and got.how == "inline"
    head, _, body = got.raw.partition(b"\r\n\r\n")
    assert b"From: Crypto Desk <desk@profit-wave.test>" in head
    assert b"Subject: Your wallet bonus is waiting" in head
    assert b"see below" not in got.raw  # the forwarder's own note is not learnt
    assert body.startswith(b"Your account holds")
    tokens = tokenize(got.raw)
    assert "subject:wallet" in tokens and "from:domain:profit-wave.test" in tokens


def test_a_quoted_reply_style_forward_is_unquoted() -> None:
    body = (b"Content-Type: text/plain\r\n\r\nspam, see:\r\n\r\n"
            b"> Your account holds a pending bonus.\r\n> Confirm your wallet today.\r\n")
    got = forwarded(wrapper("alice@gmail.test", "learn-spam@our.test", body))
    assert got is not None and got.how == "inline"
    assert got.raw.endswith(b"Your account holds a pending bonus.\r\nConfirm your wallet today.\r\n")


def test_a_wrapper_without_an_original_gives_nothing() -> None:
    body = b"Content-Type: text/plain\r\n\r\njust a note, nothing forwarded\r\n"
    assert forwarded(wrapper("alice@gmail.test", "learn-spam@our.test", body)) is None
    assert forwarded(b"\x00\xff garbage") is None


# -- training -----------------------------------------------------------------------------


def test_teach_moves_the_mail_past_the_goal_and_the_bias_once() -> None:
    db = Database.load(default_db_file())
    once = Database.load(default_db_file())
    tokens = tokenize(ORIGINAL)
    once.train(tokens, True)
    nspam, nham = db.nspam, db.nham
    got = teach(db, tokens, True)
    assert got.steps > 1 and got.before < SPAM_GOAL <= got.after
    assert (db.nspam, db.nham) == (nspam + 1, nham)  # one mail, however many steps
    assert (db.z[BIAS], db.n[BIAS]) == (once.z[BIAS], once.n[BIAS])  # moved by one step only
    assert db.seen["subject:wallet"] == 1
    back = teach(db, tokens, False)  # the user changes their mind: labelled `no` again
    assert back.after < 0.10 and back.steps <= MAX_STEPS


def _learn_many(path: str, count: int) -> None:
    for _ in range(count):
        learn_into(path, ORIGINAL, True)


def test_two_processes_learning_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "spam.db.gz"
    shutil.copy(default_db_file(), path)
    start = Database.load(path).nspam
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_learn_many, args=(str(path), 4)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert Database.load(path).nspam == start + 8  # every step of both is in the file
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # still gzipped, as it was
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


async def test_train_update_reaches_the_running_filter_without_sighup(tmp_path: Path) -> None:
    """`poste spam train --update` on the spamfilter's --db: the next mail sees it."""
    spam, ham = corpus(seed=3, count=20)
    db = tmp_path / "spam.db"
    mbox_spam = write_mbox(tmp_path / "spam.mbox", spam)
    mbox_ham = write_mbox(tmp_path / "ham.mbox", ham)
    ran = run_poste(["spam", "train", "--spam", str(mbox_spam), "--ham", str(mbox_ham),
                     "-o", str(db)])
    assert ran.returncode == 0, ran.stderr
    stage = build_stage(str(db))
    before = stage.classifier.db.nspam
    ran = run_poste(["spam", "train", "--update", "--spam", str(mbox_spam), "-o", str(db)])
    assert ran.returncode == 0, ran.stderr
    assert f"{before + 20} spam, 20 ham" in ran.stderr
    await stage.follow()
    assert stage.classifier.db.nspam == before + 20
    await stage.follow()  # unchanged file: nothing loaded again
    ran = run_poste(["spam", "train", "--update", "--spam", str(tmp_path / "missing"),
                     "-o", str(db)])
    assert ran.returncode != 0 and "Traceback" not in ran.stderr
    assert len(ran.stderr.strip().splitlines()) == 1, ran.stderr


# -- who is trusted -------------------------------------------------------------------------


def ar(srv: str, *resinfos: str) -> str:
    return f"Authentication-Results: {srv};\r\n\t" + ";\r\n\t".join(resinfos) + "\r\n"


@pytest.mark.parametrize(("results", "trusted"), [
    (ar(SRV, "spf=pass smtp.mailfrom=alice@gmail.test", "dkim=none"), "spf"),
    (ar(SRV, "spf=fail smtp.mailfrom=alice@gmail.test",
        "dkim=pass header.d=mail.gmail.test header.s=s"), "dkim"),  # relaxed alignment
    (ar(SRV, "spf=pass smtp.mailfrom=x@other.test", "dkim=pass header.d=other.test"), ""),
    (ar(SRV, "spf=fail smtp.mailfrom=alice@gmail.test", "dkim=none")
     + ar(SRV, "spf=pass smtp.mailfrom=alice@gmail.test"), ""),  # a sender's, below ours
    (ar("mx.elsewhere.test", "spf=pass smtp.mailfrom=alice@gmail.test")
     + ar(SRV, "spf=pass smtp.mailfrom=alice@gmail.test"), ""),  # ours is not on top
    ("", ""),
])
def test_only_our_topmost_results_authenticate_the_from_address(results: str, trusted: str
                                                                ) -> None:
    header = wrapper("alice@gmail.test", "learn-spam@our.test", b"\r\n", results)
    got = sender_of(header, SRV)
    assert got.address == "alice@gmail.test"
    assert got.authenticated == trusted, got


def test_learn_addresses() -> None:
    ours = {"our.test"}.__contains__
    assert learn_kind("learn-spam@our.test", ours) is True
    assert learn_kind("<Learn-Ham@our.test>", ours) is False
    assert learn_kind("learn-spam@other.test", ours) is None
    assert learn_kind("alice@our.test", ours) is None


# -- the relay -----------------------------------------------------------------------------


@pytest.fixture
def relay(tmp_path: Path, poste_bin: str):  # type: ignore[no-untyped-def]
    make_users(poste_bin, tmp_path / "users", {"alice": ["alice@gmail.test"],
                                                "bob": ["bob@outlook.test"]})
    db = tmp_path / "spam.db.gz"
    shutil.copy(default_db_file(), db)
    r = Relay(poste_bin, tmp_path, "127.0.0.1:53", 2525, "--learn-db", str(db),
              "--arc-authserv-id", SRV, "--local-socket", str(tmp_path / "relay.sock"))
    r.start()
    try:
        yield r, db
    finally:
        r.stop()


def session(relay: Relay, rcpts: list[str], data: bytes | None,
            sender: str = "alice@gmail.test") -> tuple[int, bytes]:
    with smtplib.SMTP(relay.host, relay.port, timeout=30) as s:
        s.ehlo("mx.our.test")
        s.mail(sender)
        for r in rcpts:
            code, msg = s.rcpt(r)
            if code != 250:
                return code, msg
        assert data is not None
        return s.data(data)


class UnixSMTP(smtplib.SMTP):
    """smtplib over a unix socket (the relay's --local-socket, our own hop)."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(host)
        return s


PASS = ar(SRV, "spf=pass smtp.mailfrom=alice@gmail.test", "dkim=none")


def test_the_relay_learns_and_refuses_as_it_says(relay) -> None:  # type: ignore[no-untyped-def]
    r, db = relay
    shipped = db.read_bytes()
    nham = Database.load(db).nham
    # a learn address goes alone
    code, msg = session(r, ["learn-spam@our.test", "alice@our.test"], None)
    assert code == 452, msg
    code, msg = session(r, ["alice@our.test", "learn-spam@our.test"], None)
    assert code == 452, msg
    # a stranger, a forged field below ours, nothing forwarded: 550, nothing learnt
    stranger = wrapper("eve@gmail.test", "learn-spam@our.test", attached(),
                       ar(SRV, "spf=pass smtp.mailfrom=eve@gmail.test"))
    code, msg = session(r, ["learn-spam@our.test"], stranger, "eve@gmail.test")
    assert code == 550 and msg.startswith(b"5.7.1"), msg
    forged = wrapper("alice@gmail.test", "learn-spam@our.test", attached(),
                     ar(SRV, "spf=fail smtp.mailfrom=alice@gmail.test") + PASS)
    code, msg = session(r, ["learn-spam@our.test"], forged)
    assert code == 550 and msg.startswith(b"5.7.1"), msg
    empty = wrapper("alice@gmail.test", "learn-spam@our.test",
                    b"Content-Type: text/plain\r\n\r\nhello\r\n", PASS)
    code, msg = session(r, ["learn-spam@our.test"], empty)
    assert code == 550 and msg.startswith(b"5.6.0"), msg
    assert db.read_bytes() == shipped
    # by our own hop (submission): no verifier results to judge by, refused at RCPT
    with UnixSMTP(str(r.workdir / "relay.sock"), timeout=30) as client:
        client.ehlo("signer.our.test")
        client.mail("alice@our.test")
        code, msg = client.rcpt("learn-spam@our.test")
    assert code == 550 and msg.startswith(b"5.7.1"), msg
    # the real thing, inline, to learn-ham@: 250 once it is in the file
    code, msg = session(r, ["learn-ham@our.test"],
                        wrapper("alice@gmail.test", "learn-ham@our.test", GMAIL_INLINE, PASS))
    assert code == 250 and b"learned as ham" in msg, msg + r.log().encode()
    assert Database.load(db).nham == nham + 1
    assert "learned ham (inline" in r.log()


def test_a_learn_db_that_cannot_be_used_stops_the_relay_in_one_line(tmp_path: Path) -> None:
    for path, why in ((tmp_path / "missing.db", "cannot read"),
                      (tmp_path / "junk.db", "not a poste spam database")):
        if path.name == "junk.db":
            path.write_bytes(b"junk")
        ran = run_poste(["relay", "--domain", "our.test", "--postmaster", "a@our.test",
                         "--users", str(tmp_path / "users"), "--spool", str(tmp_path / "spool"),
                         "--listen", "127.0.0.1:0", "--learn-db", str(path)])
        assert ran.returncode != 0 and "Traceback" not in ran.stderr
        lines = ran.stderr.strip().splitlines()
        assert len(lines) == 1 and "learn-db" in lines[0] and why in lines[0], ran.stderr
