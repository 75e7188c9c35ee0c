"""Header From policy on submission (issue 15, item 8): From:/Sender: must be the user's.

Unit cases on the raw header, the users repository's `send-as` field, and the
whole path in both topologies: a separate `poste submission` in front of
`poste srv`, and `poste up` (submission -> signer -> relay -> mailbox folder),
asserting the 553 and that nothing reached the next hop (nothing signed).
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poste.services.submission import sender_policy
from poste.services.submission.sender_policy import check_header
from poste.smtp.tls import self_signed
from poste.stack.build import build
from poste.stack.config import load
from poste.stack.init import Layout, write_stack
from poste.users import passwords, store
from poste.users.repo import UsersRepoError, UsersWatcher, load_snapshot, user_to_json
from support.cli import run_poste
from support.service import listening_ports, stop

DOMAIN = "our.test"
HOST = "127.0.0.1"


def add_user(repo: Path, path: str, pw: str | None, **extra: object) -> None:
    body = {
        "targets": [f"{path.rpartition('/')[2]}@ext.test"],
        "password": passwords.hash_password(pw) if pw else "",
        "insecure": False,
    } | extra
    store.commit_file(repo, path, json.dumps(body).encode(), f"add {path}", create=True)


def make_users(repo: Path) -> None:
    add_user(repo, "bob", "bob-pw", aliases=["robert"])
    add_user(repo, "alice", "alice-pw")
    add_user(repo, "desk", "desk-pw", **{"send-as": ["*@our.test", "press@other.test"]})
    add_user(repo, "other.test/carol", None)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    repo = tmp_path_factory.mktemp("hdr") / "users"
    make_users(repo)
    return load_snapshot(repo, DOMAIN)


def mail(*fields: str) -> bytes:
    return ("\r\n".join(fields) + "\r\n\r\nbody\r\n").encode()


BOB_MAY = [
    "From: bob@our.test",
    "From: Bob <bob@our.test>",
    "From: BOB@Our.Test",
    "From: robert@our.test",  # an alias
    "From: bob+news@our.test",  # a +tag
    'From: "Bob, the builder" <bob@our.test>',
    "From: bob@our.test (Bob)",
    "From: =?utf-8?q?B=C3=B6b?= <bob@our.test>",
    "From: team: bob@our.test, robert@our.test;",  # a group of his own addresses
    "From:\r\n Bob\r\n <bob@our.test>",  # folded
    "From: Bob <bob@our.test>\r\nSender: robert@our.test",
    "FROM : bob@our.test",  # obsolete syntax, still a From
    "from: B\u00f6b <bob@our.test>",  # raw UTF-8 display name
]

BOB_MAY_NOT = [
    "From: alice@our.test",
    "From: Alice <alice@our.test>",
    "From: bob@our.test, alice@our.test",  # several authors, one not his
    "From: team: bob@our.test, alice@our.test;",
    "From: undisclosed-recipients:;",  # a group with no address
    "From: <",
    "From: bob",  # no domain: nothing to show or align on
    "From: ",
    'From: "alice@our.test" <bob@our.test>',  # an address in the display name
    "From: Bob (alice@our.test) <bob@our.test>",  # in a comment
    "From: =?utf-8?q?alice=40our.test?= <bob@our.test>",  # in an encoded word
    "From: alice@our.test@evil.test",
    "From: <@relay.test:alice@our.test>",
    "From: bob@evil.test",
    "From: bob@our.test\r\nSender: alice@our.test",
    "From: bob@our.test\r\nSender: <",
    "From: carol@other.test",
]


@pytest.mark.parametrize("header", BOB_MAY)
def test_bob_may_use_his_addresses(db, header: str) -> None:  # type: ignore[no-untyped-def]
    bob = db.lookup("bob")
    assert check_header(db, bob, mail(header, "To: x@ext.test", "Subject: hi")) is None


@pytest.mark.parametrize("header", BOB_MAY_NOT)
def test_bob_may_not_use_anyone_elses(db, header: str) -> None:  # type: ignore[no-untyped-def]
    bob = db.lookup("bob")
    reply = check_header(db, bob, mail("To: x@ext.test", header, "Subject: hi"))
    assert reply is not None and (reply.code, reply.text[:5]) == (553, "5.7.1"), header


def test_missing_or_duplicated_from_is_refused(db) -> None:  # type: ignore[no-untyped-def]
    bob = db.lookup("bob")
    for data in (
        mail("To: x@ext.test", "Subject: no from"),
        mail("From: bob@our.test", "From: alice@our.test"),
        mail("From: bob@our.test", "Sender: bob@our.test", "Sender: alice@our.test"),
        b"Subject: no separator, no from\r\n",
        b"\r\nFrom: bob@our.test\r\n",  # that From is in the body
    ):
        reply = check_header(db, bob, data)
        assert reply is not None and (reply.code, reply.text[:5]) == (550, "5.6.0"), data
    # a From in the body does not count; one header From is what is judged
    data = mail("From: bob@our.test") + b"From: alice@our.test\r\n"
    assert check_header(db, bob, data) is None
    assert check_header(db, bob, b"From: alice@our.test\r\n\r\nFrom: bob@our.test\r\n")
    # 8-bit that is not UTF-8: harmless in a display name, never an address of his
    assert check_header(db, bob, b"From: B\xf6b <bob@our.test>\r\n\r\n") is None
    reply = check_header(db, bob, b"From: b\xf6b@our.test\r\n\r\n")
    assert reply is not None and reply.code == 553


def test_send_as_grants_a_domain_or_an_address(db) -> None:  # type: ignore[no-untyped-def]
    desk = db.lookup("desk")
    assert desk.send_as == ("*@our.test", "press@other.test")
    for ok in ("info@our.test", "alice@our.test", "Press@Other.Test", "desk@our.test"):
        assert check_header(db, desk, mail(f"From: {ok}")) is None, ok
    for bad in ("info@other.test", "x@ext.test", "info@our.test.evil.test"):
        assert check_header(db, desk, mail(f"From: {bad}")) is not None, bad


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("*@our.test", None),
        (["*@our.test", "Info@Our.Test."], None),
        (["*"], "neither"),
        (["*@"], "neither"),
        (["*@-not-a-domain-"], "neither"),
        (["x*@our.test"], None),  # `*` is atext: that is the literal address x*@our.test
        (["bob"], "neither"),
        ([7], "not a string"),
        ([], None),
    ],
)
def test_send_as_is_validated(tmp_path: Path, value: object, why: str | None) -> None:
    repo = tmp_path / "users"
    add_user(repo, "bob", "pw")
    watcher = UsersWatcher(repo, DOMAIN)
    body = {"targets": [], "password": "", "send-as": value}
    store.commit_file(repo, "desk", json.dumps(body).encode(), "desk")
    if why is None and isinstance(value, list):
        assert watcher.reload() is True
        desk = watcher.db.lookup("desk")
        assert desk is not None
        again = json.loads(user_to_json(desk))
        expected = {"Info@Our.Test.": "Info@our.test"}  # a domain is case-blind
        assert again.get("send-as", []) == [expected.get(v, v) for v in value]
    else:
        assert watcher.reload() is False
        assert watcher.last_error is not None
        assert (why or "send-as is not a list") in watcher.last_error
    with pytest.raises(UsersRepoError):
        store.validate_content("x", DOMAIN, b'{"send-as": "*@our.test"}', "x")


def test_users_passwd_keeps_send_as(tmp_path: Path, poste_bin: str) -> None:
    repo = tmp_path / "users"
    add_user(repo, "desk", "old", **{"send-as": ["*@our.test"]})
    for args, stdin in ((["passwd", "desk", "--password-stdin"], "new-pw\n"),
                        (["targets", "desk", "--add", "t@ext.test"], None)):
        ran = run_poste(["users", *args, "--repo", str(repo)], input=stdin or "")  # in-process
        assert ran.returncode == 0, ran.stderr
    desk = load_snapshot(repo, DOMAIN).lookup("desk")
    assert desk is not None and desk.send_as == ("*@our.test",)
    assert passwords.verify(desk.password, "new-pw") and "t@ext.test" in desk.targets


# -- the whole path ---------------------------------------------------------

_CTX = ssl.create_default_context()
_CTX.check_hostname = False
_CTX.verify_mode = ssl.CERT_NONE


def submit(port: int, login: str, password: str, sender: str, data: bytes) -> tuple[int, str]:
    """AUTH over implicit TLS and one mail; (the DATA reply code, its text)."""
    with smtplib.SMTP_SSL(HOST, port, context=_CTX, timeout=60) as client:
        client.login(login, password)
        try:
            client.sendmail(sender, ["friend@ext.test"], data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode(errors="replace")
        return 250, ""


CASES = [  # (login, envelope sender, header fields, expected code)
    ("bob", "bob@our.test", ["From: Alice <alice@our.test>"], 553),
    ("bob", "bob@our.test", ["From: bob@our.test", "Sender: alice@our.test"], 553),
    ("bob", "bob@our.test", ['From: "alice@our.test" <bob@our.test>'], 553),
    ("bob", "bob@our.test", ["Subject: no From"], 550),
    ("bob", "bob@our.test", ["From: Bob <bob@our.test>"], 250),
    ("desk", "desk@our.test", ["From: News desk <news@our.test>"], 250),
    ("desk", "desk@our.test", ["From: news@other.test"], 553),
]


def run_cases(port: int, arrived: Callable[[str, bool], bytes | None]) -> None:
    for i, (login, sender, fields, expected) in enumerate(CASES):
        marker = f"X-Case: {i}-{time.time_ns()}"
        data = mail(*fields, "To: friend@ext.test", marker)
        code, text = submit(port, login, f"{login}-pw", sender, data)
        assert code == expected, (fields, code, text)
        if expected == 250:
            signed = arrived(marker, True)
            assert signed is not None, fields
        else:
            assert "5.7.1" in text or "5.6.0" in text
            assert arrived(marker, False) is None, fields  # nothing reached the next hop


def test_separate_submission_refuses_and_passes_nothing_on(
    tmp_path: Path, poste_bin: str
) -> None:
    make_users(tmp_path / "users")
    self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", "mail.our.test")
    outbox = tmp_path / "outbox"
    with open(tmp_path / "srv.log", "wb") as fh:  # both listen on port 0, read from their logs
        srv = subprocess.Popen(
            [poste_bin, "srv", f"{HOST}:0", "-o", f"{outbox}/", "--count", "0", "--with-data"],
            stdout=subprocess.DEVNULL,
            stderr=fh,
        )
    log = tmp_path / "submission.log"
    try:
        [dest] = listening_ports(tmp_path / "srv.log", HOST, 1, srv)
        with open(log, "wb") as fh:
            sub = subprocess.Popen(
                [poste_bin, "submission", "--domain", DOMAIN, "--destination", f"{HOST}:{dest}",
                 "--users", str(tmp_path / "users"), "--tls-cert", str(tmp_path / "cert.pem"),
                 "--tls-key", str(tmp_path / "key.pem"), "--listen-tls", f"{HOST}:0"],
                stdout=subprocess.DEVNULL,
                stderr=fh,
            )
    except BaseException:
        stop(srv)
        raise
    try:
        [port] = listening_ports(log, HOST, 1, sub)

        def arrived(marker: str, wait: bool) -> bytes | None:
            # Not waiting for a refused mail: submission passes a mail on (and srv has
            # stored it) before it answers DATA, so one refused after being passed on
            # would be in the outbox by the time the client reads the 5xx.
            deadline = time.monotonic() + (20 if wait else 0)
            while True:
                for p in outbox.glob("*.eml"):
                    if marker.encode() in p.read_bytes():
                        return p.read_bytes()
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.05)

        run_cases(port, arrived)
        assert "header refused" in log.read_text()
    finally:
        for proc in (sub, srv):
            proc.terminate()
            proc.wait(10)


async def test_poste_up_refuses_and_signs_nothing(tmp_path: Path) -> None:
    d = tmp_path / "mail"
    write_stack(d, Layout(domain=DOMAIN, hostname="mail.our.test",
                          postmaster="admin@elsewhere.test", mailbox="box"))
    make_users(d / "users")
    text = (d / "poste.toml").read_text()  # listeners on port 0: read from the started stack
    text = text.replace('listen-tls = "0.0.0.0:465"', f'listen-tls = "{HOST}:0"')
    text = text.replace('listen = "0.0.0.0:587"', f'listen = "{HOST}:0"')
    text = text.replace("[verifier]", "[verifier]\nenabled = false")
    (d / "poste.toml").write_text(text)
    stack = build(load(d / "poste.toml"))
    await stack.start()
    tls_port = next(s.sockname[1] for s in stack.services if s.implicit_tls)
    try:

        def arrived(marker: str, wait: bool) -> bytes | None:
            # Not waiting for a refused mail: the chain is in memory and the relay has
            # the mail in its spool (fsync) before DATA is answered, and writes the
            # mailbox file before it leaves the spool: a mail passed on before a 5xx
            # is in one of the two by the time the client reads it.
            deadline = time.monotonic() + (20 if wait else 0)
            while True:
                for p in [*(d / "box").glob("*.eml"), *(d / "spool").glob("*.eml")]:
                    data = p.read_bytes()
                    if marker.encode() in data:
                        assert b"DKIM-Signature:" in data
                        return data
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.05)

        await asyncio.to_thread(run_cases, tls_port, arrived)
    finally:
        await stack.stop()
    assert (d / "submission-auth.json").exists()  # the AUTH counters' file, beside the spool


# -- the fast lane of field_addresses: the parser's own answer, for the shapes it takes --

@settings(max_examples=1000, deadline=None)
@given(st.from_regex(sender_policy._SIMPLE, fullmatch=True)
       | st.from_regex(r"[ \t]*[A-Za-z=?@ ]{0,6}<?[a-z=?.]{1,4}@[a-z.]{1,4}>?[ \t]*",
                       fullmatch=True))
def test_simple_from_values_read_as_the_parser_reads_them(value: str) -> None:
    assert sender_policy.field_addresses(value) == sender_policy.parsed_addresses(value)
