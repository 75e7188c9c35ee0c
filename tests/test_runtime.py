"""The one run loop (runtime/run.py): signals sent to real processes, and its start/stop order."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from poste.runtime.run import Parts, Runtime, StartError
from poste.smtp.server import SMTPService
from poste.smtp.stage import Stage
from poste.smtp.tls import self_signed
from support.net import free_port, wait_port
from support.relay_env import make_users

HOST = "127.0.0.1"


def _wait(log: Path, needle: str, after: int = 0, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in log.read_text()[after:]:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@contextmanager
def _process(args: list[str], log: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=fh)
    try:
        wait_port(HOST, port, timeout=30)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _starttls_cert(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(HOST, port, timeout=10) as s:
        s.starttls(context=ctx)
        assert isinstance(s.sock, ssl.SSLSocket)
        der = s.sock.getpeercert(binary_form=True)
    assert der
    return der


def test_sighup_reloads_the_certificate_and_sigterm_stops(tmp_path: Path, poste_bin: str) -> None:
    """Every service command reloads its certificate on SIGHUP (here `poste forward`)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed(cert, key, "one.test")
    port, log = free_port(HOST), tmp_path / "fwd.log"
    args = [poste_bin, "forward", "--listen", f"{HOST}:{port}", "--destination", f"{HOST}:1",
            "--tls-cert", str(cert), "--tls-key", str(key)]
    with _process(args, log, port) as proc:
        first = _starttls_cert(port)
        cert.unlink()
        key.unlink()
        self_signed(cert, key, "two.test")
        proc.send_signal(signal.SIGHUP)
        _wait(log, f"reload: certificate {cert}")
        second = _starttls_cert(port)
        assert second != first
        # A broken file is refused; the running certificate stays and so does the process.
        mark = len(log.read_text())
        cert.write_text("not a certificate")
        proc.send_signal(signal.SIGHUP)
        _wait(log, "refused, keeping the old one", after=mark)
        assert _starttls_cert(port) == second and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert "stopping" in log.read_text()
    assert "Traceback" not in log.read_text()


def test_relay_sighup_reloads_users_and_sigterm_frees_the_spool(
    tmp_path: Path, poste_bin: str
) -> None:
    users, spool = tmp_path / "users", tmp_path / "spool"
    make_users(poste_bin, users, {"alice": ["alice@far.test"]})
    log = tmp_path / "relay.log"

    def relay(port: int) -> list[str]:
        return [poste_bin, "relay", "--domain", "our.test", "--postmaster", "pm@our.test",
                "--users", str(users), "--spool", str(spool), "--srs-secret", "s",
                "--users-poll", "1h", "--listen", f"{HOST}:{port}"]

    port = free_port(HOST)
    with _process(relay(port), log, port) as proc:
        make_users(poste_bin, users, {"bob": ["bob@far.test"]})
        proc.send_signal(signal.SIGHUP)
        _wait(log, "reload: users reloaded")
        proc.send_signal(signal.SIGHUP)
        _wait(log, "reload: users unchanged")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    # Stopped in order: the spool lock went with it, so a new relay takes the spool.
    port = free_port(HOST)
    with _process(relay(port), tmp_path / "again.log", port) as proc:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0


def _service(port: int) -> SMTPService:
    return SMTPService(Stage(), None, host=HOST, port=port)  # type: ignore[arg-type]


def test_start_order_and_a_port_taken(tmp_path: Path) -> None:
    order: list[str] = []

    def job(name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            order.append(name)

        return run

    async def scenario() -> None:
        free = free_port(HOST)
        with socket.socket() as busy:
            busy.bind((HOST, 0))
            busy.listen()
            taken = busy.getsockname()[1]
            first = _service(free)
            parts = Parts([first, _service(taken)], before=[job("before")],
                          after=[job("after")])
            with pytest.raises(StartError, match=f"cannot listen on {HOST}:{taken}"):
                await Runtime(parts).start()
        # the listener that did open is closed again, and the `after` jobs ran
        assert order == ["before", "after"]
        with socket.socket() as again:
            again.bind((HOST, free))

    asyncio.run(scenario())


def test_a_failing_reload_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    done: list[str] = []

    async def bad() -> None:
        raise OSError("gone")

    async def good() -> None:
        await asyncio.sleep(0.01)
        done.append("good")

    async def scenario() -> None:
        runtime = Runtime(Parts(reloads=[("spam database", bad), ("users", good)]))
        await asyncio.gather(runtime.reload(), runtime.reload())  # one after the other

    asyncio.run(scenario())
    assert done == ["good", "good"]
    assert "reload: spam database refused, keeping the old one: gone" in caplog.text
