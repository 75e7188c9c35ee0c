"""One client cannot take a service from the others (issue 15, items 3 and 4).

Real processes on loopback: `poste forward` (the same listener and default
limits as every service) and `poste submission` for the implicit-TLS port.
Attackers and the legitimate client use source addresses of their own in
different /24s of 127.0.0.0/8, as separate hosts on the Internet would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from poste.smtp.tls import self_signed
from support.net import free_port, wait_port
from support.relay_env import Srv

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
FLOODER, SLOWLORIS, CLIENT = "127.0.1.1", "127.0.2.1", "127.0.3.1"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def process(args: list[str], log: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=fh, start_new_session=True)
    try:
        wait_port(HOST, port, timeout=30)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def deliver_once(port: int, i: int) -> float:
    start = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(CLIENT, 0))

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line or line[3:4] != b"-":
                return line

    try:
        assert (await reply()).startswith(b"220")
        for cmd, want in ((b"EHLO client.test", b"250"), (b"MAIL FROM:<a@client.test>", b"250"),
                          (b"RCPT TO:<b@dest.test>", b"250"), (b"DATA", b"354"),
                          (f"Subject: legit {i}\r\n\r\nhello\r\n.".encode(), b"250")):
            writer.write(cmd + b"\r\n")
            r = await reply()
            assert r.startswith(want), (cmd, r)
        writer.write(b"QUIT\r\n")
        return time.monotonic() - start
    finally:
        writer.close()


async def twenty_mails(port: int) -> list[float]:
    times = []
    for i in range(20):
        times.append(await asyncio.wait_for(deliver_once(port, i), 10))
        await asyncio.sleep(0.2)
    return times


def under_attack(port: int, log: Path) -> list[float]:
    """The attackers run in a process of their own, as they would on their own hosts."""
    attackers = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "support" / "attackers.py"),
         HOST, str(port), FLOODER, SLOWLORIS], start_new_session=True)
    try:
        # Let the flood reach the listener: until the listener refuses the flooder (its
        # log line), not a fixed 3 s.
        deadline = time.monotonic() + 30
        while f"too many connections from {FLOODER}" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the flood never reached the listener"
            time.sleep(0.05)
        return asyncio.run(twenty_mails(port))
    finally:
        attackers.terminate()
        attackers.wait(10)


def test_flood_and_slowloris_do_not_keep_a_client_out(tmp_path: Path, poste_bin: str) -> None:
    dest = free_port(HOST)
    sink = Srv(poste_bin, HOST, dest, tmp_path / "box").start()
    port = free_port(HOST)
    try:
        with process([poste_bin, "forward", "--listen", f"{HOST}:{port}",
                      "--destination", f"{HOST}:{dest}"], tmp_path / "forward.log", port):
            times = under_attack(port, tmp_path / "forward.log")
        got = sink.wait(20, timeout=30)
    finally:
        sink.stop()
    report = (f"legitimate client, 20 mails under attack: min {min(times):.3f} s, "
              f"median {statistics.median(times):.3f} s, max {max(times):.3f} s")
    print(report)
    assert max(times) < 2.0, report
    assert len(got) == 20
    log = (tmp_path / "forward.log").read_text()
    assert f"too many connections from {FLOODER}" in log


async def no_hello(port: int, sources: list[str], n: int) -> tuple[list[asyncio.StreamReader],
                                                                    list[asyncio.StreamWriter]]:
    readers, writers = [], []
    for i in range(n):
        r, w = await asyncio.open_connection(HOST, port, local_addr=(sources[i % len(sources)], 0))
        readers.append(r)
        writers.append(w)
    return readers, writers


async def all_closed(readers: list[asyncio.StreamReader], timeout: float) -> float:
    start = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(r.read() for r in readers)), timeout)
    return time.monotonic() - start


def test_silent_tls_clients_cost_little_and_are_cut(tmp_path: Path, poste_bin: str) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed(cert, key, "mail.our.test")
    users = tmp_path / "users"
    subprocess.run([poste_bin, "users", "add", "alice", "--repo", str(users), "--target",
                    "alice@dest.test", "--no-password"], check=True, capture_output=True)
    port = free_port(HOST)
    args = [poste_bin, "submission", "--domain", "our.test", "--destination", "127.0.0.1:1",
            "--users", str(users), "--tls-cert", str(cert), "--tls-key", str(key),
            "--listen-tls", f"{HOST}:{port}"]
    # 1,000 raw TCP connections that never send a ClientHello, from 100 addresses.
    sources = [f"127.0.{10 + i // 10}.{1 + i % 10}" for i in range(100)]
    with process(args, tmp_path / "submission.log", port) as proc:
        time.sleep(1)
        before = rss_kib(proc.pid)

        async def run() -> tuple[int, float]:
            readers, writers = await no_hello(port, sources, 1000)
            await asyncio.sleep(2)
            peak = rss_kib(proc.pid)
            took = await all_closed(readers, 12)
            for w in writers:
                w.close()
            return peak, took

        peak, took = asyncio.run(run())
        # and a real client gets its greeting over TLS afterwards
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection((HOST, port), timeout=10,
                                      source_address=(CLIENT, 0)) as raw, \
                ctx.wrap_socket(raw) as tls:
            assert tls.recv(100).startswith(b"220")
    growth_mib = (peak - before) / 1024
    print(f"RSS {before / 1024:.1f} MiB -> {peak / 1024:.1f} MiB with 1,000 silent "
          f"connections (+{growth_mib:.1f} MiB); all closed after {took:.1f} s")
    assert growth_mib < 50
    assert took <= 11.0
