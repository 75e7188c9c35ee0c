"""The relay's two thread pools: mail arriving in the spool, and mail leaving it.

Measured (issue 16): with 50 sessions sending, arrivals' spool writes (each two
fsyncs) filled asyncio's default pool, which the scheduler's own spool work
(reading an envelope, opening the message, writing the outcome) shares with
every other `to_thread` of the process; delivery fell to 27 msg/s while mail
came in and the spool grew to 3,300 mails.  Separate pools keep the two sides
from waiting on each other: delivery drains as fast as it can while arrivals
get their 250s, and each side's threads are bounded on their own.

Process-wide, as the verifier's `workers.POOL`: threads start on demand and a
process has one spool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Writes of arriving mail (Spool.put): the wait behind each 250.
ARRIVALS = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="relay-in")
# The scheduler's side: listing (rescan), loading, updating, removing envelopes.
DEPARTURES = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="relay-out")


async def arriving(fn: Callable[..., T], *args: object) -> T:
    """Run blocking spool work for a mail being received."""
    return await asyncio.get_running_loop().run_in_executor(ARRIVALS, functools.partial(fn, *args))


async def departing(fn: Callable[..., T], *args: object) -> T:
    """Run blocking spool work for delivery (the scheduler)."""
    return await asyncio.get_running_loop().run_in_executor(
        DEPARTURES, functools.partial(fn, *args))
