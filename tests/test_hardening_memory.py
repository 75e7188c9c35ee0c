"""Bounded memory per mail (issue 15, item 6), measured on the real processes.

30 clients, each from an address of its own, send a 24 MB mail at the same
time, slowly, to a forwarded user, through the receiving path in both
topologies. Every poste process must stay under 500 MB of resident memory at
its peak (the kernel's high-water mark, VmHWM), give memory back to within
100 MB of where it started, and every mail must arrive whole. One mail in five
carries a valid DKIM signature, so the checks that need the whole mail (dkimpy)
run on some of them at once. Before this, 30 such mails drove the verifier to
4.95 GB.

POSTE_MEMORY_MAILS and POSTE_MEMORY_MB change the load (for a run by hand).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from poste.dkim.keys import load_key
from support.loop_world import World, inbound
from support.smtp import LineClient

pytestmark = pytest.mark.slow

MAILS = int(os.environ.get("POSTE_MEMORY_MAILS", "30"))
SIZE = int(os.environ.get("POSTE_MEMORY_MB", "24")) * 1024 * 1024
PEAK_LIMIT_MB = 500
RETURN_LIMIT_MB = 100
LINE = b"M" * 996 + b"\r\n"  # long lines: the test measures memory, not the line loop
PIECE = LINE * 256  # what a client writes at a time (255 KB)
PACE = 0.02  # seconds between pieces: slow enough that all mails are in DATA at once


def status_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} for {pid}")


def simple_signature(world: World, head: bytes, body: bytes) -> bytes:
    """A DKIM-Signature (c=simple/simple, h=from) made with hashlib and `cryptography`:
    dkimpy needs 12 s to sign 24 MB, and the test only needs one valid signature."""
    key = load_key(world.dkim_key).private
    assert isinstance(key, rsa.RSAPrivateKey)
    bh = base64.b64encode(hashlib.sha256(body).digest()).decode()
    value = (f" v=1; a=rsa-sha256; c=simple/simple; d=x25519.test; s=poste; h=from; "
             f"bh={bh}; b=")
    from_field = next(f for f in head.split(b"\r\n") if f.lower().startswith(b"from:"))
    signed = from_field + b"\r\n" + b"DKIM-Signature:" + value.encode()
    b = base64.b64encode(key.sign(signed, padding.PKCS1v15(), hashes.SHA256())).decode()
    return b"DKIM-Signature:" + value.encode() + b.encode() + b"\r\n"


async def slow_mail(world: World, entry: tuple[str, int], i: int, body: bytes) -> str:
    source = f"127.0.{100 + i}.1"  # a /24 of its own: the fair shares are not what is tested
    reader, writer = await asyncio.open_connection(*entry, local_addr=(source, 0))
    c = LineClient(reader, writer)
    try:
        assert (await c.reply(timeout=30)).startswith("220")
        assert (await c.cmd("EHLO big.client.test")).startswith("250")
        assert (await c.cmd(f"MAIL FROM:<big{i}@gmail.test> SIZE={SIZE}")).startswith("250")
        assert (await c.cmd("RCPT TO:<login@x25519.test>")).startswith("250")
        assert (await c.cmd("DATA")).startswith("354")
        head = (b"From: Big <big@x25519.test>\r\nTo: login@x25519.test\r\n"
                b"Subject: big %d\r\n" % i)
        if i % 5 == 0:
            head = simple_signature(world, head, body) + head
        await c.send(head + b"\r\n")
        for start in range(0, len(body), len(PIECE)):
            await c.send(body[start:start + len(PIECE)])
            await asyncio.sleep(PACE)
        await c.send(b".\r\n")
        reply = await c.reply(timeout=600)
        await c.cmd("QUIT")
        return reply
    finally:
        await c.close()


@pytest.fixture(params=["separate", "up"])
def stack(request: pytest.FixtureRequest, tmp_path: Path,
          poste_bin: str) -> Iterator[tuple[World, tuple[str, int]]]:
    with inbound(tmp_path, poste_bin, request.param) as both:
        yield both


def test_thirty_big_slow_mails_in_bounded_memory(stack: tuple[World, tuple[str, int]]) -> None:
    world, entry = stack
    pids = {name: p.pid for name, p in world.by_name.items()}
    before = {name: status_mib(pid, "VmRSS") for name, pid in pids.items()}
    body = PIECE * (SIZE // len(PIECE))

    async def all_mails() -> list[str]:
        return await asyncio.gather(*(slow_mail(world, entry, i, body) for i in range(MAILS)))

    started = time.monotonic()
    replies = asyncio.run(all_mails())
    assert all(r.startswith("250") for r in replies), replies
    try:
        got = world.gmail.wait(MAILS, timeout=600)
    except TimeoutError:
        raise AssertionError(world.logs()) from None
    took = time.monotonic() - started
    for mail in got:
        assert mail.endswith(b"\r\n\r\n" + body), "a mail arrived cut or changed"
    signed = [m for m in got if b"\r\nDKIM-Signature:" in m.split(b"\r\n\r\n", 1)[0]]
    assert len(signed) == len(range(0, MAILS, 5))
    assert all(b"dkim=pass" in m.split(b"\r\n\r\n", 1)[0] for m in signed), (
        "the whole-mail check did not run on the signed mails")
    # Memory comes back within seconds of the last big mail (the services trim their
    # heaps after a quiet moment): wait for it, up to 20 s.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(
            status_mib(pid, "VmRSS") - before[name] >= RETURN_LIMIT_MB
            for name, pid in pids.items()):
        time.sleep(0.5)
    report = []
    for name, pid in pids.items():
        peak = status_mib(pid, "VmHWM")
        after = status_mib(pid, "VmRSS")
        report.append(f"{name}: {before[name]:.0f} MB -> peak {peak:.0f} MB -> {after:.0f} MB")
        assert peak < PEAK_LIMIT_MB, report
        assert after - before[name] < RETURN_LIMIT_MB, report
    print(f"{MAILS} x {SIZE >> 20} MB in {took:.0f} s; " + "; ".join(report))
