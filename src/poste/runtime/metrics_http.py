"""The Prometheus `/metrics` endpoint of `poste up` and of every service.

prometheus_client's own HTTP server runs in a daemon thread, so a scrape
never waits on the event loop and a busy loop never delays a scrape.  The
relay's queue gauges are filled at scrape time by reading the spool folder
(the spool is the truth; counting in memory would drift after `poste queue
delete`).
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import start_http_server

from poste.runtime.hostport import parse_hostport
from poste.runtime.run import StartError
from poste.runtime.settings import ConfigError
from poste.smtp import listen

log = logging.getLogger("poste")

_started: dict[tuple[str, int], object] = {}
_lock = threading.Lock()


def parse_addr(spec: str) -> tuple[str, int]:
    """`PORT`, `:PORT`, `ADDR:PORT`, `[v6]:PORT` -> (addr, port); ValueError when bad.

    The same address syntax as every other flag (`parse_hostport`), plus a
    bare port meaning loopback; a port is required.
    """
    text = spec.strip()
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    try:
        host, port = parse_hostport(text, 0)
    except ConfigError as exc:
        raise ValueError(f"{spec!r}: {exc.message}") from None
    if port == 0:
        raise ValueError(f"{spec!r}: expected ADDR:PORT")
    return host or "127.0.0.1", port


def serve(spec: str) -> tuple[str, int]:
    """Start the endpoint once per address (idempotent); OSError when the port is taken."""
    host, port = parse_addr(spec)
    with _lock:
        if (host, port) not in _started:
            _started[(host, port)] = start_http_server(port, addr=host)
            log.info("metrics on http://%s:%d/metrics", host, port)
    return host, port


def serve_or_fail(spec: str | None) -> None:
    """For `--metrics`: a bad address is a ConfigError, a taken port a StartError."""
    if not spec:
        return
    try:
        k = listen.index()
        if k:  # worker K serves its own counters on PORT+K
            host, port = parse_addr(spec)
            spec = f"[{host}]:{port + k}" if ":" in host else f"{host}:{port + k}"
        serve(spec)
    except ValueError as exc:
        raise ConfigError("metrics", str(exc)) from None
    except OSError as exc:
        raise StartError(f"--metrics {spec}: {exc.strerror or exc}") from None
