"""Which event loop a serving process runs on: asyncio's own, or uvloop when asked for.

Why a choice at all: under bench/inbound.sh, uvloop (libuv underneath) took 5-10% off
`poste up`'s CPU per mail, because asyncio's own loop and transports are a fifth of what
is left at 5 KB (docs/performance.md).  Why not the default: it is a compiled extension
outside the standard library, and a different loop is a different program; asyncio's loop
is what every test but the uvloop one runs on.  So it is opt-in, for every serving
command alike (`poste up`, each service, the workers they start): `POSTE_EVENT_LOOP=uvloop`
in the environment (the systemd units' `Environment=`), after `pip install 'poste[uvloop]'`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any

ENV = "POSTE_EVENT_LOOP"
CHOICES = ("asyncio", "uvloop")


class EventLoopError(Exception):
    """The environment asks for a loop this installation cannot run; one line."""


def chosen() -> str:
    """The loop POSTE_EVENT_LOOP names ("asyncio" when unset or empty)."""
    name = os.environ.get(ENV, "").strip().lower() or "asyncio"
    if name not in CHOICES:
        raise EventLoopError(f"{ENV}={name!r}: choose one of {', '.join(CHOICES)}")
    return name


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` to completion on the chosen loop, as asyncio.run does."""
    try:
        name = chosen()
        if name == "uvloop":
            try:
                import uvloop
            except ImportError:
                raise EventLoopError(
                    f"{ENV}=uvloop but uvloop is not installed"
                    " (pip install 'poste[uvloop]')") from None
    except EventLoopError:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    if name == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)
