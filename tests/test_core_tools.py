"""The blaze-style tools and `poste forward`, driven as a user drives them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from poste.cli import COMMANDS
from poste.smtp.tls import self_signed
from support.cli import run_poste
from support.service import listening_ports
from support.standin import reserve_common_port


def start_srv(poste_bin: str, out: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    """`poste srv 127.0.0.1:0 -o OUT`; the port is read from its `listening on` line."""
    log = out.with_name(out.name + ".srv.log")
    with open(log, "wb") as fh:
        proc = subprocess.Popen([poste_bin, "srv", "127.0.0.1:0", "-o", str(out), *extra],
                                stdout=subprocess.DEVNULL, stderr=fh)
    [port] = listening_ports(log, "127.0.0.1", 1, proc)
    return proc, port


def test_seed_session(poste_bin: str, tmp_path: Path) -> None:
    """The session of the seed article, on loopback."""
    out = tmp_path / "new.eml"
    srv, port = start_srv(poste_bin, out)
    made = subprocess.run(
        [poste_bin, "make", "--to", "foo@bar", "--from", "me@example.org", "-f", "Subject: Lorem Ipsum"],
        input=b"Hello World!\n", capture_output=True, check=True,
    ).stdout
    sent = subprocess.run(
        [poste_bin, "send", "-", f"127.0.0.1:{port}", "-s", "me@example.org", "-r", "foo@bar"],
        input=made, capture_output=True,
    )
    assert sent.returncode == 0, sent.stderr
    assert srv.wait(timeout=10) == 0
    mail = out.read_bytes()
    head, body = mail.split(b"\r\n\r\n", 1)
    names = [line.split(b":")[0] for line in head.split(b"\r\n") if not line.startswith(b"\t")]
    assert names == [b"Received", b"Date", b"To", b"From", b"MIME-Version",
                     b"Content-Transfer-Encoding", b"Content-Type", b"Subject"]
    assert b"for <foo@bar>" in head
    assert body == b"Hello World!\r\n"


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", "--hide-all", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode", ["plain", "tls", "pipeline"])
def test_swaks_to_srv(poste_bin: str, tmp_path: Path, mode: str) -> None:
    self_signed(tmp_path / "c.pem", tmp_path / "k.pem", "srv.test")
    out = tmp_path / "got.eml"
    srv, port = start_srv(poste_bin, out, "-k", str(tmp_path / "k.pem"), "-c", str(tmp_path / "c.pem"))
    args = ["--server", f"127.0.0.1:{port}", "--from", "a@x.test", "--to", "b@y.test",
            "--header", "Subject: swaks " + mode]
    if mode == "tls":
        args.append("--tls")
    if mode == "pipeline":
        args.append("--pipeline")
    result = swaks(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert srv.wait(timeout=10) == 0
    mail = out.read_bytes()
    assert f"Subject: swaks {mode}".encode() in mail
    assert (b"with ESMTPS" in mail) == (mode == "tls")
    if mode == "tls":
        assert b"(using TLSv1." in mail


def test_send_uses_starttls_when_offered(poste_bin: str, tmp_path: Path) -> None:
    self_signed(tmp_path / "c.pem", tmp_path / "k.pem", "srv.test")
    out = tmp_path / "got.eml"
    srv, port = start_srv(poste_bin, out, "-k", str(tmp_path / "k.pem"), "-c", str(tmp_path / "c.pem"))
    sent = subprocess.run(
        [poste_bin, "send", "-", f"127.0.0.1:{port}", "-s", "a@x.test", "-r", "b@y.test"],
        input=b"Subject: hi\n\nbody\n", capture_output=True,
    )
    assert sent.returncode == 0, sent.stderr
    assert srv.wait(timeout=10) == 0
    assert b"with ESMTPS" in out.read_bytes()


def test_forward_passes_bytes_on_with_received(poste_bin: str, tmp_path: Path) -> None:
    out = tmp_path / "got.eml"
    with open(tmp_path / "srv.log", "wb") as fh:
        srv = subprocess.Popen([poste_bin, "srv", "127.0.0.2:0", "-o", str(out)], stderr=fh)
    [dest_port] = listening_ports(tmp_path / "srv.log", "127.0.0.2", 1, srv)
    with open(tmp_path / "fwd.log", "wb") as fh:
        fwd = subprocess.Popen(
            [poste_bin, "forward", "--listen", "127.0.0.3:0", "--destination",
             f"127.0.0.2:{dest_port}", "--hostname", "fwd.test"],
            stderr=fh,
        )
    try:
        [fwd_port] = listening_ports(tmp_path / "fwd.log", "127.0.0.3", 1, fwd)
        original = (b"From: <\r\nSubject: =?broken\r\nX-8bit: \xff\xfe\r\n\r\n"
                    b".dot first\r\n..two dots\r\n\xc3\xa9t\xc3\xa9\r\n")
        src = tmp_path / "in.eml"
        src.write_bytes(original)
        sent = subprocess.run(
            [poste_bin, "send", str(src), f"127.0.0.3:{fwd_port}", "-s", "a@x.test", "-r", "b@y.test"],
            capture_output=True,
        )
        assert sent.returncode == 0, sent.stderr
        assert srv.wait(timeout=10) == 0
    finally:
        fwd.terminate()
        fwd.wait(timeout=10)
    mail = out.read_bytes()
    received = mail.split(b"Received: ")
    assert len(received) == 3  # forward's and srv's
    assert b"by fwd.test (poste)" in mail
    # Everything after the two Received: fields is the original, byte for byte.
    assert mail.endswith(original)
    tail = mail[: len(mail) - len(original)]
    assert tail.count(b"\r\n\t") + tail.count(b"Received:") == tail.count(b"\r\n")


def test_every_command_has_help(poste_bin: str) -> None:
    """Each command through the installed `poste` (its one subprocess smoke test here).

    The processes run side by side: each is a Python start and one module's imports.
    """
    procs = {
        name: subprocess.Popen([poste_bin, *([name] if name else []), "--help"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ["", *COMMANDS]
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (name, err)
        assert "Usage:" in out, name


@pytest.mark.parametrize(
    "argv",
    [
        ["send", "-", "127.0.0.1:1", "--no-such-flag"],
        ["srv", "127.0.0.1:notaport"],
        ["forward", "--listen", "127.0.0.1:1x", "--destination", "127.0.0.1"],
        ["make", "--from", "a@b", "-f", "no colon here"],
        ["send", "/nonexistent/mail", "127.0.0.1:1", "-s", "a@b", "-r", "c@d"],
        ["nosuchcommand"],
        ["make"],
        ["spam", "classify"],
        ["dkim", "keygen", "--algorithm", "dsa"],
        ["verifier", "--domain", "x.test", "--destination", "127.0.0.1:1", "--nameserver", "bogus"],
        ["submission", "--nope"],
        ["users", "list", "--repo", "/nonexistent/repo"],
        ["queue", "list", "--spool", "/nonexistent/spool"],
    ],
)
def test_bad_input_is_one_line(argv: list[str]) -> None:
    result = run_poste(argv, input="")  # poste.cli.main in this process
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr


def test_bad_input_is_one_line_from_the_installed_poste(poste_bin: str) -> None:
    """The same through the installed entry point, once."""
    result = subprocess.run([poste_bin, "make", "--from", "a@b", "-f", "no colon here"],
                            capture_output=True, text=True, input="", timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr


def test_send_to_nothing_is_one_line(poste_bin: str) -> None:
    nothing = reserve_common_port(["127.0.0.1"])  # bound, not listening: refused
    port = nothing.port
    t0 = time.monotonic()
    result = subprocess.run(
        [poste_bin, "send", "-", f"127.0.0.1:{port}", "-s", "a@b", "-r", "c@d"],
        input="Subject: x\n\nbody\n", capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "cannot send" in result.stderr
    assert time.monotonic() - t0 < 60
    nothing.close()


async def test_submit_with_implicit_tls_on_any_port(poste_bin: str, tmp_path: Path) -> None:
    import asyncio

    from poste.smtp.stage import Envelope, Reply, Stage
    from poste.smtp.tls import server_context
    from poste.tools.srv import Mailbox, MailboxHop
    from support.smtp import running

    class Login(Stage):
        auth_required = True

        async def authenticate(self, env: Envelope, username: str, password: str) -> Reply | None:
            return None if (username, password) == ("joe", "pw") else Reply(535, "5.7.8 No")

    self_signed(tmp_path / "c.pem", tmp_path / "k.pem", "sub.test")
    ctx = server_context(tmp_path / "c.pem", tmp_path / "k.pem")
    box = Mailbox(str(tmp_path / "box") + "/", 0, False)
    async with running(Login(), MailboxHop(box), tls_context=ctx, implicit_tls=True) as svc:
        proc = await asyncio.create_subprocess_exec(
            poste_bin, "submit", "-", f"127.0.0.1:{svc.sockname[1]}", "--tls", "-s", "joe@x.test",
            "-r", "b@y.test", "-u", "joe", "-p", "pw",
            stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate(b"Subject: hi\n\nbody\n")
        assert proc.returncode == 0, err
    mail = (tmp_path / "box" / "1.eml").read_bytes()
    assert b"with ESMTPSA" in mail and b"joe" not in mail.split(b"\r\n\r\n")[0].split(b"Subject")[0]
