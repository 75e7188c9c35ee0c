"""A private daemon a test runs (knotd, unbound, pebble): its process and its log.

Each of them is started by its own class, which knows its configuration and
when it is ready; what they share is here once: the log read for an error
message, the check that the process is still there while a test waits for
it, and a stop that always ends the process (SIGTERM, then SIGKILL after 10 s).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


class Daemon:
    name = "daemon"

    def __init__(self, log_path: Path) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = log_path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        """Raise with the log if the daemon exited (while a test waits for it)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
