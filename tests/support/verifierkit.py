"""Helpers for the verifier tests: mails, swaks runs, reading what `poste srv` stored."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from poste.smtp.tls import self_signed

HOSTNAME = "mx.our.test"


def mail(subject: str, sender: str = "someone@sender.test", body: str = "Hello.\r\n") -> bytes:
    return (
        f"From: Someone <{sender}>\r\n"
        "To: User <user@our.test>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@sender.test>\r\n"
        "\r\n" + body
    ).encode()


def swaks_args(
    port: int,
    message: bytes,
    tmp: Path,
    *,
    sender: str = "someone@sender.test",
    to: str = "user@our.test",
    source: str = "127.0.0.10",
    tls: bool = True,
) -> list[str]:
    """A swaks command line sending `message` from `source` (the message goes to a file)."""
    path = tmp / f"swaks-{time.monotonic_ns()}.eml"
    path.write_bytes(message)
    args = ["swaks", "--server", "127.0.0.1", "--port", str(port), "--local-interface", source]
    args += ["--from", sender, "--to", to, "--helo", "client.sender.test", "--data", f"@{path}"]
    if tls:
        args.append("--tls")
    return args


def swaks(port: int, message: bytes, tmp: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        swaks_args(port, message, tmp, **kw), capture_output=True, text=True, timeout=60
    )


def find(box: Path, marker: bytes, timeout: float = 20.0) -> bytes:
    """The stored mail that contains `marker` (waits for it to arrive)."""
    deadline = time.monotonic() + timeout
    while True:
        for path in sorted(box.glob("*.eml")):
            data = path.read_bytes()
            if marker in data:
                return data
        if time.monotonic() > deadline:
            raise TimeoutError(f"no mail with {marker!r} in {box}")
        time.sleep(0.05)


def header(stored: bytes, name: str) -> str:
    """One field of the stored mail, unfolded (the first one, top down)."""
    head = stored.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    for i, line in enumerate(lines):
        if line.lower().startswith(name.lower() + ":"):
            value = line.split(":", 1)[1]
            for more in lines[i + 1 :]:
                if more[:1] not in (" ", "\t"):
                    break
                value += " " + more.strip()
            return value.strip()
    raise AssertionError(f"no {name} field in:\n{head}")


def verifier_args(poste_bin: str, port: int, dest: int, tmp: Path, ns: str) -> list[str]:
    cert, keyfile = tmp / "cert.pem", tmp / "key.pem"
    if not cert.exists():
        self_signed(cert, keyfile, HOSTNAME)
    return [
        poste_bin,
        "verifier",
        "--domain",
        "our.test",
        "--domain",
        "other.test",
        "--destination",
        f"127.0.0.1:{dest}",
        "--postmaster",
        "hostmaster@our.test",
        "--listen",
        f"127.0.0.1:{port}",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(keyfile),
        "--nameserver",
        ns,
        "--hostname",
        HOSTNAME,
    ]
