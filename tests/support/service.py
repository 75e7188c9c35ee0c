"""Run a `poste` service told to listen on port 0, and learn its ports from its log.

Picking a free port first and handing it to the service leaves a window in
which anything else on the machine (another test, another developer's run)
can take it.  Every poste service logs `<name> listening on HOST:PORT` once
its listener is open (`poste srv` prints `listening on HOST:PORT`), so the
test passes `--listen HOST:0` and reads the port the kernel gave.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


def listening_ports(
    log: Path, host: str, count: int, proc: subprocess.Popen[bytes] | None = None,
    timeout: float = 20.0, offset: int = 0,
) -> list[int]:
    """The ports of the first `count` `listening on HOST:PORT` lines of `log` (past `offset`)."""
    pattern = re.compile(rf"listening on \[?{re.escape(host)}\]?:(\d+)")
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            text = log.read_bytes()[offset:].decode(errors="replace")
            ports = [int(m.group(1)) for m in pattern.finditer(text)]
            if len(ports) >= count:
                return ports[:count]
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before listening:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not listening on {host} after {timeout:.0f}s:\n{_tail(log)}")
        time.sleep(0.02)


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-3000:]
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def started(
    args: Sequence[str], log: Path, host: str = "127.0.0.1", listeners: int = 1
) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """Run `args` (listening on `host`:0) until the block ends; yields it and its ports."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT)
    try:
        ports = listening_ports(log, host, listeners, proc)
        yield proc, ports
    finally:
        stop(proc)


__all__ = ["listening_ports", "started", "stop"]
