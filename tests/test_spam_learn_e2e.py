"""Learning from users, end to end, in both topologies (`poste up` and separate processes).

The loop world (knot for DNS, `poste srv` as Gmail's MX): a spam the shipped
database does not label `yes` reaches login@x25519.test and is forwarded to
login@gmail.test.  A forged learn mail (From login@gmail.test, but sent from
an address gmail.test's SPF refuses, no DKIM) is refused and trains nothing;
then the user "forwards it from Gmail" (from Gmail's own address, SPF pass for
gmail.test) as an attachment to learn-spam@x25519.test, gets 250 once the
database is on disk, and the next copy of the spam is labelled `yes` by the
running spamfilter, no restart, no SIGHUP.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from poste.spam import default_db_file
from support.loop_world import (
    DOMAIN,
    GMAIL_IP,
    OUR_OUTGOING_IP,
    World,
    fields,
    inbound,
    metrics,
    sample,
    swaks,
)
from support.net import free_port

pytestmark = pytest.mark.slow

USER, TARGET = f"login@{DOMAIN}", "login@gmail.test"

# A spam of today's kind (a crypto "bonus"): the 2002 training mail of the shipped
# database leaves it `unknown` or `no` (checked below, before anything is learnt; 0.10 with
# the database of the fourth round, 0.82 with the ham-weight-3 one: the first wording, "Hello friend", "Your wallet", "Our team ...
# within hours", scored 0.95 with the one before it and 0.99, `yes`, with this one).
SPAM = (
    "From: \"Crypto Desk\" <desk@profit-wave.test>\r\n"
    f"To: {USER}\r\n"
    "Subject: The wallet bonus is waiting\r\n"
    "Date: Tue, 01 Dec 2026 09:00:00 +0000\r\n"
    "Message-ID: <a1@profit-wave.test>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    "Hello,\r\n"
    "\r\n"
    "Your account at our exchange holds a pending bonus of 0.42 BTC.\r\n"
    "Confirm your wallet today to release the transfer: https://claim.profit-wave.test/r/8812\r\n"
    "The desk checks each wallet. Kind regards, the desk\r\n"
)


def learn_mail(original: bytes, sender: str = TARGET) -> str:
    """What Gmail's "Forward as attachment" makes: a note, and the mail as message/rfc822."""
    return (
        f"From: Login <{sender}>\r\nTo: learn-spam@{DOMAIN}\r\nSubject: Fwd: spam\r\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <fwd-1@gmail.test>\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="fwd"\r\n\r\n'
        "--fwd\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nthis is spam\r\n"
        "--fwd\r\nContent-Type: message/rfc822\r\n"
        'Content-Disposition: attachment; filename="spam.eml"\r\n\r\n'
        + original.decode("utf-8", "replace")
        + "\r\n--fwd--\r\n"
    )


def send_spam(world: World, verifier: tuple[str, int], n: int) -> bytes:
    """The spammer's copy n, through our MX to the user's Gmail; the mail Gmail got."""
    path = world.tmp / f"spam-{n}.eml"
    path.write_text(SPAM.replace("<a1@", f"<a{n}@"), newline="")
    host, port = verifier
    before = len(world.gmail.mails())
    r = swaks("--server", host, "--port", str(port), "--from", "desk@profit-wave.test",
              "--to", USER, "--data", f"@{path}")
    assert r.returncode == 0, r.stdout + r.stderr + world.logs()
    try:
        return world.gmail.wait(before + 1)[-1]
    except TimeoutError:
        raise AssertionError(world.logs()) from None


def send_learn(world: World, verifier: tuple[str, int], text: str, local_ip: str,
               name: str) -> str:
    path = world.tmp / f"{name}.eml"
    path.write_text(text, newline="")
    host, port = verifier
    r = swaks("--server", host, "--port", str(port), "--local-interface", local_ip,
              "--ehlo", "mx.gmail.test", "--from", TARGET, "--to", f"learn-spam@{DOMAIN}",
              "--data", f"@{path}")
    return r.stdout + r.stderr


@pytest.mark.parametrize("topology", ["up", "separate"])
def test_a_user_teaches_the_running_filter_and_a_forger_does_not(
    tmp_path: Path, poste_bin: str, topology: str
) -> None:
    db = tmp_path / "spam.db.gz"
    shutil.copy(default_db_file(), db)
    addr = f"127.0.0.1:{free_port('127.0.0.1')}"
    with inbound(tmp_path, poste_bin, topology, spam_db=db, metrics=addr) as (world, verifier):
        first = send_spam(world, verifier, 1)
        assert fields(first, "X-Spamtacus") in (["no"], ["unknown"]), fields(first, "X-Spamtacus")

        # Forged: From the user's target, but from an address gmail.test's SPF fails, no DKIM.
        shipped = db.read_bytes()
        out = send_learn(world, verifier, learn_mail(first), OUR_OUTGOING_IP, "forged")
        assert "550 5.7.1" in out, out + world.logs()
        assert db.read_bytes() == shipped  # nothing trained
        second = send_spam(world, verifier, 2)
        assert fields(second, "X-Spamtacus") != ["yes"]
        assert len(world.gmail.mails()) == 2  # the learn mail went nowhere

        # Genuine: from Gmail's own address (SPF pass, aligned with From: gmail.test).
        out = send_learn(world, verifier, learn_mail(second), GMAIL_IP, "genuine")
        assert "250 2.0.0 Ok: learned as spam" in out, out + world.logs()
        assert db.read_bytes() != shipped
        third = send_spam(world, verifier, 3)
        assert fields(third, "X-Spamtacus") == ["yes"], world.logs()
        assert len(world.gmail.mails()) == 3  # the spam, thrice; never a learn mail

        m = metrics(addr)
        assert sample(m, "poste_learn_mails_total", kind="spam", result="forged") == 1
        assert sample(m, "poste_learn_mails_total", kind="spam", result="learned") == 1


def inline_forward(original: bytes) -> str:
    """What Gmail's plain "Forward" makes: the original's text below its marker."""
    head, _, body = original.decode("utf-8", "replace").partition("\r\n\r\n")
    quoted = {k: v for k, _, v in (line.partition(": ") for line in head.split("\r\n"))}
    return (
        f"From: Login <{TARGET}>\r\nTo: learn-spam@{DOMAIN}\r\nSubject: Fwd: spam\r\n"
        "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <fwd-2@gmail.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "more of it\r\n\r\n---------- Forwarded message ---------\r\n"
        f"From: {quoted['From']}\r\nDate: Tue, Dec 1, 2026 at 9:00 AM\r\n"
        f"Subject: {quoted['Subject']}\r\nTo: <{USER}>\r\n\r\n" + body
    )


def test_an_inline_forward_teaches_too(tmp_path: Path, poste_bin: str) -> None:
    """Gmail's plain Forward (no attachment): the quoted header and body are learnt."""
    db = tmp_path / "spam.db.gz"
    shutil.copy(default_db_file(), db)
    with inbound(tmp_path, poste_bin, "separate", spam_db=db) as (world, verifier):
        first = send_spam(world, verifier, 1)
        assert fields(first, "X-Spamtacus") != ["yes"]
        out = send_learn(world, verifier, inline_forward(first), GMAIL_IP, "inline")
        assert "250 2.0.0 Ok: learned as spam" in out, out + world.logs()
        assert "learned spam (inline" in world.logs()
        second = send_spam(world, verifier, 2)
        assert fields(second, "X-Spamtacus") == ["yes"], world.logs()
