"""Attackers for tests/test_hardening_fairness.py, run as a process of their own.

python attackers.py HOST PORT FLOODER_IP SLOWLORIS_IP: one address keeps
trying to hold 1,000 connections (reconnecting as the server closes them),
another holds 30 connections that each send one byte every half second.
Runs until terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def flood(host: str, port: int, src: str) -> None:
    """1,000 connections from one address, each reopened as soon as the server closes it."""

    async def one() -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, port, local_addr=(src, 0))
            except OSError:
                await asyncio.sleep(0.05)
                continue
            with contextlib.suppress(OSError):
                await reader.read()  # held until the server closes it
            writer.close()
            await asyncio.sleep(0.05)

    await asyncio.gather(*(one() for _ in range(1000)))


async def slowloris(host: str, port: int, src: str) -> None:
    """Connections that send one byte of a command every half second, forever."""
    conns = []
    for _ in range(30):
        with contextlib.suppress(OSError):
            conns.append(await asyncio.open_connection(host, port, local_addr=(src, 0)))
    while True:
        for _, writer in conns:
            with contextlib.suppress(OSError):
                writer.write(b"E")
        await asyncio.sleep(0.5)


async def main() -> None:
    host, port, flooder, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    await asyncio.gather(flood(host, port, flooder), slowloris(host, port, slow))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
