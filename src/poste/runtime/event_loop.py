"""Which event loop a serving process runs on: uvloop by default, asyncio's own as the opt-out.

Why uvloop: at 5 KB, once the per-mail work was cut, asyncio's own loop and transports
are about a fifth of what `poste up` spends (docs/performance.md, the profiles of issue
16); uvloop does that work in C (libuv).  Measured with bench/inbound.sh (`up --workers 2`,
5 KB, 10 sessions, 3 interleaved rounds against Postfix + policyd-spf + OpenDKIM on the
same machine): on asyncio's loop poste delivered 0.88, 0.98 and 1.03x Postfix's rate in
three runs, at 0.94-1.06x its CPU per mail; on uvloop 1.10 and 1.20x in two runs, at 0.91
and 0.83x the CPU, in every round.  That is the issue's goal held, or missed, by the loop
alone, so the faster loop is what every install runs: uvloop is a dependency (a wheel for
every CPython and Linux poste supports, locked with its hashes in requirements.lock), and
the test suite runs on it.

Why the choice is still there: a different loop is a different program.  With
`POSTE_EVENT_LOOP=asyncio` (the systemd units' `Environment=`, or a drop-in) a process
runs on asyncio's own loop, which tests/test_loop_up.py keeps proven end to end; that is
the way out should uvloop misbehave somewhere.  It holds for every process alike: `poste
up`, each service, the `--workers` parent and the workers it starts (they inherit the
environment).  An install without uvloop (pip with `--no-deps`, a platform with no wheel)
runs on asyncio, saying so in one log line; asking for uvloop there by name is a one-line
error, as is a name that is neither.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

ENV = "POSTE_EVENT_LOOP"
CHOICES = ("uvloop", "asyncio")
DEFAULT = "uvloop"

log = logging.getLogger("poste.event_loop")

T = TypeVar("T")


class EventLoopError(Exception):
    """The environment asks for a loop this installation cannot run; one line."""


def chosen() -> str | None:
    """The loop POSTE_EVENT_LOOP names, or None when it is unset or empty (the default)."""
    name = os.environ.get(ENV, "").strip().lower()
    if name and name not in CHOICES:
        raise EventLoopError(f"{ENV}={name!r}: choose one of {', '.join(CHOICES)}")
    return name or None


def _uvloop_run() -> Any | None:
    """uvloop.run, or None when uvloop cannot be imported."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.run


def runner() -> Any | None:
    """uvloop.run when the process is to run on uvloop, None for asyncio's own loop;
    EventLoopError when the environment asks for what cannot run.  Commands call it
    before they build anything, so a bad value is said before any work is done."""
    name = chosen()
    uv_run = None if name == "asyncio" else _uvloop_run()
    if name == "uvloop" and uv_run is None:
        raise EventLoopError(f"{ENV}=uvloop but uvloop is not installed"
                             f" (pip install uvloop, or {ENV}=asyncio)")
    return uv_run


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on the chosen loop, as asyncio.run does; its result."""
    try:
        uv_run = runner()
    except EventLoopError:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    if uv_run is not None:
        result: T = uv_run(main)
        return result
    if chosen() is None:
        log.info("uvloop is not installed: running on asyncio's own event loop")
    return asyncio.run(main)
