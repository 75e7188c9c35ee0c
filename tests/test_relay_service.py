"""`poste relay` end to end: knot serves the test zones, stand-ins play the MX hosts.

One `poste relay` process per test (each test runs it with its own flags and
spool); what does not change between tests is shared: knotd serving the test
zones and the users repository (copied for each test) are made once per
module, and the stand-in MX hosts run `poste srv`'s mailbox code in this
process (support/standin.py) instead of a `poste srv` process each.
Bad flags are checked in this process through `poste.cli.main`; one case
still runs the installed `poste relay` itself.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import smtplib
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from poste.smtp.client import send_message
from support.cli import run_poste
from support.inotify import IN_ISDIR, IN_OPEN, Watch
from support.knot import KnotServer, knot_server
from support.relay_env import MX, Relay, header, make_users, mx_zones, return_path
from support.standin import StandIn, StandIns

HOSTS = [f"127.0.0.{i}" for i in range(21, 30)]


def mail(subject: str, extra: str = "") -> bytes:
    return (
        f"From: Bob <bob@example.org>\r\nTo: alice@our.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@example.org>\r\n{extra}\r\nHello.\r\n"
    ).encode()


def send(relay: Relay, sender: str, rcpts: list[str], data: bytes) -> tuple[int, bytes]:
    """One transaction; returns the reply to DATA (or to the first refused command)."""
    with smtplib.SMTP(relay.host, relay.port, timeout=30) as s:
        s.ehlo("client.test")
        code, msg = s.mail(sender)
        assert code == 250, msg
        for r in rcpts:
            code, msg = s.rcpt(r)
            if code != 250:
                return code, msg
        return s.data(data)


@pytest.fixture(scope="module")
def zones_ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnotServer]:
    """knotd serving mx_zones(), for every test of the module (they only read it)."""
    with knot_server(tmp_path_factory.mktemp("knot"), mx_zones()) as ns:
        yield ns


@pytest.fixture(scope="module")
def users_template(tmp_path_factory: pytest.TempPathFactory, poste_bin: str) -> Path:
    """The users repository the tests start from; each test gets its own copy."""
    repo = tmp_path_factory.mktemp("users-template") / "users"
    make_users(poste_bin, repo, {
        "alice": ["alice@gmail.test", "alice2@outlook.test"],
        "carol": ["carol@late.test"],
        "dave": ["dave@refuse.test"],
        "erin": ["erin@down.test"],
    })
    return repo


class World:
    def __init__(self, poste_bin: str, tmp: Path, ns: KnotServer, users: Path,
                 mx: StandIns) -> None:
        self.poste_bin, self.tmp, self.ns, self.mx = poste_bin, tmp, ns, mx
        self.port = mx.port
        self.relays: list[Relay] = []
        shutil.copytree(users, tmp / "users", symlinks=True)

    def srv(self, domain: str, rcpt_reply: str | None = None) -> StandIn:
        """The stand-in for `domain`'s MX (`poste srv ... --with-data [--rcpt-reply R]`)."""
        return self.mx.start(MX[domain], self.tmp / "mx" / domain, rcpt_reply=rcpt_reply)

    def relay(self, *extra: str, granted: str | None = "127.0.0.0/8") -> Relay:
        """A relay; `granted`: the network our test client (127.0.0.1) relays from, as an
        admin grants a signer on another host (None: nothing but the local socket)."""
        more = ("--granted", granted) if granted else ()
        r = Relay(self.poste_bin, self.tmp, self.ns.nameserver, self.port, *more, *extra).start()
        self.relays.append(r)
        return r

    def queue(self) -> str:
        out = run_poste(["queue", "list", "--spool", str(self.tmp / "spool")])
        return out.stdout + out.stderr


@pytest.fixture
def world(
    poste_bin: str, tmp_path: Path, zones_ns: KnotServer, users_template: Path
) -> Iterator[World]:
    with StandIns(HOSTS) as mx:
        w = World(poste_bin, tmp_path, zones_ns, users_template, mx)
        try:
            yield w
        finally:
            for r in w.relays:
                r.stop()


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_forward_with_srs_and_bounce_back(world: World) -> None:
    gmail, outlook, example = world.srv("gmail.test"), world.srv("outlook.test"), world.srv(
        "example.org"
    )
    relay = world.relay()
    code, msg = send(relay, "bob@example.org", ["alice@our.test"], mail("m1"))
    assert code == 250 and b"queued as" in msg
    [g] = gmail.wait(1)
    [o] = outlook.wait(1)
    assert header(g, "Delivered-To") == ["alice@gmail.test"]
    assert header(o, "Delivered-To") == ["alice2@outlook.test"]
    srs = return_path(g)
    assert srs.startswith("SRS0=") and srs.endswith("@our.test") and "example.org" in srs
    assert b"Message-ID: <m1@example.org>" in g and b"by relay.our.test" in g

    # The destination bounces to the SRS address: it reaches the original sender.
    bounce = (
        b"From: MAILER-DAEMON@gmail.test\r\nTo: " + srs.encode() + b"\r\n"
        b"Subject: Undelivered Mail\r\nMessage-ID: <bounce1@gmail.test>\r\n\r\nsorry\r\n"
    )
    code, _ = send(relay, "", [srs], bounce)
    assert code == 250
    [b] = example.wait(1)
    assert header(b, "Delivered-To") == ["bob@example.org"] and return_path(b) == ""
    assert b"<bounce1@gmail.test>" in b

    # user+tag@ is user@; postmaster@ goes to --postmaster; our own sender is not rewritten.
    assert send(relay, "carol@our.test", ["alice+news@our.test"], mail("m2"))[0] == 250
    g2 = gmail.wait(2)[1]
    assert return_path(g2) == "carol@our.test" and header(g2, "Delivered-To") == ["alice@gmail.test"]
    assert send(relay, "bob@example.org", ["postmaster@our.test"], mail("m3"))[0] == 250
    pm = example.wait(2)[1]
    assert header(pm, "Delivered-To") == ["admin@example.org"]


def test_refusals_at_rcpt_and_loops(world: World) -> None:
    relay = world.relay()
    code, msg = send(relay, "bob@example.org", ["nobody@our.test"], mail("x"))
    assert code == 550 and msg.startswith(b"5.1.1")
    forged = "SRS0=AAAAAA=AB=example.org=bob@our.test"
    code, msg = send(relay, "", [forged], mail("y"))
    assert code == 550 and b"SRS" in msg
    loop = "".join(f"Received: from h{i} by h{i + 1}; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                   for i in range(31))
    code, msg = send(relay, "bob@example.org", ["alice@our.test"], mail("loop", loop))
    assert code == 554 and msg.startswith(b"5.4.6")
    assert "0 message(s)" in world.queue()


def test_not_an_open_relay(world: World) -> None:
    """By default no address is trusted: 127.0.0.1 is anyone on this machine (issue 15)."""
    gmail = world.srv("gmail.test")
    world.srv("outlook.test")
    relay = world.relay(granted=None)
    code, msg = send(relay, "spammer@example.org", ["victim@gmail.test"], mail("spam"))
    assert code == 550 and msg.startswith(b"5.7.1")
    # Local recipients are still reached from anywhere.
    assert send(relay, "bob@example.org", ["alice@our.test"], mail("ok"))[0] == 250
    assert len(gmail.wait(1)) == 1


def test_our_own_hop_relays_through_the_local_socket(world: World) -> None:
    """The signer's way out: a unix socket; what comes in there may go anywhere."""
    outlook = world.srv("outlook.test")
    folder = Path(tempfile.mkdtemp(prefix="poste-sock-"))  # a socket path has 108 bytes at most
    try:
        sock = folder / "relay.sock"
        relay = world.relay("--local-socket", str(sock), granted=None)
        wait_for(lambda: f"relay listening on unix:{sock}" in relay.log(), "the local socket")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        result = asyncio.run(send_message(str(sock), 0, "alice@our.test", ["x@outlook.test"],
                                          mail("via socket"), helo="signer.our.test"))
        assert result.accepted == ["x@outlook.test"], result
        [o] = outlook.wait(1)
        assert header(o, "Delivered-To") == ["x@outlook.test"]
        # the same mail over TCP from this machine is refused: the address proves nothing
        code, _ = send(relay, "alice@our.test", ["y@outlook.test"], mail("via tcp"))
        assert code == 550
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_outgoing_from_granted_peer(world: World) -> None:
    outlook = world.srv("outlook.test")
    relay = world.relay()
    assert send(relay, "alice@our.test", ["someone@outlook.test"], mail("out"))[0] == 250
    [o] = outlook.wait(1)
    assert return_path(o) == "alice@our.test" and header(o, "Delivered-To") == [
        "someone@outlook.test"
    ]


def test_retry_until_destination_is_up(world: World) -> None:
    relay = world.relay("--retry-min", "0.3s", "--retry-max", "1s")
    assert send(relay, "bob@example.org", ["carol@our.test"], mail("late"))[0] == 250
    wait_for(lambda: relay.log().count("status=deferred") >= 2, "two failed attempts")
    assert "carol@late.test" in world.queue()
    late = world.srv("late.test")
    [m] = late.wait(1)
    assert header(m, "Delivered-To") == ["carol@late.test"]
    wait_for(lambda: "0 message(s)" in world.queue(), "queue empty")


def test_refused_gives_dsn_to_sender(world: World) -> None:
    world.srv("refuse.test", rcpt_reply="550 5.1.1 No such user here")
    example = world.srv("example.org")
    relay = world.relay()
    assert send(relay, "bob@example.org", ["dave@our.test"], mail("refused"))[0] == 250
    [dsn] = example.wait(1)
    assert return_path(dsn) == "" and header(dsn, "Delivered-To") == ["bob@example.org"]
    assert b"multipart/report" in dsn and b"report-type=delivery-status" in dsn
    assert b"Final-Recipient: rfc822; dave@refuse.test" in dsn
    assert b"Original-Recipient: rfc822; dave@our.test" in dsn
    assert b"Action: failed" in dsn and b"Status: 5.1.1" in dsn
    assert b"Message-ID: <refused@example.org>" in dsn
    wait_for(lambda: "0 message(s)" in world.queue(), "queue empty")


def test_lifetime_delay_warning_and_no_dsn_for_null_sender(world: World) -> None:
    example = world.srv("example.org")
    relay = world.relay("--retry-min", "0.2s", "--retry-max", "0.5s", "--lifetime", "3s",
                        "--warn-after", "1s")
    assert send(relay, "", ["erin@our.test"], mail("from-null"))[0] == 250
    assert send(relay, "bob@example.org", ["erin@our.test"], mail("expires"))[0] == 250
    got = example.wait(2, timeout=30)
    assert b"Action: delayed" in got[0] and b"Will-Retry-Until:" in got[0]
    assert b"Action: failed" in got[1] and b"Final-Recipient: rfc822; erin@down.test" in got[1]
    assert all(b"<expires@example.org>" in m for m in got)
    wait_for(lambda: "0 message(s)" in world.queue(), "queue empty")
    # The relay decided not to bounce the mail from <>; a DSN it queued would have
    # been queued before the mail left the spool, so the queue being empty means
    # every DSN there is has been delivered.
    wait_for(lambda: "no failed DSN (null sender" in relay.log(), "no DSN for the mail from <>")
    assert len(example.mails()) == 2  # nothing for the mail from <>


def test_users_change_without_restart(world: World) -> None:
    gmail = world.srv("gmail.test")
    relay = world.relay()
    code, _ = send(relay, "bob@example.org", ["frank@our.test"], mail("f1"))
    assert code == 550
    # Two commits; once the second is served (frank known), so is the first.
    for argv in (["users", "targets", "alice", "--repo", str(world.tmp / "users"),
                  "--set", "alice3@gmail.test"],
                 ["users", "add", "frank", "--repo", str(world.tmp / "users"),
                  "--no-password", "--target", "frank@gmail.test"]):
        ran = run_poste(argv)
        assert ran.returncode == 0, ran.stderr

    def accepted() -> bool:
        return send(relay, "bob@example.org", ["frank@our.test"], mail("f2"))[0] == 250

    wait_for(accepted, "frank accepted after the commit", timeout=20)
    assert send(relay, "bob@example.org", ["alice@our.test"], mail("a2"))[0] == 250
    got = gmail.wait(2)
    rcpts = sorted(header(m, "Delivered-To")[0] for m in got)
    assert rcpts == ["alice3@gmail.test", "frank@gmail.test"]


def test_queue_retry_on_a_running_relay(world: World) -> None:
    relay = world.relay("--retry-min", "1h", "--queue-rescan", "0.3s")
    assert send(relay, "bob@example.org", ["carol@our.test"], mail("held"))[0] == 250
    wait_for(lambda: "status=deferred" in relay.log(), "first attempt failed")
    late = world.srv("late.test")
    # Give the relay its chance to try again: two rescans of the spool (it opens
    # the folder at each) after late.test came up, not a sleep.
    with Watch(world.tmp / "spool", IN_OPEN | IN_ISDIR) as spool:
        spool.count("", IN_OPEN | IN_ISDIR, 2)
    assert late.sessions == 0 and late.mails() == []  # next try is an hour away
    out = run_poste(["queue", "retry", "--all", "--spool", str(world.tmp / "spool")])
    assert out.returncode == 0 and "retry now" in out.stdout
    [m] = late.wait(1)
    assert header(m, "Delivered-To") == ["carol@late.test"]


def test_dsn_to_a_local_sender_reaches_its_targets(world: World) -> None:
    world.srv("refuse.test", rcpt_reply="550 5.1.1 No such user here")
    gmail, outlook = world.srv("gmail.test"), world.srv("outlook.test")
    relay = world.relay()
    assert send(relay, "alice@our.test", ["someone@refuse.test"], mail("out-fail"))[0] == 250
    [g] = gmail.wait(1)
    [o] = outlook.wait(1)
    for dsn in (g, o):
        assert return_path(dsn) == "" and b"Final-Recipient: rfc822; someone@refuse.test" in dsn


def test_bad_flags_are_one_line(poste_bin: str, tmp_path: Path) -> None:
    # --listen on port 0: the default 127.0.0.1:2525 may be taken by anything on the machine
    # (a demo, another run), and the relay checks it before the flags tested here.
    base = [poste_bin, "relay", "--domain", "our.test", "--spool", str(tmp_path / "sp"),
            "--listen", "127.0.0.1:0"]
    cases = [
        (["--postmaster", "nobody", "--users", str(tmp_path)], "--postmaster"),
        (["--postmaster", "a@b.test", "--users", str(tmp_path / "none")], "users repository"),
        (["--postmaster", "a@b.test", "--users", str(tmp_path), "--granted", "10.0.0.0/33"],
         "--granted"),
        (["--postmaster", "a@b.test", "--users", str(tmp_path), "--lifetime", "soon"],
         "lifetime"),
    ]
    # The first through the installed `poste` (the real entry point), the rest in this process.
    for i, (args, word) in enumerate(cases):
        if i == 0:
            out = subprocess.run(base + args, capture_output=True, text=True, timeout=60)
        else:
            out = run_poste(base[1:] + args)  # type: ignore[assignment]
        assert out.returncode != 0 and word in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    helped = run_poste(["relay", "--help"])
    assert helped.returncode == 0 and "--srs-secret-file" in helped.stdout


def _bad_spool(tmp: Path) -> Path:
    """A spool folder the relay cannot write to (root ignores modes: a folder under a file)."""
    if os.geteuid() == 0:
        (tmp / "plain-file").write_text("x")
        return tmp / "plain-file" / "spool"
    ro = tmp / "ro-spool"
    ro.mkdir()
    ro.chmod(0o500)
    return ro


BAD_FLAGS: list[tuple[str, Callable[[Path, int], list[str]], str]] = [
    ("nameserver", lambda t, p: ["--nameserver", "bogus"], "--nameserver"),
    ("nameserver-port", lambda t, p: ["--nameserver", "127.0.0.1:99999"], "--nameserver"),
    ("granted", lambda t, p: ["--granted", "10.0.0.0/33"], "--granted"),
    ("granted-word", lambda t, p: ["--granted", "lan"], "--granted"),
    ("listen-port", lambda t, p: ["--listen", "127.0.0.1:99999"], "--listen"),
    ("listen-name", lambda t, p: ["--listen", "nowhere.invalid:2525"], "--listen"),
    ("listen-busy", lambda t, p: ["--listen", f"127.0.0.1:{p}"], "cannot listen"),
    ("spool-unwritable", lambda t, p: ["--spool", str(_bad_spool(t))], "spool"),
    ("spool-is-a-file", lambda t, p: ["--spool", str(t / "users" / "README")], "--spool"),
    ("users-missing", lambda t, p: ["--users", str(t / "none")], "users repository"),
    ("srs-secret-file-missing", lambda t, p: ["--srs-secret-file", str(t / "none")],
     "--srs-secret-file"),
    ("srs-secret-file-empty", lambda t, p: ["--srs-secret-file", str(t / "users" / "README")],
     "no secret"),
    ("self-address", lambda t, p: ["--self-address", "here"], "--self-address"),
    ("postmaster", lambda t, p: ["--postmaster", "nobody"], "--postmaster"),
    ("lifetime", lambda t, p: ["--lifetime", "soon"], "--lifetime"),
    ("smtp-port", lambda t, p: ["--smtp-port", "0"], "--smtp-port"),
    ("tls-ca-file-not-pem", lambda t, p: ["--tls-ca-file", str(t / "users" / "README")],
     "--tls-ca-file"),
    ("unknown-flag", lambda t, p: ["--colour"], "--colour"),
    ("dkim-key-missing", lambda t, p: ["--dkim-selector", "s", "--dkim-key", str(t / "no.pem")],
     "cannot read key"),
    ("dkim-key-not-a-key", lambda t, p: ["--dkim-selector", "s", "--dkim-key",
                                         str(t / "users" / "README")], "neither PEM"),
    ("dkim-selector-count", lambda t, p: ["--dkim-key", str(_key(t))],
     "give one --dkim-selector per --dkim-key"),
]


def _key(tmp: Path) -> Path:
    from poste.dkim.keys import generate, write_key

    path = tmp / "dkim.pem"
    write_key(generate("ed25519"), path)
    return path


@pytest.mark.parametrize(
    ("make_args", "word"), [(m, w) for _, m, w in BAD_FLAGS], ids=[n for n, _, _ in BAD_FLAGS]
)
def test_each_bad_flag_is_one_line(
    poste_bin: str, tmp_path: Path, make_args: Callable[[Path, int], list[str]], word: str
) -> None:
    users = tmp_path / "users"
    make_users(poste_bin, users, {"alice": ["alice@gmail.test"]})
    (users / "README").write_text("# not a secret\n")  # a file that holds no SRS secret
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        good = {
            "--domain": "our.test", "--postmaster": "admin@example.org", "--users": str(users),
            "--spool": str(tmp_path / "spool"), "--listen": "127.0.0.1:0",
            "--srs-secret": "test-secret",
        }
        bad = make_args(tmp_path, busy.getsockname()[1])
        good.pop(bad[0], None)
        args = [a for kv in good.items() for a in kv] + bad
        out = run_poste(["relay", *args])
    assert out.returncode != 0, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr  # one line, nothing before or after it
    assert out.stderr.startswith("Error: ") and word in out.stderr, out.stderr
    assert out.stdout == ""


def test_sigterm_stops_cleanly_and_keeps_the_queue(world: World) -> None:
    relay = world.relay()
    assert send(relay, "bob@example.org", ["carol@our.test"], mail("kept"))[0] == 250
    assert relay.proc is not None
    relay.proc.terminate()
    assert relay.proc.wait(15) == 0
    relay.proc = None
    assert "carol@late.test" in world.queue()


def test_second_relay_on_the_same_spool_is_refused(world: World) -> None:
    first = world.relay()
    second = Relay(world.poste_bin, world.tmp, world.ns.nameserver, world.port)
    out = run_poste(second.args[1:])
    assert out.returncode != 0 and "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert "in use by another relay" in line and str(first.proc.pid if first.proc else "") in line
    # The first one still works; once it stopped, the spool can be taken over.
    assert send(first, "bob@example.org", ["carol@our.test"], mail("still"))[0] == 250
    first.stop()
    world.relays.append(second.start())
    assert "carol@late.test" in world.queue()


def test_mail_that_would_loop_back_to_us_bounces(world: World) -> None:
    outlook, example = world.srv("outlook.test"), world.srv("example.org")
    gmail = world.srv("gmail.test")
    # 127.0.0.21 (Gmail's MX here) is declared ours; selfloop.test's MX is our --listen address.
    relay = world.relay("--self-address", MX["gmail.test"])
    assert send(relay, "bob@example.org", ["alice@our.test"], mail("loop1"))[0] == 250
    assert send(relay, "bob@example.org", ["x@selfloop.test"], mail("loop2"))[0] == 250
    [o] = outlook.wait(1)
    assert header(o, "Delivered-To") == ["alice2@outlook.test"]
    dsns = example.wait(2)
    text = b"\n".join(dsns)
    assert b"Final-Recipient: rfc822; alice@gmail.test" in text
    assert b"Final-Recipient: rfc822; x@selfloop.test" in text
    assert text.count(b"Status: 5.4.6") == 2
    assert b"mail for gmail.test loops back to myself" in text
    assert b"mail for selfloop.test loops back to myself" in text
    assert gmail.sessions == 0 and gmail.mails() == []
    wait_for(lambda: "0 message(s)" in world.queue(), "queue empty")
    bad = run_poste([*relay.args[1:], "--self-address", "not-an-ip"])
    assert bad.returncode != 0 and "--self-address" in bad.stderr and "Traceback" not in bad.stderr


def test_long_sender_gets_a_short_srs_address_that_reverses(world: World) -> None:
    gmail, _outlook, example = (world.srv("gmail.test"), world.srv("outlook.test"),
                                world.srv("example.org"))
    relay = world.relay()
    long_sender = "bounces+1234567-abcdef0123456789=subscriber.example.net@example.org"
    assert send(relay, long_sender, ["alice@our.test"], mail("long"))[0] == 250
    [g] = gmail.wait(1)
    srs = return_path(g)
    assert srs.startswith("SRS0=") and len(srs.partition("@")[0]) <= 64
    bounce = b"From: MAILER-DAEMON@gmail.test\r\nSubject: bounce\r\n\r\nsorry\r\n"
    assert send(relay, "", [srs], bounce)[0] == 250
    [b] = example.wait(1)
    assert header(b, "Delivered-To") == [long_sender]
