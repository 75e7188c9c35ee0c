"""How much a poste hop costs: mails/s straight into a mailbox vs through `forward` hops.

Run by hand: `.venv/bin/python bench/smtp_forward.py [N] [HOPS]`.  Prints mails per second of
each topology and the ratio to the direct run, measured in the same process.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time

from poste.smtp.client import SMTPHop, send_message
from poste.smtp.server import SMTPService
from poste.smtp.stage import Stage
from poste.tools.srv import Mailbox, MailboxHop

MESSAGE = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: bench\r\n\r\n" + b"line of text\r\n" * 200


async def run(n: int, hops: int, concurrency: int = 8) -> float:
    with tempfile.TemporaryDirectory() as folder:
        box = Mailbox(folder + "/", 0, False)
        sink = SMTPService(Stage(), MailboxHop(box), host="127.0.0.1", port=0, hostname="sink")
        await sink.start()
        services = [sink]
        target = sink.sockname
        for i in range(hops):
            svc = SMTPService(Stage(), SMTPHop(*target), host="127.0.0.1", port=0, hostname=f"hop{i}")
            await svc.start()
            services.append(svc)
            target = svc.sockname
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                result = await send_message(*target, "a@x.test", ["b@y.test"], MESSAGE)
                assert result.data_reply is not None and result.data_reply.ok

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        elapsed = time.perf_counter() - t0
        for svc in services:
            await svc.stop()
        return n / elapsed


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    max_hops = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    base = asyncio.run(run(n, 0))
    print(f"{'topology':<28}{'mails/s':>10}{'ratio':>8}")
    print(f"{'direct to mailbox':<28}{base:>10.1f}{1.0:>8.2f}")
    for hops in range(1, max_hops + 1):
        rate = asyncio.run(run(n, hops))
        print(f"{f'through {hops} forward hop(s)':<28}{rate:>10.1f}{rate / base:>8.2f}")


if __name__ == "__main__":
    main()
