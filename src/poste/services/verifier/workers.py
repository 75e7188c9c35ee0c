"""The thread pool where SPF, DKIM and DMARC work runs, off the event loop.

A dedicated pool rather than asyncio's default one (a handful of threads on
a small VPS): checks that wait on a slow DNS server must not hold up the
checks of other sessions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POOL = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="poste-auth")


async def run(fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(POOL, fn)
