"""`poste submission` end to end: swaks as the mail client, `poste srv` as the destination.

One submission process (465 implicit TLS and 587 STARTTLS) and one srv run
for the whole module; each test uses its own users so they stay independent.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from poste.smtp.tls import self_signed
from poste.users import passwords, store
from poste.users.repo import load_snapshot
from support.cli import run_poste
from support.service import listening_ports, started, stop

DOMAIN = "our.test"
HOST = "127.0.0.1"
PASSWORD = "Tr0ub4dor&3-horse"


@dataclass
class Stack:
    repo: Path
    outbox: Path
    log: Path
    tls_port: int
    starttls_port: int
    dest_port: int
    cert: Path
    key: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def mails(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.outbox.glob("*.eml"))]


def add_user(
    repo: Path, local: str, stored: str | None, targets: list[str] | None = None, **extra: object
) -> None:
    content = json.dumps(
        {"targets": targets or [f"{local}@gmail.test"], "password": stored or "", "insecure": False}
        | extra
    ).encode()
    store.commit_file(repo, local, content, f"add {local}", create=True)


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_loaded(stack: Stack) -> None:
    """Until the running server has loaded the repository's current commit (its log says so).

    Sending before that would count a failed login against 127.0.0.1 (and slow
    the next tests' logins down); a loop of swaks runs until one works costs a
    Perl start each.
    """
    head = str(store.open_repo(stack.repo).head.target)[:12]
    loaded = re.compile(rf"users repo: loaded \d+ users at {head}")
    wait_for(lambda: loaded.search(stack.log_text()), f"the server to load commit {head}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, poste_bin: str) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("submission")
    cert, key = base / "cert.pem", base / "key.pem"
    self_signed(cert, key, "mail.our.test")
    repo = base / "users"
    add_user(repo, "alice", passwords.hash_password(PASSWORD), aliases=["a.smith"])
    outbox = base / "outbox"
    log = base / "submission.log"
    with started(
        [poste_bin, "srv", f"{HOST}:0", "-o", f"{outbox}/", "--count", "0", "--with-data"],
        base / "srv.log",
    ) as (_, [dest_port]):
        with open(log, "wb") as log_fh:
            sub = subprocess.Popen(
                [
                    poste_bin,
                    "submission",
                    "--domain",
                    DOMAIN,
                    "--destination",
                    f"{HOST}:{dest_port}",
                    "--users",
                    str(repo),
                    "--tls-cert",
                    str(cert),
                    "--tls-key",
                    str(key),
                    "--listen-tls",
                    f"{HOST}:0",
                    "--listen",
                    f"{HOST}:0",
                    "--hostname",
                    "submission.our.test",
                    "--poll-interval",
                    "0.1",
                    "--auth-delay",
                    "0.05",
                    "--auth-max-delay",
                    "0.4",
                    "--auth-max-failures",
                    "4",
                    "--auth-lockout",
                    "3600",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log_fh,
            )
        try:
            # Both listen on port 0; the log line of the 465 one says "(implicit TLS)".
            listening_ports(log, HOST, 2, sub)
            found = re.findall(rf"listening on {HOST}:(\d+)( \(implicit TLS\))?", log.read_text())
            ports = {bool(tls): int(port) for port, tls in found[:2]}
            tls_port, starttls_port = ports[True], ports[False]
            yield Stack(repo, outbox, log, tls_port, starttls_port, dest_port, cert, key)
        finally:
            stop(sub)


def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", f"{HOST}:{port}", "--helo", "client.test", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def send(
    stack: Stack,
    how: str,
    mech: str,
    user: str,
    password: str,
    sender: str,
    rcpt: str = "bob@ext.test",
    header: str = "X-Test: 1",
    source: str = HOST,
) -> subprocess.CompletedProcess[str]:
    """One swaks run; `source` picks the client address (failed logins are counted per address)."""
    if how == "465":
        port, tls = stack.tls_port, ["--tls-on-connect"]
    else:
        port, tls = stack.starttls_port, ["--tls"]
    return swaks(
        port,
        *tls,
        "--auth",
        mech,
        "--auth-user",
        user,
        "--auth-password",
        password,
        "--from",
        sender,
        "--to",
        rcpt,
        "--add-header",
        header,
        "--local-interface",
        source,
    )


def delivered(stack: Stack, marker: str) -> bytes:
    def matching() -> list[bytes]:
        return [m for m in stack.mails() if marker.encode() in m]

    wait_for(lambda: bool(matching()), f"mail {marker}")
    return matching()[0]


@pytest.mark.parametrize(
    ("how", "mech"), [("465", "PLAIN"), ("465", "LOGIN"), ("587", "PLAIN"), ("587", "LOGIN")]
)
def test_swaks_sends_through_submission(stack: Stack, how: str, mech: str) -> None:
    marker = f"X-Case: {how}-{mech}"
    proc = send(stack, how, mech, "alice@our.test", PASSWORD, "alice@our.test", header=marker)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "235 2.7.0" in proc.stdout
    mail = delivered(stack, marker)
    head = mail.split(b"\r\n\r\n", 1)[0].decode()
    assert "Return-Path: <alice@our.test>" in head
    assert "Delivered-To: bob@ext.test" in head
    ours = [f for f in re.split(r"\r\n(?=\S)", head) if "by submission.our.test" in f]
    assert len(ours) == 1
    assert "with ESMTPSA" in ours[0]
    assert "client.test" in ours[0]
    # no auth data in the trace: neither the login, the password nor the SASL blob
    plain_blob = base64.b64encode(f"\0alice@our.test\0{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, plain_blob, "alice@our.test ", "auth"):
        assert secret not in ours[0]


def test_login_by_local_part_and_sending_from_alias_and_tag(stack: Stack) -> None:
    for sender in ("a.smith@our.test", "alice+lists@our.test"):
        marker = f"X-Sender-Case: {sender}"
        proc = send(stack, "587", "LOGIN", "alice", PASSWORD, sender, header=marker)
        assert proc.returncode == 0, proc.stdout
        assert f"Return-Path: <{sender}>".encode() in delivered(stack, marker)


def test_mail_from_someone_else_is_553(stack: Stack) -> None:
    add_user(stack.repo, "mallory", passwords.hash_password("m4llory"))
    wait_loaded(stack)  # the running server has loaded mallory
    for sender in ("alice@our.test", "ceo@bank.test"):
        proc = send(stack, "465", "PLAIN", "mallory", "m4llory", sender)
        assert "235 2.7.0" in proc.stdout, proc.stdout
        assert proc.returncode != 0
        assert "553 5.7.1" in proc.stdout
        assert "354" not in proc.stdout


def test_auth_on_587_before_starttls_is_refused(stack: Stack) -> None:
    # swaks sees no AUTH offered without TLS
    proc = swaks(
        stack.starttls_port,
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        PASSWORD,
        "--from",
        "alice@our.test",
        "--to",
        "b@ext.test",
    )
    assert proc.returncode != 0
    assert "AUTH" not in "".join(x for x in proc.stdout.splitlines() if x.startswith("<-"))
    # and a client that tries anyway gets 530, and so does MAIL
    with socket.create_connection((HOST, stack.starttls_port), timeout=10) as sock:
        fh = sock.makefile("rb")

        def cmd(line: str) -> str:
            sock.sendall(line.encode() + b"\r\n")
            return reply(fh)

        reply(fh)
        assert "STARTTLS" in cmd("EHLO client.test")
        blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        assert cmd(f"AUTH PLAIN {blob}").startswith("530")
        assert cmd("MAIL FROM:<alice@our.test>").startswith("530")
    # after STARTTLS it is offered
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((HOST, stack.starttls_port), timeout=10) as raw:
        fh = raw.makefile("rb")
        reply(fh)
        raw.sendall(b"EHLO client.test\r\n")
        reply(fh)
        raw.sendall(b"STARTTLS\r\n")
        assert reply(fh).startswith("220")
        with ctx.wrap_socket(raw, server_hostname="mail.our.test") as tls:
            tfh = tls.makefile("rb")
            tls.sendall(b"EHLO client.test\r\n")
            ehlo = reply(tfh)
            assert re.search(r"250-AUTH( (PLAIN|LOGIN)){2}", ehlo), ehlo
            tls.sendall(b"MAIL FROM:<alice@our.test>\r\n")
            assert reply(tfh).startswith("530")  # no MAIL before AUTH, even under TLS


def reply(fh) -> str:  # type: ignore[no-untyped-def]
    lines = []
    while True:
        line = fh.readline().decode(errors="replace").rstrip("\r\n")
        if not line:
            raise ConnectionError("closed")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return "\n".join(lines)


def test_blake2b_user_is_upgraded_to_argon2id(stack: Stack) -> None:
    add_user(
        stack.repo,
        "ptt-user",
        passwords.blake2b_hex("old-ptt-pass"),
        targets=["Ptt User <ptt@gmail.test>"],
        insecure=True,
    )
    wait_loaded(stack)
    proc = send(
        stack,
        "587",
        "PLAIN",
        "ptt-user@our.test",
        "old-ptt-pass",
        "ptt-user@our.test",
        header="X-Case: blake2b",
    )
    assert proc.returncode == 0, proc.stdout

    def upgraded() -> bool:
        user = load_snapshot(stack.repo, DOMAIN).lookup("ptt-user")
        return user is not None and (user.password or "").startswith("$argon2id$")

    wait_for(upgraded, "the argon2id upgrade commit")
    entry = json.loads(store.read_file(store.open_repo(stack.repo), "ptt-user") or b"{}")
    assert entry["password"].startswith("$argon2id$")
    assert passwords.verify(entry["password"], "old-ptt-pass")
    # the rest of the entry is as the admin wrote it
    assert entry["targets"] == ["Ptt User <ptt@gmail.test>"] and entry["insecure"] is True
    log = subprocess.run(
        ["git", "-C", str(stack.repo), "log", "--format=%s", "-1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "upgrade ptt-user@our.test" in log
    # the running server took its own commit and the new hash works
    proc = send(stack, "465", "LOGIN", "ptt-user", "old-ptt-pass", "ptt-user@our.test")
    assert proc.returncode == 0, proc.stdout
    assert "refusing commit" not in stack.log_text()


def test_commit_takes_effect_and_bad_commit_keeps_last_good(stack: Stack, poste_bin: str) -> None:
    # a new user, added with the CLI while the server runs, can log in without a restart
    added = run_poste(["users", "add", "newbie", "--repo", str(stack.repo), "--password-stdin",
                       "--target", "n@gmail.test"], input="n3wbie\n")
    assert added.returncode == 0, added.stderr
    wait_loaded(stack)
    proc = send(stack, "465", "PLAIN", "newbie", "n3wbie", "newbie@our.test")
    assert proc.returncode == 0, proc.stdout  # newbie can log in and send
    # a broken entry is committed: the server refuses that commit, keeps serving the last good
    store.commit_file(stack.repo, "broken", b'{"targets": ["no at sign"]}', "a broken entry")
    wait_for(lambda: "refusing commit" in stack.log_text(), "the refusal log line")
    proc = send(stack, "587", "LOGIN", "newbie", "n3wbie", "newbie@our.test")
    assert proc.returncode == 0, proc.stdout
    # the fix is taken
    store.commit_file(stack.repo, "broken", None, "fix")
    deleted = run_poste(["users", "del", "newbie", "--repo", str(stack.repo)])
    assert deleted.returncode == 0, deleted.stderr
    wait_loaded(stack)  # newbie's deletion took effect
    out = send(stack, "465", "PLAIN", "newbie", "n3wbie", "newbie@our.test").stdout
    assert "535 5.7.8" in out or "454 4.7.0" in out, out


def test_wrong_password_is_535_then_slowed_then_locked_out(stack: Stack) -> None:
    """From its own client address, as failures are counted per address (4 lock it out here)."""
    client = "127.0.0.9"
    before = stack.log_text().count("auth failed")
    results = [
        send(stack, how, mech, "alice", "wrong", "alice@our.test", source=client)
        for how, mech in [("465", "PLAIN"), ("587", "LOGIN"), ("465", "LOGIN"), ("587", "PLAIN")]
    ]
    for proc in results:
        assert "535 5.7.8" in proc.stdout, proc.stdout
        assert proc.returncode != 0
    lines = [x for x in stack.log_text().splitlines() if "auth failed" in x][before:]
    assert len(lines) == 4 and all(f"ip={client}" in x for x in lines)
    delays = [float(m.group(1)) for m in (re.search(r"delay=([\d.]+)s", x) for x in lines) if m]
    failures = [int(m.group(1)) for m in (re.search(r"failures=(\d+)", x) for x in lines) if m]
    assert len(delays) == len(failures) == 4
    assert failures == [f + 1 for f in range(len(failures))]
    assert delays == sorted(delays) and delays[-1] > delays[0]  # each failure waits longer
    assert "locked out" in lines[-1]
    # locked out: even the right password gets 454, without a password check
    proc = send(stack, "465", "PLAIN", "alice", PASSWORD, "alice@our.test", source=client)
    assert "454 4.7.0" in proc.stdout, proc.stdout
    assert "235" not in proc.stdout
    # other clients are not affected
    proc = send(stack, "465", "PLAIN", "alice", PASSWORD, "alice@our.test", source="127.0.0.10")
    assert proc.returncode == 0, proc.stdout
    assert PASSWORD not in stack.log_text() and "wrong" not in stack.log_text()


def test_command_line_errors_are_one_line(poste_bin: str, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed(cert, key, "mail.our.test")
    repo = tmp_path / "users"
    add_user(repo, "alice", None)
    base = ["submission", "--domain", DOMAIN, "--destination", "127.0.0.1:1"]
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
    cases = [
        ([*base, "--users", str(tmp_path / "missing"), *tls], "not a Git repository"),
        ([*base, "--users", str(repo), "--listen", "127.0.0.1:0"], "--tls-cert and --tls-key"),
        ([*base, "--users", str(repo), *tls, "--listen", "127.0.0.1:99999"], "bad port"),
    ]
    for args, message in cases:
        proc = run_poste(args)  # poste.cli.main in this process
        assert proc.returncode != 0
        assert message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    proc = run_poste(["submission", "--help"])
    assert proc.returncode == 0 and "--listen-tls" in proc.stdout


def test_sighup_reloads_the_users_at_once(stack: Stack, poste_bin: str, tmp_path: Path) -> None:
    """With polling practically off, SIGHUP is what makes a new user known."""
    log = tmp_path / "hup.log"
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(
            [
                poste_bin,
                "submission",
                "--domain",
                DOMAIN,
                "--destination",
                f"{HOST}:{stack.dest_port}",
                "--users",
                str(stack.repo),
                "--tls-cert",
                str(stack.cert),
                "--tls-key",
                str(stack.key),
                "--listen-tls",
                f"{HOST}:0",
                "--poll-interval",
                "3600",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_fh,
        )
    try:
        [port] = listening_ports(log, HOST, 1, proc)
        add_user(stack.repo, "hupper", passwords.hash_password("hup-pw"))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "loaded" in log.read_text().split("listening", 1)[-1], "the reload")
        ok = swaks(
            port,
            "--tls-on-connect",
            "--auth",
            "PLAIN",
            "--auth-user",
            "hupper",
            "--auth-password",
            "hup-pw",
            "--from",
            "hupper@our.test",
            "--to",
            "b@ext.test",
            "--local-interface",
            "127.0.0.20",
        )
        assert ok.returncode == 0, ok.stdout
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0  # SIGTERM is a clean stop


def test_implicit_tls_client_hello_sent_at_once_is_answered(stack: Stack) -> None:
    """Clients that send their ClientHello the moment they connect, many at once (so it is
    there before the server accepted them): every handshake completes and gets the
    greeting.  On uvloop those bytes came to the protocol before loop.start_tls took the
    transport, and the handshake waited for them until its timeout (smtp/server.py _wrap)."""
    import smtplib
    from concurrent.futures import ThreadPoolExecutor

    ctx = ssl.create_default_context(cafile=str(stack.cert))
    ctx.check_hostname = False

    def greet(k: int) -> int:
        source = f"127.0.0.{20 + k % 8}"  # 5 sessions per address: under every per-client cap
        with smtplib.SMTP_SSL(HOST, stack.tls_port, context=ctx, timeout=20,
                              source_address=(source, 0)) as smtp:
            return smtp.ehlo("client.test")[0]

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(greet, range(40))) == [250] * 40
