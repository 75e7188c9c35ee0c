"""`--workers N`: one parent owns the sockets, N worker processes serve them (runtime/workers.py).

Real processes throughout: `poste relay --workers 2` and `poste up --workers 2` on loopback,
mail sent with smtplib, one session per mail (so the shared accept queue hands sessions to
both workers), counted by Message-ID at a stand-in MX.  A mail that got 250 must arrive
exactly once: after a worker is SIGKILLed (the destination held down meanwhile, so no
delivery is in flight to be repeated), after SIGTERM, after a restart with fewer workers.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import smtplib
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.message
import dns.query
import pytest

from poste.services.relay.spool import Entry, Recipient, Spool
from support.cli import run_poste
from support.dkimkit import DOMAIN, make_key
from support.knot import KnotServer, knot_factory, simple_zone  # noqa: F401
from support.loop_world import DOMAIN as DOMAIN_OURS
from support.loop_world import (  # noqa: F401
    GMAIL_IP,
    HOSTS,
    LOGIN,
    PASSWORD,
    World,
    up_config,
    world,
)
from support.net import wait_port
from support.relay_env import MX, Relay, common_port, make_users, mx_zones
from support.standin import StandIns

pytestmark = pytest.mark.slow

RELAY_ARGS = ("--retry-min", "0.3s", "--retry-max", "1s", "--workers", "2")
READY = re.compile(r"workers: (\d+) ready \(pids ([\d ]+)\)")


def msgid(tag: str, n: int) -> str:
    return f"<w-{tag}-{n}@example.org>"


def count_ids(mails: list[bytes], tag: str) -> Counter[int]:
    found = re.compile(rb"^Message-ID: <w-" + tag.encode() + rb"-(\d+)@example\.org>",
                       re.MULTILINE | re.IGNORECASE)
    return Counter(int(m.group(1)) for mail in mails if (m := found.search(mail)))


def send(host: str, port: int, numbers: range, rcpt: str, tag: str, *, sessions: int = 6,
         source: str | None = None, each: Callable[[int], None] | None = None) -> set[int]:
    """One SMTP session per mail from `sessions` threads; the numbers that got 250."""
    lock = threading.Lock()
    todo = iter(numbers)
    acked: set[int] = set()

    def sender() -> None:
        while True:
            with lock:
                n = next(todo, None)
            if n is None:
                return
            body = (f"From: bob@example.org\r\nTo: {rcpt}\r\nSubject: w {n}\r\n"
                    f"Message-ID: {msgid(tag, n)}\r\n\r\nmail number {n}\r\n").encode()
            try:
                with smtplib.SMTP(host, port, timeout=30,
                                  source_address=(source, 0) if source else None) as s:
                    s.ehlo("client.test")
                    s.sendmail("bob@example.org", [rcpt], body)
            except (smtplib.SMTPException, OSError):
                continue  # not acknowledged: it may or may not arrive, once at most
            with lock:
                acked.add(n)
            if each is not None:
                each(len(acked))

    threads = [threading.Thread(target=sender) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return acked


def wait_log(read: Callable[[], str], pattern: re.Pattern[str], alive: Callable[[], bool],
             timeout: float = 60.0) -> re.Match[str]:
    """Wait for a line of the log (a bound to give up on, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        found = pattern.search(read())
        if found:
            return found
        if not alive() or time.monotonic() > deadline:
            raise AssertionError(f"never logged {pattern.pattern!r}:\n{read()[-4000:]}")
        time.sleep(0.05)


def wait_delivered(folder_mails: Callable[[], list[bytes]], tag: str, want: set[int],
                   spool: Path, timeout: float = 120.0) -> Counter[int]:
    deadline = time.monotonic() + timeout
    while True:
        got = count_ids(folder_mails(), tag)
        queued = list(spool.glob("*.json")) + list(spool.glob("worker-*/*.json"))
        if want <= set(got) and not queued:
            time.sleep(0.5)  # anything delivered twice would be arriving now
            return count_ids(folder_mails(), tag)
        if time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# -- `poste relay --workers 2` ------------------------------------------------


@pytest.fixture
def relay_world(poste_bin: str, tmp_path: Path,
                knot_factory: Callable[..., KnotServer]  # noqa: F811
                ) -> Iterator[tuple[Relay, StandIns]]:
    ns = knot_factory(mx_zones())
    mx = StandIns([MX["late.test"]])  # held (bound, not listening) until started
    make_users(poste_bin, tmp_path / "users", {"carol": ["carol@late.test"]})
    relay = Relay(poste_bin, tmp_path, ns.nameserver, mx.port, *RELAY_ARGS)
    try:
        yield relay, mx
    finally:
        relay.stop()
        mx.close()


def test_relay_sigkill_of_a_worker_loses_and_doubles_nothing(
        relay_world: tuple[Relay, StandIns], tmp_path: Path) -> None:
    relay, mx = relay_world
    relay.start()
    assert relay.proc is not None
    ready = wait_log(relay.log, READY, lambda: relay.proc is not None and relay.proc.poll() is None)
    pids = [int(p) for p in ready.group(2).split()]
    assert len(pids) == 2
    killed = threading.Event()

    def kill_worker_1(acked: int) -> None:
        if acked >= 60 and not killed.is_set():
            killed.set()
            os.kill(pids[1], signal.SIGKILL)

    acked = send(relay.host, relay.port, range(300), "carol@our.test", "kill",
                 each=kill_worker_1)
    assert killed.is_set()
    restarted = re.compile(rf"worker 1 \(pid {pids[1]}\) was killed by SIGKILL; starting it again")
    wait_log(relay.log, restarted, lambda: relay.proc is not None and relay.proc.poll() is None)
    # both served (one line per mail each; `[wK]` names the worker)
    log = relay.log()
    assert re.search(r"\[w0\] INFO [0-9A-F]+ relay from=", log), log[-3000:]
    assert re.search(r"\[w1\] INFO [0-9A-F]+ relay from=", log), log[-3000:]
    assert (tmp_path / "spool" / "worker-1").is_dir()

    dest = mx.start(MX["late.test"], tmp_path / "late")
    got = wait_delivered(dest.mails, "kill", acked, tmp_path / "spool")
    lost = sorted(acked - set(got))
    doubled = sorted(n for n, c in got.items() if c > 1)
    assert not lost, f"got 250, never delivered: {lost[:20]}\n{relay.log()[-3000:]}"
    assert not doubled, f"delivered twice: {doubled[:20]}"
    assert len(acked) >= 60

    # SIGTERM to the parent: every worker stops, the parent exits 0.
    workers_now = [int(p) for p in READY.findall(relay.log())[-1][1].split()]
    relay.proc.terminate()
    assert relay.proc.wait(30) == 0, relay.log()[-3000:]
    assert all(gone(pid) for pid in workers_now + pids)
    relay.proc = None


def test_shards_of_more_workers_are_adopted_once(
        relay_world: tuple[Relay, StandIns], tmp_path: Path) -> None:
    relay, mx = relay_world
    # A run with 3 workers stopped with mail in worker-2's shard (written as its relay
    # writes: the spool's own put), and one half-moved by an adoption cut short: linked
    # into the spool, its envelope not yet renamed.
    root = tmp_path / "spool"
    Spool(root)
    shard = Spool(root / "worker-2")
    for n in range(5):
        entry = Entry(id=f"ABCDEF{n:06d}", return_path="bob@example.org",
                      recipients=[Recipient("carol@late.test", "bob@example.org",
                                            "carol@our.test")])
        shard.put(entry, (f"From: bob@example.org\r\nMessage-ID: {msgid('adopt', n)}\r\n"
                          f"Subject: left {n}\r\n\r\nleft behind\r\n").encode())
    os.link(shard.message_path("ABCDEF000000"), root / "ABCDEF000000.eml")
    # `poste queue` sees the mail of every shard, and acts on it where it is
    listed = run_poste(["queue", "list", "--spool", str(root), "--json"])
    assert listed.returncode == 0, listed.stderr
    assert sorted(json.loads(line)["id"] for line in listed.stdout.splitlines()) == [
        f"ABCDEF{n:06d}" for n in range(5)]
    retried = run_poste(["queue", "retry", "--spool", str(root), "ABCDEF000003"])
    assert retried.returncode == 0 and "retry now" in retried.stdout, retried.stderr
    relay.args = [a for a in relay.args if a not in ("--workers", "2")] + ["--workers", "1"]
    relay.start()
    dest = mx.start(MX["late.test"], tmp_path / "late")
    got = wait_delivered(dest.mails, "adopt", set(range(5)), root)
    assert got == Counter(range(5)), (got, relay.log()[-3000:])
    assert not (root / "worker-2").exists()
    assert "spool shard" in relay.log() and "5 message(s) adopted" in relay.log()


def test_refused_with_several_workers(poste_bin: str, tmp_path: Path) -> None:
    """What has one owner and no hand-over yet is refused in one line, before anything runs."""
    (tmp_path / "users").mkdir()
    cases = [
        ["submission", "--listen", "127.0.0.1:0", "--destination", "127.0.0.1:1",
         "--users", str(tmp_path / "users"), "--domain", "our.test", "--workers", "2"],
        ["signer", "--listen", "127.0.0.1:0", "--destination", "127.0.0.1:1",
         "--domain", "our.test", "--key-dir", str(tmp_path / "keys"), "--workers", "2"],
    ]
    config = tmp_path / "poste.toml"
    config.write_text(f"""
domain = ["our.test"]
users = "{tmp_path / 'users'}"
acme-directory = "https://acme.invalid/dir"
[relay]
spool = "spool"
""")
    cases.append(["up", "--config", str(config), "--workers", "2"])
    for argv in cases:
        r = subprocess.run([poste_bin, *argv], capture_output=True, text=True, timeout=60)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode != 0, (argv, r.stderr)
        assert "one process" in r.stderr and "--workers 1" in r.stderr, (argv, r.stderr)
        assert "Traceback" not in r.stderr and len(lines) <= 3, (argv, r.stderr)
    assert not (tmp_path / "spool").exists()  # refused before the relay took a spool


# -- `poste up --workers 2` ----------------------------------------------------


def test_up_with_two_workers_delivers_every_mail_once(world: World) -> None:  # noqa: F811
    port = common_port([HOSTS["verifier"], HOSTS["submission"]])
    config = up_config(world, port)
    proc = world.spawn("up", ["up", "--config", str(config), "--workers", "2"])
    log = world.tmp / "up.log"

    def read() -> str:
        return log.read_text(errors="replace")

    ready = wait_log(read, READY, lambda: proc.poll() is None)
    assert ready.group(1) == "2"
    wait_port(HOSTS["verifier"], port, timeout=30)
    acked = send(HOSTS["verifier"], port, range(120), LOGIN, "up", source=GMAIL_IP)
    assert len(acked) == 120, read()[-3000:]
    got = wait_delivered(world.gmail.mails, "up", acked, world.tmp / "spool")
    assert set(got) == acked and all(c == 1 for c in got.values()), read()[-3000:]
    text = read()
    for k in (0, 1):  # each worker took sessions from the one shared socket
        assert re.search(rf"\[w{k}\] INFO [0-9A-F]+ verifier from=", text), text[-3000:]
    # worker 0 alone runs submission (the AUTH brake is one process's)
    assert re.search(r"\[w0\] INFO submission listening", text), text[-3000:]
    assert not re.search(r"\[w1\] INFO submission listening", text), text[-3000:]
    pids = [int(p) for p in ready.group(2).split()]
    proc.terminate()
    assert proc.wait(30) == 0, read()[-3000:]
    assert all(gone(pid) for pid in pids)


# -- `poste signer --workers 2` -------------------------------------------------


def test_signer_workers_publish_the_keys_once(
        poste_bin: str, tmp_path: Path,
        knot_factory: Callable[..., KnotServer]  # noqa: F811
        ) -> None:
    """Worker 0 alone publishes (before the others start); worker 1 asks DNS nothing."""
    secret = base64.b64encode(os.urandom(32)).decode()
    key_path, key = make_key(tmp_path, "ed25519", "s1")
    ns = knot_factory({DOMAIN: simple_zone(DOMAIN)},
                      tsig=("update.example.test", "hmac-sha256", secret))
    log = tmp_path / "signer.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [poste_bin, "signer", "--domain", DOMAIN, "--selector", "s1", "--private-key",
             str(key_path), "--destination", "127.0.0.1:9", "--listen", "127.0.0.1:0",
             "--dns-server", ns.nameserver, "--dns-key", f"update.example.test:sha256:{secret}",
             "--workers", "2"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def read() -> str:
            return log.read_text(errors="replace")

        ready = wait_log(read, READY, lambda: proc.poll() is None)
        assert ready.group(1) == "2"
        text = read()
        assert re.search(r"\[w0\] INFO dns published: s1\._domainkey\.example\.test\. TXT",
                         text), text
        assert not re.search(r"\[w1\] INFO dns ", text), text
        assert re.search(r"\[w1\] INFO .*listening", text), text
        assert ns.log().count("DDNS, processing") == 1, ns.log()[-2000:]
        r = dns.query.udp(dns.message.make_query(f"s1._domainkey.{DOMAIN}.", "TXT"), ns.host,
                          port=ns.port, timeout=3)
        assert [b"".join(rd.strings) for rrset in r.answer for rd in rrset] == [
            key.txt_value().encode()]
    finally:
        if proc.poll() is None:
            proc.terminate()
        assert proc.wait(30) == 0, log.read_text(errors="replace")[-3000:]


def start_up(w: World, *, top: str = "", flags: tuple[str, ...] = ("--workers", "2"),
             extra: list[tuple[str, str]] | None = None, env: dict[str, str] | None = None
             ) -> tuple[subprocess.Popen[bytes], Callable[[], str], re.Match[str], int]:
    """`poste up` of the world, its relay retrying fast: (process, log reader, ready, port)."""
    port = common_port([HOSTS["verifier"], HOSTS["submission"]])
    relay = [("retry-min", '"0.3s"'), ("retry-max", '"1s"'), *(extra or [])]
    config = up_config(w, port, top=top, extra={"relay": relay})
    proc = w.spawn("up", ["up", "--config", str(config), *flags], env=env)
    log = w.tmp / "up.log"

    def read() -> str:
        return log.read_text(errors="replace")

    ready = wait_log(read, READY, lambda: proc.poll() is None)
    wait_port(HOSTS["verifier"], port, timeout=30)
    return proc, read, ready, port


def submit(w: World, port: int, tag: str, n: int) -> None:
    """One mail from LOGIN to friend@outlook.test through submission (STARTTLS, AUTH)."""
    mail = (f"From: {LOGIN}\r\nTo: friend@outlook.test\r\nSubject: sent {n}\r\n"
            f"Message-ID: {msgid(tag, n)}\r\n\r\nsent through submission\r\n")
    r = subprocess.run(
        [w.poste_bin, "submit", "-", f"{HOSTS['submission']}:{port}", "-s", LOGIN, "-r",
         "friend@outlook.test", "-u", LOGIN, "-p", PASSWORD, "--tls-verify", str(w.cert)],
        input=mail.encode(), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode() + w.logs()


def test_up_worker_0_restarted_takes_its_duties_back(world: World) -> None:  # noqa: F811
    """SIGKILL of worker 0 while worker 1 serves: it comes back with submission, the signer,
    the SRS prune and the digest job, and no acknowledged mail is lost or doubled."""
    srs_db = world.tmp / "spool" / "srs-db"
    srs_db.mkdir(parents=True)
    (srs_db / "OLDTOKEN1").write_text("old@example.org")  # unused for ages: pruned at start
    os.utime(srs_db / "OLDTOKEN1", (0, 0))
    proc, read, ready, port = start_up(world)
    alive = lambda: proc.poll() is None  # noqa: E731
    pruned = re.compile(r"\[w0\] INFO SRS database: 1 expired entry removed")
    wait_log(read, pruned, alive)  # worker 0's prune ran, and now sleeps an hour
    (srs_db / "OLDTOKEN2").write_text("old@example.org")
    os.utime(srs_db / "OLDTOKEN2", (0, 0))
    submit(world, port, "sub", 0)
    pids = [int(p) for p in ready.group(2).split()]
    world.gmail.stop()  # held down: no delivery in flight when worker 0 dies
    killed = threading.Event()

    def kill_worker_0(acked: int) -> None:
        if acked >= 40 and not killed.is_set():
            killed.set()
            os.kill(pids[0], signal.SIGKILL)

    acked = send(HOSTS["verifier"], port, range(150), LOGIN, "w0", source=GMAIL_IP,
                 each=kill_worker_0)
    assert killed.is_set() and len(acked) >= 40
    wait_log(read, re.compile(rf"worker 0 \(pid {pids[0]}\) was killed by SIGKILL; "
                              "starting it again"), alive)
    # its duties are back: submission and the signer behind it ...
    submit(world, port, "sub", 1)
    sent = world.outlook.wait(2, timeout=60)
    assert Counter(count_ids(sent, "sub")) == Counter({0: 1, 1: 1}), read()[-3000:]
    assert all(b"DKIM-Signature:" in m for m in sent)
    assert len(re.findall(r"\[w0\] INFO submission listening", read())) == 2, read()[-3000:]
    # ... the SRS prune (the first worker 0 slept an hour: this is the new one) ...
    text = wait_log(read, re.compile(rf"(?s){pruned.pattern}.*{pruned.pattern}"), alive)
    assert text and not (srs_db / "OLDTOKEN2").exists()
    # ... and the quarantine digest job (worker 1 has none: only a worker 0 takes it)
    asked = run_poste(["quarantine", "digest", "--now", "--spool", str(world.tmp / "spool"),
                       "--wait", "60"])
    assert asked.returncode == 0 and "taken by the relay" in asked.stdout, asked.stderr
    dest = world.mx.start(GMAIL_IP, world.tmp / "gmail") if world.mx else world.gmail
    got = wait_delivered(dest.mails, "w0", acked, world.tmp / "spool")
    lost = sorted(acked - set(got))
    doubled = sorted(n for n, c in got.items() if c > 1)
    assert not lost, f"got 250, never delivered: {lost[:20]}\n{read()[-3000:]}"
    assert not doubled, f"delivered twice: {doubled[:20]}"
    assert re.search(r"\[w1\] INFO [0-9A-F]+ verifier from=", read())
    proc.terminate()
    assert proc.wait(30) == 0, read()[-3000:]


def test_up_sighup_reloads_every_worker(world: World) -> None:  # noqa: F811
    """A user added to the repository, then SIGHUP to the parent: every worker takes mail
    for the user (the poll is an hour away: only the reload can have told them)."""
    proc, read, _, port = start_up(world, extra=[("users-poll", '"1h"')])
    rcpt = f"newbie@{DOMAIN_OURS}"
    assert not send(HOSTS["verifier"], port, range(20), rcpt, "early", source=GMAIL_IP)
    make_users(world.poste_bin, world.users, {"newbie": ["newbie@gmail.test"]})
    os.kill(proc.pid, signal.SIGHUP)
    alive = lambda: proc.poll() is None  # noqa: E731
    for k in (0, 1):
        wait_log(read, re.compile(rf"\[w{k}\] INFO reload: users reloaded"), alive)
    after = len(read())
    acked = send(HOSTS["verifier"], port, range(80), rcpt, "hup", source=GMAIL_IP)
    assert acked == set(range(80)), read()[-3000:]
    got = wait_delivered(world.gmail.mails, "hup", acked, world.tmp / "spool")
    assert got == Counter(range(80)), read()[-3000:]
    text = read()[after:]
    for k in (0, 1):  # both took sessions for the new user
        assert re.search(rf"\[w{k}\] INFO [0-9A-F]+ verifier from=", text), text[-3000:]
    assert "workers: SIGHUP to 2" in read()
    assert "was killed" not in read()
    proc.terminate()
    assert proc.wait(30) == 0, read()[-3000:]


def test_up_workers_key_of_the_config(world: World) -> None:  # noqa: F811
    """`workers = 2` at the top of the config, no flag (nor POSTE_WORKERS): two workers."""
    proc, read, ready, port = start_up(world, top="workers = 2\n", flags=(),
                                       env={"POSTE_WORKERS": ""})
    assert ready.group(1) == "2"
    acked = send(HOSTS["verifier"], port, range(60), LOGIN, "key", source=GMAIL_IP)
    assert acked == set(range(60)), read()[-3000:]
    got = wait_delivered(world.gmail.mails, "key", acked, world.tmp / "spool")
    assert got == Counter(range(60)), read()[-3000:]
    for k in (0, 1):
        assert re.search(rf"\[w{k}\] INFO [0-9A-F]+ verifier from=", read()), read()[-3000:]
    proc.terminate()
    assert proc.wait(30) == 0, read()[-3000:]


def children(pid: int) -> set[int]:
    """The live child processes of `pid` (read from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def test_relay_sighup_to_a_starting_worker_waits_until_it_is_ready(
        relay_world: tuple[Relay, StandIns]) -> None:
    """SIGHUP while a worker starts again (its handler not installed yet) must not end it:
    the parent holds the reload back until that worker is ready, then sends it."""
    relay, _ = relay_world
    relay.start()
    assert relay.proc is not None
    parent = relay.proc.pid
    alive = lambda: relay.proc is not None and relay.proc.poll() is None  # noqa: E731
    ready = wait_log(relay.log, READY, alive)
    pids = [int(p) for p in ready.group(2).split()]
    os.kill(pids[1], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not (fresh := children(parent) - set(pids)):  # worker 1 again, as it starts
        assert alive() and time.monotonic() < deadline, relay.log()[-3000:]
        time.sleep(0.005)
    os.kill(parent, signal.SIGHUP)  # most likely still importing (a second or so)
    wait_log(relay.log, re.compile(r"\[w1\] INFO SIGHUP: reloading"), alive)
    wait_log(relay.log, re.compile(r"\[w1\] INFO reload: users"), alive)
    assert "killed by SIGHUP" not in relay.log(), relay.log()[-3000:]
    assert children(parent) >= fresh  # the new worker 1 runs on
