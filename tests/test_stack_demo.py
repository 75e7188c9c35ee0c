"""The README's first command: `poste up` with no config runs the demo, and a second
terminal sends a mail through it with `poste submit` and sees it arrive."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from support.cli import run_poste
from support.net import free_port, wait_port


def _free_ports(host: str, n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port(host)
        if p not in ports:
            ports.append(p)
    return ports


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, poste_bin: str):
    """One `poste up` demo for the module's tests (the wrong password one sends nothing)."""
    tmp_path = tmp_path_factory.mktemp("demo")
    home = tmp_path / "home"
    cwd = tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTE_", "XDG_"))
           or k == "POSTE_WORKERS"}
    env["HOME"] = str(home)
    host = "127.0.0.1"
    ports = _free_ports(host, 3)
    err = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen(
        [poste_bin, "up", "--demo-ports", ",".join(map(str, ports))],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err,
    )
    try:
        for p in ports:
            wait_port(host, p, timeout=30)
        deadline = time.monotonic() + 10
        while "password:" not in (tmp_path / "up.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield proc, env, cwd, home, tmp_path / "up.log", ports
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()


def _wait_files(folder: Path, n: int, timeout: float = 20.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(folder.glob("*.eml"))
        if len(files) >= n or time.monotonic() > deadline:
            return files
        time.sleep(0.05)


def _run(cmd: str, env: dict[str, str], cwd: Path, bindir: str | None
         ) -> subprocess.CompletedProcess[str]:
    # A second terminal: no virtualenv activated unless bindir is given.
    path = "/usr/local/bin:/usr/bin:/bin"
    env = dict(env, PATH=bindir + os.pathsep + path if bindir else path)
    return subprocess.run(cmd, shell=True, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_demo_submit_and_receive(demo, poste_bin: str) -> None:
    _proc, env, cwd, home, log_path, _ports = demo
    banner = log_path.read_text()
    folder = home / ".local" / "state" / "poste-demo"
    assert str(folder) in banner
    # The banner's commands are meant to be pasted: run them as printed.
    commands = [
        line.strip()
        for line in banner.replace("\\\n", " ").splitlines()
        if line.strip().startswith("printf")
    ]
    assert len(commands) == 2, banner
    sent = _run(commands[0], env, cwd, None)  # pasted as printed, in a fresh shell
    assert sent.returncode == 0, sent.stderr
    assert "250" in sent.stdout + sent.stderr
    box = folder / "mailbox"
    files = _wait_files(box, 1)
    assert len(files) == 1, log_path.read_text()
    mail = files[0].read_bytes()
    head = mail.split(b"\r\n\r\n", 1)[0]
    assert b"Hello from poste!" in mail
    assert b"DKIM-Signature:" in head and b"d=demo.test" in head
    assert b"Return-Path: <demo@demo.test>" in head
    # submission, signer, relay: one Received: each, the first (bottom) with ESMTPSA
    received = re.findall(rb"^Received: .*?(?=^\S)", head + b"\r\nX", re.M | re.S)
    assert len(received) == 3, head.decode()
    assert b"ESMTPSA" in received[-1]

    got = _run(commands[1], env, cwd, None)
    assert got.returncode == 0, got.stderr
    files = _wait_files(box, 2)
    assert len(files) == 2, log_path.read_text()
    second = files[1].read_bytes().split(b"\r\n\r\n", 1)[0]
    assert b"X-Spamtacus:" in second
    assert b"Received-SPF:" in second
    assert b"Authentication-Results:" in second
    assert b"Delivered-To: demo@inbox.demo.test" in second
    assert b"Return-Path: <SRS0=" in second  # forwarded: SRS envelope sender


def test_demo_wrong_password_refused(demo, poste_bin: str) -> None:
    _proc, env, cwd, _home, _log_path, ports = demo
    bindir = str(Path(poste_bin).parent)
    r = _run(
        f"printf 'x\\n' | poste make --from demo@demo.test --to a@b.example"
        f" | poste submit - 127.0.0.1:{ports[2]} -s demo@demo.test -r a@b.example"
        " -u demo@demo.test -p wrong",
        env, cwd, bindir,
    )
    assert r.returncode != 0
    assert "535" in r.stderr
    assert "Traceback" not in r.stderr


def test_up_bad_config_is_one_line(tmp_path: Path, poste_bin: str) -> None:
    bad = tmp_path / "poste.toml"
    bad.write_text("[relay]\nspool = 'spool'\nlisen = 'x'\n")
    r = run_poste(["up", "--config", str(bad)])  # poste.cli.main in this process
    assert r.returncode != 0
    assert "unknown key `lisen`" in r.stderr and "did you mean `listen`" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_poste(["up", "--config", str(tmp_path / "nope.toml")])
    assert r.returncode != 0 and "poste init" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
