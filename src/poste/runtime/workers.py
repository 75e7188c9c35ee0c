"""`--workers N`: a parent that owns the listening sockets and keeps N workers running.

Each worker is the same command again (`python -m poste ARGS`), told which it
is by `POSTE_WORKER=K/N` and given its end of a unix socket to the parent
(smtp/listen.py).  The parent builds nothing and reads no mail: it binds a
listener when a worker first asks for it (so it never has to know a
service's listeners, and a bind error is the worker's own one line), hands
the same sockets to every worker, and:

- starts worker 0 first and the others once it is ready (worker 0 adopts the
  spool shards of an earlier run with more workers before anyone else
  writes, and a bad config or a taken port is said once, by it);
- restarts a worker that dies (a signal or a non-zero exit) after a back-off
  (0.5 s, doubling up to 30 s, back to 0.5 s once it ran a minute), each time
  one log line; connections queued on a socket meanwhile wait for the others;
- forwards SIGHUP (reload) to every worker; one still starting gets it once
  it is ready (before, SIGHUP would end it: its handler is not installed,
  and what it read may predate the change); on SIGTERM/SIGINT closes its
  sockets, forwards SIGTERM and exits once every worker stopped.

A worker that exits with status 0 stopped because it was told to (systemd
signals the whole group): it is not restarted, and the parent ends with the
last of them.  With one worker there is no parent at all: the command runs
as it always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from poste.runtime.run import on_loop
from poste.smtp.listen import CONTROL_ENV, WORKER_ENV, listening

log = logging.getLogger("poste.workers")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STEADY = 60.0  # a worker that ran this long starts again with the first back-off


def command() -> list[str]:
    """How a worker is started: this interpreter, `-m poste`, our own arguments."""
    return [sys.executable, "-m", "poste", *sys.argv[1:]]


def _why(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Parent:
    """The supervisor of `n` workers (see the module's docstring)."""

    def __init__(self, n: int, argv: list[str] | None = None) -> None:
        self.n = n
        self.argv = argv or command()
        self.sockets: dict[tuple[str, int], list[socket.socket]] = {}
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.ready: dict[int, asyncio.Event] = {}
        self.hup_pending: set[int] = set()  # told to reload while starting
        self.stopping = asyncio.Event()

    # -- the control sockets ---------------------------------------------

    async def spawn(self, k: int) -> asyncio.subprocess.Process:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, WORKER_ENV: f"{k}/{self.n}", CONTROL_ENV: str(theirs.fileno())}
        self.ready[k] = asyncio.Event()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, env=env, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        ours.setblocking(False)
        loop.add_reader(ours, self._request, k, ours)
        self.procs[k] = proc
        return proc

    def _request(self, k: int, channel: socket.socket) -> None:
        try:
            data = channel.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker is gone
            asyncio.get_running_loop().remove_reader(channel)
            channel.close()
            return
        try:
            request: dict[str, Any] = json.loads(data)
            reply, fds = self._answer(k, request)
            socket.send_fds(channel, [json.dumps(reply).encode()], fds)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.error("worker %d: bad request to the parent: %s", k, exc)

    def _answer(self, k: int, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        if request.get("ready"):
            self.ready[k].set()
            if k in self.hup_pending:
                self.hup_pending.discard(k)
                self._signal(k, signal.SIGHUP)
            return {"ok": True}, []
        host, port = request["listen"]
        key = (str(host), int(port))
        if key not in self.sockets:
            if self.stopping.is_set():
                return {"errno": 0, "error": "stopping"}, []
            try:
                self.sockets[key] = listening(*key)
            except OSError as exc:
                return {"errno": exc.errno or 0, "error": exc.strerror or str(exc)}, []
        return {"ok": True}, [s.fileno() for s in self.sockets[key]]

    # -- life -------------------------------------------------------------

    async def _until_ready(self, k: int) -> int | None:
        """Start worker k; None once it is ready, its exit status if it ended before."""
        proc = await self.spawn(k)
        waits = {asyncio.ensure_future(self.ready[k].wait()),
                 asyncio.ensure_future(self.stopping.wait()),
                 asyncio.ensure_future(proc.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.ready[k].is_set():
            return None
        if proc.returncode is None:  # told to stop while it started
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            await proc.wait()
        return proc.returncode or 1

    async def _keep(self, k: int) -> int:
        """Restart worker k each time it dies, until it stops on purpose or we stop."""
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST
        started = loop.time()
        while True:
            proc = self.procs[k]
            code = await proc.wait()
            if self.stopping.is_set() or code == 0:
                return code
            if loop.time() - started >= STEADY:
                delay = BACKOFF_FIRST
            log.error("worker %d (pid %d) %s; starting it again in %.1fs",
                      k, proc.pid, _why(code), delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return code
            delay = min(delay * 2, BACKOFF_MAX)
            started = loop.time()
            await self.spawn(k)

    def _signal(self, k: int, sig: int) -> None:
        proc = self.procs.get(k)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def _signal_all(self, sig: int) -> None:
        for k in self.procs:
            self._signal(k, sig)

    def _stop(self) -> None:
        if self.stopping.is_set():
            return
        log.info("workers: stopping %d", self.n)
        self.stopping.set()
        for socks in self.sockets.values():  # no new connection queues for anyone
            for s in socks:
                s.close()
        self._signal_all(signal.SIGTERM)

    def _hup(self) -> None:
        log.info("workers: SIGHUP to %d", self.n)
        for k in self.procs:
            if self.ready[k].is_set():
                self._signal(k, signal.SIGHUP)
            else:  # its reload comes once it can take it
                self.hup_pending.add(k)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop)
        loop.add_signal_handler(signal.SIGHUP, self._hup)
        try:
            return await self._run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for (host, _), socks in self.sockets.items():
                for s in socks:
                    s.close()
                if host.startswith("/"):
                    with contextlib.suppress(OSError):
                        os.unlink(host)

    async def _run(self) -> int:
        code = await self._until_ready(0)
        if code is not None:
            return code  # worker 0 said why (a config, a port): once
        codes = await asyncio.gather(*(self._until_ready(k) for k in range(1, self.n)))
        if any(c is not None for c in codes) and not self.stopping.is_set():
            log.error("workers: %d of %d could not start; stopping",
                      sum(c is not None for c in codes), self.n - 1)
            self._stop()
        if not self.stopping.is_set():
            log.info("workers: %d ready (pids %s)", self.n,
                     " ".join(str(self.procs[k].pid) for k in range(self.n)))
        keepers = [asyncio.ensure_future(self._keep(k)) for k in range(self.n)]
        finals = await asyncio.gather(*keepers)
        failed = any(c is not None for c in codes)
        return 1 if failed or any(c not in (0, -signal.SIGTERM) for c in finals) else 0


def refusal(values: Any) -> str | None:
    """Why settings cannot be shared by several workers yet (None: they can).

    Each of these has one owner that must act alone, and no hand-over yet:
    the ACME certificate's renewal (one order, one state folder) and the
    DKIM keys' rotation (one epoch switch, published once).
    """
    get = values.get
    if get("acme-directory"):
        return "the ACME certificate renewal (acme-directory) runs in one process only"
    if get("key-dir"):
        return "DKIM key rotation (key-dir) runs in one process only"
    return None


def run(n: int) -> int:
    """Be the parent of `n` workers until they all stopped; the exit status.

    The parent runs on the loop its workers run on (runtime/event_loop.py): one choice
    for the whole tree, and a bad POSTE_EVENT_LOOP is said once, before any worker starts.
    """
    return on_loop(Parent(n).run())
