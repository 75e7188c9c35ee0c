"""The one run loop of every poste process: start order, signals, reload, stop order.

A service command and `poste up` differ only in the `Parts` they hand it.
Order matters for the relay: its spool is resumed (and cleaned of half-
written files) before any listener opens, and delivery stops only after
the listeners closed, so no mail is accepted once the spool lock is gone.
SIGTERM/SIGINT stop; SIGHUP runs every reload job (users, spam database,
certificates...), one reload at a time, its task kept until done so it
cannot be collected half-way.  A failing reload is logged: the process
keeps what it had.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from poste.runtime import event_loop
from poste.smtp import listen
from poste.smtp.server import SMTPService

log = logging.getLogger("poste")

Job = Callable[[], Awaitable[object]]


class StartError(Exception):
    """The process cannot start (a port taken, keys not published); one line."""


@dataclass
class Parts:
    """What one process runs: listeners, and the jobs around them."""

    listeners: list[SMTPService] = field(default_factory=list)
    before: list[Job] = field(default_factory=list)  # before any listener opens
    background: list[Job] = field(default_factory=list)  # alongside, cancelled at stop
    after: list[Job] = field(default_factory=list)  # once the listeners are closed
    reloads: list[tuple[str, Job]] = field(default_factory=list)  # SIGHUP: (what, job)
    name_listeners: bool = False  # `poste up`: say which service could not listen

    def add(self, other: Parts) -> None:
        self.listeners += other.listeners
        self.before += other.before
        self.background += other.background
        self.after += other.after
        self.reloads += other.reloads


class Runtime:
    """Starts, reloads and stops `Parts`; `serve()` adds the signals."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self._tasks: list[asyncio.Task[object]] = []
        self._reloading: asyncio.Lock | None = None

    async def start(self) -> None:
        """The `before` jobs, then the listeners, then the background jobs; StartError if one
        listener cannot be bound (those opened are closed and the `after` jobs run)."""
        for job in self.parts.before:
            await job()
        started: list[SMTPService] = []
        for service in self.parts.listeners:
            try:
                await service.start()
            except OSError as exc:
                for s in started:
                    await s.stop()
                for job in self.parts.after:
                    await job()
                where = f"{service.stage.name}: " if self.parts.name_listeners else ""
                raise StartError(
                    f"{where}cannot listen on {service.host}:{service.port}: {exc.strerror or exc}"
                ) from None
            started.append(service)
        self._tasks = [asyncio.ensure_future(job()) for job in self.parts.background]

    async def stop(self) -> None:
        """Background jobs cancelled, listeners closed, then the `after` jobs."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for service in self.parts.listeners:
            await service.stop()
        for job in self.parts.after:
            await job()

    async def reload(self) -> None:
        """Every reload job in turn; one that fails is logged and the others still run."""
        if self._reloading is None:
            self._reloading = asyncio.Lock()
        async with self._reloading:
            for what, job in self.parts.reloads:
                try:
                    await job()
                except Exception as exc:  # a bad file must not stop the process
                    log.error("reload: %s refused, keeping the old one: %s", what, exc)

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        hups: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            log.info("SIGHUP: reloading")
            task = loop.create_task(self.reload())
            hups.add(task)
            task.add_done_callback(hups.discard)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            await self.start()
            if ready is not None:
                ready()
            listen.tell_ready()  # a worker: the parent may start the next one
            await stop.wait()
            log.info("stopping")
            await asyncio.gather(*hups, return_exceptions=True)
            await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)


def run(parts: Parts, ready: Callable[[], None] | None = None) -> None:
    """Serve `parts` in a new event loop until a stop signal; StartError when it cannot start."""
    on_loop(Runtime(parts).serve(ready))


def check_loop() -> None:
    """StartError now if POSTE_EVENT_LOOP asks for a loop that cannot run (before a build)."""
    try:
        event_loop.runner()
    except event_loop.EventLoopError as exc:
        raise StartError(str(exc)) from None


T = TypeVar("T")


def on_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run a process's serving coroutine on the event loop POSTE_EVENT_LOOP chooses."""
    try:
        return event_loop.run(main)
    except event_loop.EventLoopError as exc:
        raise StartError(str(exc)) from None
