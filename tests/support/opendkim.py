"""Run Debian's `opendkim-testmsg` against our own DNS server on loopback.

opendkim-testmsg has no resolver option: libopendkim (Debian build) uses the
libc resolver, which reads /etc/resolv.conf and only talks to port 53.  So the
test DNS server listens on port 53 of a loopback address of its own
(127.a.b.c, picked at random, so parallel runs do not meet), and
opendkim-testmsg runs in a private mount namespace (`unshare -m`, we are root)
where /etc/resolv.conf is bind-mounted to a file naming that address.  The
rest of the machine never sees the change.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from pathlib import Path

TESTMSG = shutil.which("opendkim-testmsg") or "/usr/sbin/opendkim-testmsg"


def available() -> bool:
    """opendkim-testmsg is installed and we may make a private mount namespace."""
    if not Path(TESTMSG).exists() or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


def port53_host() -> str:
    """A loopback address whose port 53 is free for both UDP and TCP."""
    for _ in range(100):
        host = f"127.{random.randint(1, 254)}.{random.randint(0, 254)}.{random.randint(2, 254)}"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.bind((host, 53))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((host, 53))
        except OSError:
            continue
        return host
    raise RuntimeError("no loopback address with a free port 53")


def testmsg(
    message: bytes, nameserver_ip: str, workdir: Path
) -> subprocess.CompletedProcess[bytes]:
    """Verify `message` with opendkim-testmsg, keys fetched from nameserver_ip:53.

    Returns the finished process: exit 0 and no output means every check passed.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    resolv = workdir / "resolv.conf"
    resolv.write_text(f"nameserver {nameserver_ip}\noptions attempts:2 timeout:2\n")
    script = f'mount --bind "{resolv}" /etc/resolv.conf && exec "{TESTMSG}" -t "{workdir}"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        input=message,
        capture_output=True,
        timeout=60,
    )
