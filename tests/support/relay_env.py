"""Helpers for the relay's tests: test zones, stand-in MX servers, a users repo, the relay."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from support.knot import simple_zone
from support.net import wait_port

# Stand-in MX hosts of the test world.
MX = {
    "gmail.test": "127.0.0.21",
    "outlook.test": "127.0.0.22",
    "example.org": "127.0.0.23",
    "down.test": "127.0.0.24",
    "refuse.test": "127.0.0.25",
    "late.test": "127.0.0.26",
}


def mx_zones() -> dict[str, str]:
    """MX records for every stand-in domain, plus null MX, implicit MX, 2-MX and odd domains."""
    zones = {
        dom: simple_zone(dom, f"@ MX 10 mx.{dom}.\nmx A {ip}\n") for dom, ip in MX.items()
    }
    zones["nullmx.test"] = simple_zone("nullmx.test", "@ MX 0 .\n")
    zones["implicit.test"] = simple_zone("implicit.test", "@ A 127.0.0.27\n")
    zones["backup.test"] = simple_zone(
        "backup.test",
        "@ MX 10 mx1.backup.test.\n@ MX 20 mx2.backup.test.\n"
        "mx1 A 127.0.0.28\nmx2 A 127.0.0.29\n",
    )
    zones["v6.test"] = simple_zone("v6.test", "@ MX 10 mx.v6.test.\nmx AAAA ::1\nmx A 127.0.0.30\n")
    # Takes no mail at all: no MX, no address (only a TXT record).
    zones["noaddr.test"] = simple_zone("noaddr.test", '@ TXT "no mail here"\n')
    # Its MX is the relay's own --listen address (127.0.0.1): a loop.
    zones["selfloop.test"] = simple_zone("selfloop.test", "@ MX 10 mx.selfloop.test.\nmx A 127.0.0.1\n")
    return zones


def common_port(hosts: Iterable[str]) -> int:
    """A TCP port free on every one of `hosts` (the relay's --smtp-port is one for all)."""
    hosts = list(hosts)

    def sock(host: str) -> socket.socket:
        return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)

    for _ in range(200):
        with sock(hosts[0]) as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        ok = True
        for h in hosts[1:]:
            with sock(h) as s:
                try:
                    s.bind((h, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no common free port")


class Srv:
    """`poste srv` as a stand-in MX: every mail lands in its folder with Return-Path."""

    def __init__(self, poste_bin: str, host: str, port: int, folder: Path, *extra: str) -> None:
        self.poste_bin, self.host, self.port, self.folder = poste_bin, host, port, folder
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Srv:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder.parent / f"srv-{self.host}.log", "ab")
        self.proc = subprocess.Popen(
            [self.poste_bin, "srv", f"{self.host}:{self.port}", "-o", f"{self.folder}/",
             "--count", "0", "--with-data", "--hostname", f"mx-{self.host}", *self.extra],
            stdout=log, stderr=log,
        )
        log.close()
        wait_port(self.host, self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def mails(self) -> list[bytes]:
        return folder_mails(self.folder)

    def wait(self, n: int, timeout: float = 30.0) -> list[bytes]:
        return wait_mails(self.folder, n, timeout, self.host)


def folder_mails(folder: Path) -> list[bytes]:
    """The mails a stand-in stored in `folder`, in the order they came (N.eml)."""
    if not folder.exists():
        return []
    return [p.read_bytes() for p in sorted(folder.glob("*.eml"), key=lambda p: int(p.stem))]


def wait_mails(folder: Path, n: int, timeout: float, who: str) -> list[bytes]:
    """At least `n` mails in `folder` (polled: a folder has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        got = folder_mails(folder)
        if len(got) >= n:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{who}: {len(got)} mail(s), expected {n}")
        time.sleep(0.02)


def header(mail: bytes, name: str) -> list[str]:
    head = mail.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    head = head.replace("\r\n ", " ").replace("\r\n\t", " ")  # unfold
    out = []
    for line in head.split("\r\n"):
        if line.lower().startswith(name.lower() + ":"):
            out.append(line.split(":", 1)[1].strip())
    return out


def return_path(mail: bytes) -> str:
    return header(mail, "Return-Path")[0].strip("<>")


def make_users(poste_bin: str, repo: Path, users: dict[str, list[str]]) -> None:
    """`poste users add NAME --no-password --target ...` for each user (in this process).

    `poste_bin` is unused now (the subprocess cases of `poste users` are in
    test_users_cli); it stays so the callers read as before.
    """
    from support.cli import run_poste

    for name, targets in users.items():
        args = ["users", "add", name, "--repo", str(repo), "--no-password"]
        for t in targets:
            args += ["--target", t]
        ran = run_poste(args)
        assert ran.returncode == 0, ran.stderr


class Relay:
    """`poste relay` as a subprocess, as an admin runs it.

    It listens on port 0 (`--listen 127.0.0.1:0`): the port the kernel gave it
    is read from its log line `relay listening on 127.0.0.1:PORT`, so no port
    is picked beforehand and left free for someone else to take.
    """

    def __init__(self, poste_bin: str, workdir: Path, nameserver: str, smtp_port: int,
                 *extra: str, domain: str = "our.test") -> None:
        self.poste_bin = poste_bin
        self.workdir = workdir
        self.spool = workdir / "spool"
        self.users = workdir / "users"
        self.host = "127.0.0.1"
        self.port = 0  # known once started
        self.args = [
            poste_bin, "relay", "--domain", domain, "--postmaster", "admin@example.org",
            "--users", str(self.users), "--spool", str(self.spool),
            "--listen", f"{self.host}:0", "--nameserver", nameserver,
            "--smtp-port", str(smtp_port), "--srs-secret", "test-secret",
            "--hostname", "relay.our.test", "--users-poll", "0.2s", "--no-ipv6", *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "relay.log"

    def start(self, timeout: float = 20.0) -> Relay:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, start_new_session=True)
        log.close()
        listening = re.compile(rf"relay listening on {re.escape(self.host)}:(\d+)")
        deadline = time.monotonic() + timeout
        while True:
            found = listening.search(self.log(offset))
            if found:
                self.port = int(found.group(1))
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"relay did not start:\n{self.log(offset)}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def log(self, offset: int = 0) -> str:
        """The relay's log (from byte `offset` on)."""
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[offset:].decode(errors="replace")
        return ""
