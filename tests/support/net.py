"""Loopback addresses and free ports for tests that use real sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (also free for UDP, best effort)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((host, port))
        except OSError:
            continue
        return int(port)
    raise RuntimeError("no free port")


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something listens on host:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.05)


def wait_path(path: Path, ready: Callable[[Path], bool], what: str, timeout: float) -> None:
    """Until `ready(path)`: a file written, a socket bound; TimeoutError saying `what`."""
    deadline = time.monotonic() + timeout
    while not ready(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: {what}")
        time.sleep(0.05)


def wait_socket(path: Path, timeout: float = 30.0) -> None:
    """Until a service listens on the unix socket `path`."""
    wait_path(path, Path.is_socket, "no socket there", timeout)
