"""Listening sockets that several worker processes share (runtime/workers.py).

With `--workers N` (N > 1) one parent process owns every listening socket and
N workers accept from them: one accept queue per socket, so a worker that
dies resets no connection still waiting in it, and unix sockets are shared
the same way as TCP ones (SO_REUSEPORT would give each worker a queue of its
own, and has no unix-socket form).  A worker asks its parent for the sockets
of `host:port` over a unix socket (`CONTROL_ENV`); the parent binds them at
the first request, with the options asyncio's `create_server` and
`create_unix_server` use for a single process (`bind_tcp`, `bind_unix`), and
hands the same ones to every worker.  A bind error travels back as the
worker's OSError, so a taken port is the same one line as without workers.

Outside a worker (`worker()` is None) nothing here is used by the listeners:
they bind themselves, as they always did.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from typing import Any

WORKER_ENV = "POSTE_WORKER"  # "K/N" in worker K (0-based) of N
CONTROL_ENV = "POSTE_WORKER_FD"  # the worker's end of its unix socket to the parent
BACKLOG = 512  # a flood of refused connections must not fill the accept queue
UNIX_UMASK = 0o117  # unix sockets mode 0660: our services (owner, group) may connect

_channel: socket.socket | None = None


def worker() -> tuple[int, int] | None:
    """(K, N) in worker K of N, None in a process of its own (no workers, or the parent)."""
    text = os.environ.get(WORKER_ENV, "")
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit()):
        return None
    return int(k), int(n)


def index() -> int:
    """This worker's number; 0 without workers (the one process does worker 0's jobs)."""
    found = worker()
    return found[0] if found else 0


def first() -> bool:
    """Does this process run the jobs that must run once (digests, reports, prunes)?"""
    return index() == 0


def bind_tcp(host: str, port: int, *, asyncio_words: bool = False) -> list[socket.socket]:
    """Bound sockets for `host:port` ("" or None: every address), as asyncio's
    create_server binds them: SO_REUSEADDR, IPv6 sockets v6-only; not listening yet.
    OSError when one cannot be bound (`asyncio_words`: worded as asyncio says it, so a
    worker's error line is the one a single process gives)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as err:
                if not asyncio_words:
                    raise
                raise OSError(err.errno, f"error while attempting to bind on address {addr!r}: "
                              f"{(err.strerror or str(err)).lower()}") from None
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def bind_unix(path: str) -> socket.socket:
    """A bound unix socket at `path`, mode 0660 (`UNIX_UMASK`); a socket file left by
    a process that died is replaced, as asyncio's create_unix_server does."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(UNIX_UMASK)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock


def listening(host: str, port: int) -> list[socket.socket]:
    """What a parent hands out: bound and listening (`host` starting with / is a unix path)."""
    socks = [bind_unix(host)] if host.startswith("/") else bind_tcp(host, port, asyncio_words=True)
    for sock in socks:
        sock.listen(BACKLOG)
        sock.setblocking(False)
    return socks


def _ask(request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    global _channel
    if _channel is None:
        _channel = socket.socket(fileno=int(os.environ[CONTROL_ENV]))
    _channel.setblocking(True)
    _channel.send(json.dumps(request).encode())
    data, fds, _, _ = socket.recv_fds(_channel, 65536, 16)
    if not data:
        raise OSError(0, "the parent process is gone")
    return json.loads(data), fds


def inherited(host: str, port: int) -> list[socket.socket] | None:
    """In a worker: the parent's listening sockets for `host:port`; None elsewhere."""
    if worker() is None or CONTROL_ENV not in os.environ:
        return None
    reply, fds = _ask({"listen": [host, port]})
    if "errno" in reply:
        for fd in fds:
            os.close(fd)
        raise OSError(int(reply["errno"]), str(reply["error"]))
    return [socket.socket(fileno=fd) for fd in fds]


def tell_ready() -> None:
    """A worker's listeners are open and its jobs started: the parent may start the next."""
    if worker() is not None and CONTROL_ENV in os.environ:
        _ask({"ready": True})
