"""The per-user spam policy (issue 13 item 5): tag, quarantine, reject, with real parts.

The receiving chain runs in both topologies (support/loop_world.py), with
the spamfilter's cutoffs at 0 so that every mail is labelled `yes`; every
test mail also carries a forged `X-Spamtacus: no` of its own, which the
relay must ignore.  The sender is swaks (or smtplib) on "Gmail's" address,
the users' targets Gmail's stand-in MX.  The digest's signature is then
judged by a real receiver: Postfix with OpenDKIM and OpenDMARC (support/mta.py).
"""

from __future__ import annotations

import json
import smtplib
import time
from pathlib import Path

import pytest

from poste.services.relay.digest import Schedule, make_digest
from poste.services.relay.spam_policy import trusted_label
from poste.users.repo import UsersRepoError, parse_entry
from support import mta, opendkim
from support.cli import run_poste
from support.knot import knot_server, simple_zone
from support.loop_world import (
    DOMAIN,
    GMAIL_IP,
    Extra,
    World,
    fields,
    make_world,
    start_inbound,
    swaks,
)
from support.net import free_port
from support.postfix_behind import PFX_IP, assert_ours_and_aligned, relay_before_postfix
from support.relay_env import Relay, header, make_users
from support.standin import StandIns

# -- the parts, alone ----------------------------------------------------------


def test_the_users_field_is_optional_and_checked() -> None:
    old = parse_entry("a", "our.test", b'{"targets": ["a@b.test"], "password": ""}', "a")
    assert old.spam == "tag"  # an entry written before the field: today's behaviour
    q = parse_entry("q", "our.test", b'{"targets": [], "spam": "quarantine"}', "q")
    assert q.spam == "quarantine"
    with pytest.raises(UsersRepoError, match="spam is not one of tag, quarantine, reject"):
        parse_entry("x", "our.test", b'{"targets": [], "spam": "drop"}', "x")


def test_users_cli_sets_and_shows_the_policy(tmp_path: Path) -> None:
    repo = str(tmp_path / "users")
    assert run_poste(["users", "add", "a", "--repo", repo, "--no-password"]).returncode == 0
    shown = run_poste(["users", "spam", "a", "--repo", repo])
    assert shown.stdout.strip() == "tag"  # the default for new users
    assert run_poste(["users", "spam", "a", "reject", "--repo", repo]).returncode == 0
    assert run_poste(["users", "spam", "a", "--repo", repo]).stdout.strip() == "reject"
    assert "spam=reject" in run_poste(["users", "list", "--repo", repo]).stdout
    bad = run_poste(["users", "spam", "a", "drop", "--repo", repo])
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_only_the_label_our_spamfilter_wrote_counts() -> None:
    relay = b"Received: from spamfilter by relay; now\r\n"
    ours = b"X-Spamtacus: yes\r\nReceived: from mail by spamfilter; now\r\n"
    forged = b"X-Spamtacus: no\r\nReceived: from gmail by mail; now\r\nSubject: x\r\n"
    assert trusted_label(relay + ours + b"Received: x\r\n" + forged) == "yes"
    # the sender's own field, with no spamfilter in between, is not a label
    assert trusted_label(relay + b"Received: from mail by spamfilter\r\n" + forged) is None
    assert trusted_label(relay + b"Received: a\r\nX-Spamtacus: yes\r\n") is None
    # folded, other case, and the -Detail field is not the label
    folded = relay + b"x-spamtacus-detail: score=1\r\nX-SPAMTACUS:\r\n  yes\r\nReceived: y\r\n"
    assert trusted_label(folded) == "yes"


def test_schedule_and_digest_text() -> None:
    assert Schedule.parse("06:30").next_after(0.0) == 6 * 3600 + 1800
    assert Schedule.parse("06:30").next_after(7 * 3600.0) == 86400 + 6 * 3600 + 1800
    assert Schedule.parse("12h").next_after(100.0) == 100 + 12 * 3600
    with pytest.raises(Exception, match="quarantine-digest"):
        Schedule.parse("soon")
    assert b"0 mails held" in make_digest(user="a@b.test", held=[], domain="b.test",
                                          hostname="h", keep_days=3)


# -- end to end, both topologies -----------------------------------------------

SPAM = (
    "X-Spamtacus: no\r\n"  # forged by the sender: must change nothing
    "From: Deals <deals@gmail.test>\r\nTo: {to}\r\nSubject: CHEAP PILLS {n}\r\n"
    "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <spam-{n}@gmail.test>\r\n"
    "\r\nWinner! Claim your prize now.\r\n"
)


def _send(world: World, server: tuple[str, int], to: str, n: int):  # type: ignore[no-untyped-def]
    path = world.tmp / f"spam-{n}.eml"
    path.write_bytes(SPAM.format(to=to, n=n).encode())
    host, port = server
    return swaks("--server", host, "--port", str(port), "--local-interface", GMAIL_IP,
                 "--ehlo", "mx.gmail.test", "--from", "deals@gmail.test", "--to", to,
                 "--data", str(path))


def _quarantine(*args: str) -> str:
    ran = run_poste(["quarantine", *args])
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


def _by_rcpt(mails: list[bytes], rcpt: str) -> list[bytes]:
    return [m for m in mails if fields(m, "Delivered-To") == [rcpt]]


@pytest.mark.parametrize("topology", ["separate", "up"])
def test_tag_quarantine_reject_end_to_end(tmp_path: Path, poste_bin: str, topology: str) -> None:
    world = make_world(tmp_path, poste_bin)
    try:
        for name, policy in (("q", "quarantine"), ("r", "reject")):
            ran = run_poste(["users", "add", name, "--repo", str(world.users), "--target",
                             f"{name}@gmail.test", "--no-password", "--spam", policy])
            assert ran.returncode == 0, ran.stderr
        extra: Extra = {
            "spamfilter": [("ham-cutoff", "0.0"), ("spam-cutoff", "0.0")],  # all is spam
            "relay": [("queue-rescan", '"1s"')],
        }
        if topology == "separate":  # `poste up` gives the relay the signer's key itself
            extra["relay"] += [("dkim-selector", "poste"), ("dkim-key", str(world.dkim_key))]
        server = start_inbound(world, topology, extra)
        spool = str(world.tmp / "spool")
        _check(world, server, spool)
    except BaseException:
        print(world.logs())
        raise
    finally:
        world.stop()


def _check(world: World, server: tuple[str, int], spool: str) -> None:
    # tag (login@, the default): forwarded, labelled by our spamfilter above the forgery
    r = _send(world, server, f"login@{DOMAIN}", 1)
    assert r.returncode == 0, r.stdout
    [tagged] = world.gmail.wait(1)
    assert fields(tagged, "X-Spamtacus") == ["yes", "no"]

    # reject: 550 5.7.1 at the end of DATA, seen by the sender's MTA (swaks)
    r = _send(world, server, f"r@{DOMAIN}", 2)
    assert r.returncode != 0
    assert "<** 550 5.7.1 Message refused as spam" in r.stdout, r.stdout

    # quarantine: 250, held in the relay, not forwarded
    r = _send(world, server, f"q@{DOMAIN}", 3)
    assert r.returncode == 0 and "held as" in r.stdout, r.stdout
    listed = [json.loads(line) for line in _quarantine("list", "--spool", spool, "--json")
              .splitlines()]
    assert len(listed) == 1 and listed[0]["user"] == f"q@{DOMAIN}"
    assert listed[0]["subject"] == "CHEAP PILLS 3" and "deals@gmail.test" in listed[0]["from"]
    qid = listed[0]["entry"]["id"]
    held = (Path(spool) / "quarantine" / f"{qid}.eml").read_bytes()
    assert b"Subject: CHEAP PILLS 3" in held

    # one transaction, two policies: the second recipient is told to come again (452 4.5.3)
    host, port = server
    with smtplib.SMTP(host, port, source_address=(GMAIL_IP, 0), timeout=30) as s:
        s.ehlo("mx.gmail.test")
        refused = s.sendmail("deals@gmail.test", [f"login@{DOMAIN}", f"r@{DOMAIN}"],
                             SPAM.format(to=f"login@{DOMAIN}", n=4).encode())
    assert list(refused) == [f"r@{DOMAIN}"] and refused[f"r@{DOMAIN}"][0] == 452, refused
    assert b"4.5.3" in refused[f"r@{DOMAIN}"][1]
    world.gmail.wait(2)

    # the digest, on request: to q's target, listing the held mail, signed by our domain
    _quarantine("digest", "--now", "--spool", spool)
    mails = world.gmail.wait(3)
    [digest] = _by_rcpt(mails, "q@gmail.test")
    text = digest.decode()
    assert qid in text and "CHEAP PILLS 3" in text and "deals@gmail.test" in text, text
    assert fields(digest, "From") == [f"poste quarantine <postmaster@{DOMAIN}>"]
    _dkim_passes(world, digest)
    assert fields(digest, "Return-Path") == ["<>"]

    # release: delivered through the spool, byte for byte what was held
    _quarantine("release", "--spool", spool, qid)
    mails = world.gmail.wait(4)
    [released] = [m for m in _by_rcpt(mails, "q@gmail.test") if m != digest]
    assert released.endswith(held), released[:600]
    assert _quarantine("list", "--spool", spool).strip() == ""
    journal = (Path(spool) / "quarantine" / "journal").read_text().splitlines()
    assert [json.loads(x)["event"] for x in journal] == ["held", "released"]


def _dkim_passes(world: World, mail: bytes) -> None:
    from poste.dkim.verify import verify
    from poste.services.verifier.spf import resolver_for

    results = verify(mail, resolver_for([world.nameserver]))
    assert [(r.result, r.domain) for r in results] == [("pass", DOMAIN)], results


# -- the digest at a real receiver: Postfix + OpenDKIM + OpenDMARC ---------------

@pytest.mark.skipif(not mta.available(), reason="postfix, opendkim or opendmarc missing")
def test_digest_passes_opendkim_and_opendmarc_at_a_postfix_mx(
    tmp_path: Path, poste_bin: str
) -> None:
    """dave@our.test quarantines spam; his target's MX is Postfix with the milters.

    The spam comes to the relay as the spamfilter sends it (its label above
    its Received:); the digest goes to dave@example.org through Postfix, and
    what OpenDKIM and OpenDMARC concluded reaches the stand-in behind it.
    """
    make_users(poste_bin, tmp_path / "users", {"dave": ["dave@example.org"]})
    assert run_poste(["users", "spam", "dave", "quarantine", "--repo",
                      str(tmp_path / "users")]).returncode == 0
    spam = (b"X-Spamtacus: yes\r\nReceived: from mail.our.test by spamfilter.our.test; "
            b"Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            + SPAM.format(to="dave@our.test", n=9).encode())
    with relay_before_postfix(tmp_path, poste_bin) as w:
        with smtplib.SMTP(w.relay.host, w.relay.port, timeout=30) as s:
            assert s.sendmail("deals@gmail.test", ["dave@our.test"], spam) == {}
        time.sleep(0.5)
        assert w.box.mails() == []  # held, not forwarded
        _quarantine("digest", "--now", "--spool", str(w.relay.spool))
        digest = w.wait_one()
    assert header(digest, "From") == ["poste quarantine <postmaster@our.test>"]
    assert b"CHEAP PILLS 9" in digest
    assert_ours_and_aligned(digest)


# -- durability and expiry -----------------------------------------------------


def test_held_mail_survives_a_crash_and_expires_with_a_trace(tmp_path: Path, poste_bin: str) -> None:
    """Held with fsync before the 250: a SIGKILLed relay still has it after restart;
    expiry removes it only with a journal line and a log line."""
    from poste.services.relay.quarantine import Quarantine

    make_users(poste_bin, tmp_path / "users", {"dave": ["dave@example.org"]})
    assert run_poste(["users", "spam", "dave", "quarantine", "--repo",
                      str(tmp_path / "users")]).returncode == 0
    spam = (b"X-Spamtacus: yes\r\nReceived: from mail by spamfilter; now\r\n"
            + SPAM.format(to="dave@our.test", n=7).encode())
    relay = Relay(poste_bin, tmp_path, "127.0.0.1:9", 9).start()
    try:
        with smtplib.SMTP(relay.host, relay.port, timeout=30) as s:
            assert s.sendmail("deals@gmail.test", ["dave@our.test"], spam) == {}
        relay.kill()  # SIGKILL right after the 250
        relay.start()
        out = _quarantine("list", "--spool", str(relay.spool))
        assert "CHEAP PILLS 7" in out and "dave@our.test" in out, out
        qid = out.split()[0]
        shown = run_poste(["quarantine", "show", "--spool", str(relay.spool), "--body", qid])
        assert shown.returncode == 0 and "Winner! Claim your prize now." in shown.stdout
        missing = run_poste(["quarantine", "release", "--spool", str(relay.spool), "NOPE"])
        assert missing.returncode == 1 and "no mail NOPE" in missing.stderr
        assert "Traceback" not in missing.stderr
    finally:
        relay.stop()
    q = Quarantine(relay.spool)
    [held] = q.expire(30 * 86400, now=time.time() + 31 * 86400)
    assert held.id == qid and q.ids() == []
    events = [json.loads(x) for x in (q.path / "journal").read_text().splitlines()]
    assert [(e["event"], e["id"]) for e in events] == [("held", qid), ("expired", qid)]
    assert events[-1]["subject"] == "CHEAP PILLS 7"
    nospool = run_poste(["quarantine", "list", "--spool", str(tmp_path / "none")])
    assert nospool.returncode == 1 and "no spool folder" in nospool.stderr


def test_our_own_sending_path_is_never_held_or_split(tmp_path: Path, poste_bin: str) -> None:
    """From a granted peer (our signer), a quarantine user beside a remote friend is one
    transaction, and the mail is queued, not held: the sending path has no spamfilter."""
    make_users(poste_bin, tmp_path / "users", {"dave": ["dave@example.org"]})
    assert run_poste(["users", "spam", "dave", "quarantine", "--repo",
                      str(tmp_path / "users")]).returncode == 0
    mail = (b"X-Spamtacus: yes\r\nReceived: from submission by signer; now\r\n"
            + SPAM.format(to="dave@our.test", n=8).encode())
    relay = Relay(poste_bin, tmp_path, "127.0.0.1:9", 9, "--granted", "127.0.0.1/32").start()
    try:
        with smtplib.SMTP(relay.host, relay.port, timeout=30) as s:
            assert s.sendmail("me@our.test", ["friend@example.org", "dave@our.test"], mail) == {}
    finally:
        relay.stop()
    assert _quarantine("list", "--spool", str(relay.spool)).strip() == ""
    assert "queued as" in relay.log()


@pytest.mark.parametrize("flag, value, word", [
    ("--quarantine-digest", "soon", "quarantine-digest"),
    ("--quarantine-days", "0", "quarantine-days"),
    ("--spam-label", "X Spam:", "spam-label"),
])
def test_a_bad_policy_setting_is_one_line(
    tmp_path: Path, poste_bin: str, flag: str, value: str, word: str
) -> None:
    make_users(poste_bin, tmp_path / "users", {"dave": ["dave@example.org"]})
    out = run_poste(["relay", "--domain", "our.test", "--postmaster", "admin@example.org",
                     "--users", str(tmp_path / "users"), "--spool", str(tmp_path / "spool"),
                     "--listen", "127.0.0.1:0", "--srs-secret", "s", flag, value])
    assert out.returncode != 0 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("Error: ") and word in out.stderr, out.stderr


def test_poste_up_reads_the_label_under_the_spamfilters_name(tmp_path: Path) -> None:
    from poste.stack.build import build
    from poste.stack.config import load
    from poste.stack.init import Layout, write_stack

    d = tmp_path / "mail"
    write_stack(d, Layout(domain="our.test", hostname="mail.our.test",
                          postmaster="admin@elsewhere.test", mailbox="box"))
    text = (d / "poste.toml").read_text()
    (d / "poste.toml").write_text(text.replace("[spamfilter]",
                                               '[spamfilter]\nheader-name = "X-Verdict"'))
    stack = build(load(d / "poste.toml"), check=True)
    assert stack.relay.hop.spam is not None and stack.relay.hop.spam.label_name == "X-Verdict"


@pytest.mark.skipif(not mta.available(), reason="postfix, opendkim or opendmarc missing")
def test_postfix_as_the_sender_splits_on_452_and_sees_the_550(tmp_path: Path, poste_bin: str) -> None:
    """A real sending MTA in front of our chain (Postfix -> spamfilter -> relay): one mail to
    a tag user and a reject user.  The relay answers 452 4.5.3 to the second RCPT of the
    transaction; Postfix finishes the first (the reject user's, in its order: 550 5.7.1 at
    the end of DATA, bounced to the sender), keeps the other and sends it in a transaction
    of its own at its next queue run (flushed here), where it is forwarded labelled."""
    import subprocess

    from support.net import wait_port

    make_users(poste_bin, tmp_path / "users", {"tina": ["tina@box.test"], "rex": ["rex@box.test"]})
    assert run_poste(["users", "spam", "rex", "reject", "--repo",
                      str(tmp_path / "users")]).returncode == 0
    box_ip = "127.0.0.33"
    zones = {"box.test": simple_zone("box.test", f"@ MX 10 mx.box.test.\nmx A {box_ip}\n")}
    port = free_port(PFX_IP)
    with knot_server(tmp_path / "knot", zones, host=opendkim.port53_host(), port=53) as ns, \
            StandIns([box_ip]) as mx:
        box = mx.start(box_ip, tmp_path / "box")
        relay = Relay(poste_bin, tmp_path, ns.nameserver, mx.port).start()
        sf_port = free_port("127.0.0.1")
        with open(tmp_path / "spamfilter.log", "wb") as log:
            spamfilter = subprocess.Popen(
                [poste_bin, "spamfilter", "--listen", f"127.0.0.1:{sf_port}", "--destination",
                 f"127.0.0.1:{relay.port}", "--ham-cutoff", "0", "--spam-cutoff", "0"],
                stdout=log, stderr=log, start_new_session=True)
        try:
            wait_port("127.0.0.1", sf_port, timeout=20)
            with mta.receiving_mta(tmp_path / "pfx", "our.test", PFX_IP, port,
                                   ("127.0.0.1", sf_port), ns.host) as maillog:
                with smtplib.SMTP(PFX_IP, port, timeout=30) as s:
                    assert s.sendmail("deals@gmail.test", ["tina@our.test", "rex@our.test"],
                                      SPAM.format(to="tina@our.test", n=5).encode()) == {}
                # Postfix keeps the 452 recipient for a later queue run; flush makes it now
                deadline = time.monotonic() + 60
                text = ""
                while not box.mails() and time.monotonic() < deadline:
                    text = maillog.read_text(errors="replace")
                    if "dsn=4.5.3, status=deferred" in text:
                        subprocess.run(["postqueue", "-c", str(maillog.parent), "-f"],
                                       capture_output=True, timeout=30)
                    time.sleep(1)
                text = maillog.read_text(errors="replace")
                try:
                    [tagged] = box.wait(1, timeout=5)
                except TimeoutError:
                    raise AssertionError(text[-3000:] + relay.log()) from None
        finally:
            spamfilter.terminate()
            spamfilter.wait(15)
            relay.stop()
    assert fields(tagged, "X-Spamtacus") == ["yes", "no"]
    assert fields(tagged, "Delivered-To") == ["tina@box.test"]
    # Postfix's own words: one recipient deferred with 452 4.5.3 (the second of its
    # transaction), the reject user's bounced with our 550 at the end of DATA
    assert "dsn=4.5.3, status=deferred" in text, text[-3000:]
    rex = [x for x in text.splitlines() if "to=<rex@our.test>" in x and "status=bounced" in x]
    assert rex and "550 5.7.1 Message refused as spam" in rex[0], text[-3000:]
    assert "sender non-delivery notification" in text
