"""Stand-in MX hosts inside the test process: `poste srv`'s own mailbox, no process each.

`poste srv` as a subprocess costs a Python start per stand-in (and a test of
the relay wants two or three of them).  `StandIns` runs the very code of
`poste srv --count 0 --with-data` (its Mailbox and MailboxHop on the SMTP
core) on an event loop in a background thread, one listener per host.

All hosts share one port (the relay's --smtp-port is one for all).  It is
found by binding port 0 on the first host and the same port on the others,
and those sockets are kept bound (not listening) until a stand-in takes the
port on its host: a host whose stand-in is not running yet refuses
connections, as a host with nothing on port 25 does, and no other program
can take the port meanwhile (`late.test` coming up late gets its port).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

from poste.smtp.server import Limits, SMTPService
from poste.smtp.stage import Envelope, Reply, Stage
from poste.tools.srv import Mailbox, MailboxHop
from support.relay_env import folder_mails, wait_mails

T = TypeVar("T")


def _reply(text: str | None) -> Reply | None:
    """`"550 5.1.1 No such user"` as `poste srv --rcpt-reply` takes it."""
    if text is None:
        return None
    code, _, rest = text.partition(" ")
    return Reply(int(code), rest)


class PortReservation:
    """One port bound (not listening) on every host, until a server takes it or close().

    The sockets do not set SO_REUSEADDR, so nothing else can share them (not even
    another reservation, in a parallel run), and bind(0) gives a port nobody holds.
    A server that is to listen on a host calls `release(host)` right before it
    binds (asyncio binds with SO_REUSEADDR, which a non-reuse socket would block).
    """

    def __init__(self, hosts: Iterable[str]) -> None:
        hosts = list(hosts)
        for _ in range(200):
            socks: dict[str, socket.socket] = {}
            try:
                for h in hosts:
                    s = socket.socket(socket.AF_INET6 if ":" in h else socket.AF_INET)
                    socks[h] = s
                    port = int(socks[hosts[0]].getsockname()[1]) if len(socks) > 1 else 0
                    s.bind((h, port))
            except OSError:
                for s in socks.values():
                    s.close()
                continue
            self.port = int(socks[hosts[0]].getsockname()[1])
            self._socks = socks
            return
        raise RuntimeError(f"no port free on all of {hosts}")

    def release(self, host: str) -> None:
        sock = self._socks.pop(host, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for host in list(self._socks):
            self.release(host)


def reserve_common_port(hosts: Iterable[str]) -> PortReservation:
    """A port bound (not listening) on every host: bind port 0 on the first, then the others."""
    return PortReservation(hosts)


class StandIn:
    """One stand-in MX: every mail lands in `folder` as N.eml, with Return-Path/Delivered-To."""

    def __init__(self, world: StandIns, host: str, folder: Path, service: SMTPService) -> None:
        self.world, self.host, self.folder, self.service = world, host, folder, service
        self.port = world.port

    @property
    def sessions(self) -> int:
        """SMTP sessions opened with this stand-in so far."""
        stage = self.service.stage
        assert isinstance(stage, _Counting)
        return stage.sessions

    def stop(self) -> None:
        if self in self.world.running:
            self.world.running.remove(self)
            self.world.call(self.service.stop())

    def mails(self) -> list[bytes]:
        return folder_mails(self.folder)

    def wait(self, n: int, timeout: float = 30.0) -> list[bytes]:
        return wait_mails(self.folder, n, timeout, self.host)


class _Counting(Stage):
    """`poste srv`'s Stage (accept everything), counting the sessions it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions = 0

    async def on_connect(self, env: Envelope) -> Reply | None:
        self.sessions += 1
        return await super().on_connect(env)


class StandIns:
    """Stand-in MX hosts on one shared port, served by one background event loop."""

    def __init__(self, hosts: Iterable[str]) -> None:
        self.hosts = list(hosts)
        self._reserved = reserve_common_port(self.hosts)
        self.port = self._reserved.port
        self.running: list[StandIn] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="standins",
                                        daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, host: str, folder: Path, *, rcpt_reply: str | None = None,
              data_reply: str | None = None) -> StandIn:
        """What `poste srv HOST:PORT -o FOLDER/ --count 0 --with-data --hostname mx-HOST` runs."""
        assert host in self.hosts, host
        box = Mailbox(f"{folder}/", 0, True)
        hop = MailboxHop(box, _reply(rcpt_reply), _reply(data_reply))
        service = SMTPService(_Counting(), hop, host=host, port=self.port, hostname=f"mx-{host}",
                              limits=Limits(max_connections=200))
        self._reserved.release(host)  # right before the listener binds the port
        self.call(service.start())
        standin = StandIn(self, host, folder, service)
        self.running.append(standin)
        return standin

    def release(self, host: str) -> None:
        """Give up the shared port on `host` for another server to bind (a Postfix MX)."""
        self._reserved.release(host)

    def close(self) -> None:
        for standin in list(self.running):
            with contextlib.suppress(Exception):
                standin.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        self._reserved.close()

    def __enter__(self) -> StandIns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["PortReservation", "StandIn", "StandIns", "reserve_common_port"]
