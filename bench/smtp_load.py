"""smtp_load.py -- an authenticating SMTP load generator for bench/outbound.sh.

Postfix's smtp-source cannot AUTH, and a submission server refuses mail before it, so the
outbound bench sends with this instead, to poste and to Postfix alike: the same client, the
same TLS library, the same bytes, so neither side is measured against a faster client.

N mails over S concurrent sessions, M mails per session (smtp-source's -m, -s and, for M,
its -r): each session connects, EHLO, STARTTLS (or TLS from the first byte, port 465
style), EHLO again, AUTH PLAIN, then M transactions (MAIL, RCPT, DATA: no pipelining,
as a mail client sends), QUIT. The message file is sent as it is (LF turned into CRLF,
dot-stuffed), once per mail. Certificates are not verified: the bench's servers use a
throwaway self-signed one.

It prints one line, `sent=N refused=R seconds=T msg_per_s=X sessions=S per_session=M`,
and exits 1 if any reply was not the expected one (the first such reply goes to stderr),
2 on bad arguments.

    .venv/bin/python bench/smtp_load.py --server 127.0.0.2:2587 --tls starttls \
        --login alice@out.example.net --password-file pw -f alice@out.example.net \
        -t rcpt@example.net -n 1000 -s 10 -m 20 msg.eml
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path


class Refused(Exception):
    """A reply other than the one the dialogue expects."""


@dataclass
class Job:
    host: str
    port: int
    implicit_tls: bool
    helo: str
    auth: bytes  # the base64 AUTH PLAIN response
    sender: str
    rcpt: str
    data: bytes  # CRLF, dot-stuffed, with the final ".\r\n"
    per_session: int
    context: ssl.SSLContext


def wire(message: bytes) -> bytes:
    """The message as DATA sends it: CRLF line ends, leading dots doubled, the end mark."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


async def reply(reader: asyncio.StreamReader, want: str) -> None:
    """Read one (multi-line) reply; raise Refused unless its code starts with `want`."""
    while True:
        line = await reader.readline()
        if not line:
            raise Refused("connection closed")
        if line[3:4] != b"-":
            break
    if not line.startswith(want.encode()):
        raise Refused(line.decode(errors="replace").rstrip())


async def session(job: Job, count: int, source: str | None) -> None:
    """One SMTP session delivering `count` mails from address `source` (None: the
    system's choice); raises Refused on the first odd reply."""
    ctx = job.context if job.implicit_tls else None
    local = (source, 0) if source else None
    reader, writer = await asyncio.open_connection(job.host, job.port, ssl=ctx, local_addr=local)
    try:
        await reply(reader, "220")
        writer.write(f"EHLO {job.helo}\r\n".encode())
        await reply(reader, "250")
        if not job.implicit_tls:
            writer.write(b"STARTTLS\r\n")
            await reply(reader, "220")
            await writer.start_tls(job.context)
            writer.write(f"EHLO {job.helo}\r\n".encode())
            await reply(reader, "250")
        writer.write(b"AUTH PLAIN " + job.auth + b"\r\n")
        await reply(reader, "235")
        for _ in range(count):
            writer.write(f"MAIL FROM:<{job.sender}>\r\n".encode())
            await reply(reader, "250")
            writer.write(f"RCPT TO:<{job.rcpt}>\r\n".encode())
            await reply(reader, "250")
            writer.write(b"DATA\r\n")
            await reply(reader, "354")
            writer.write(job.data)
            await reply(reader, "250")
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(Refused, ConnectionError):
            await reply(reader, "221")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def run(job: Job, total: int, sessions: int, source_net: str | None) -> tuple[int, int]:
    """Send `total` mails over `sessions` concurrent workers, worker i from
    `source_net`.(i+1) when given; (sent, refused)."""
    left = total
    sent = refused = 0
    first_error: list[str] = []

    async def worker(i: int) -> None:
        nonlocal left, sent, refused
        source = f"{source_net}.{i + 1}" if source_net else None
        while left > 0:
            count = min(job.per_session, left)
            left -= count
            try:
                await session(job, count, source)
                sent += count
            except (Refused, OSError, ssl.SSLError) as e:
                refused += count
                if not first_error:
                    first_error.append(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(worker(i) for i in range(sessions)))
    if first_error:
        print(f"smtp_load: first failure: {first_error[0]}", file=sys.stderr)
    return sent, refused


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("message", type=Path, help="The message file (LF or CRLF).")
    p.add_argument("--server", required=True, metavar="HOST:PORT")
    p.add_argument("--tls", choices=("starttls", "implicit"), default="starttls")
    p.add_argument("--login", required=True)
    p.add_argument("--password-file", type=Path, required=True,
                   help="First line: the password (kept out of the process list).")
    p.add_argument("-f", "--sender", required=True)
    p.add_argument("-t", "--rcpt", required=True)
    p.add_argument("-n", "--count", type=int, default=1, help="Mails in all.")
    p.add_argument("-s", "--sessions", type=int, default=1, help="Sessions at once.")
    p.add_argument("-m", "--per-session", type=int, default=1, help="Mails per session.")
    p.add_argument("--helo", default="client.example.net")
    p.add_argument("--source-net", metavar="A.B.C",
                   help="Session i connects from A.B.C.(i+1) (e.g. 127.0.1 on loopback): one"
                        " address per client, as users' mail clients are; a submission"
                        " server checks one login per address at a time.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    host, _, port = a.server.rpartition(":")
    try:
        if not host or not port.isdigit():
            raise ValueError(f"--server {a.server!r} is not HOST:PORT")
        if min(a.count, a.sessions, a.per_session) < 1:
            raise ValueError("-n, -s and -m must be at least 1")
        if a.source_net and a.sessions > 254:
            raise ValueError("--source-net: at most 254 sessions")
        password = a.password_file.read_text().splitlines()[0]
        data = wire(a.message.read_bytes())
    except (ValueError, OSError, IndexError) as e:
        print(f"smtp_load: {e}", file=sys.stderr)
        return 2
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    auth = base64.b64encode(f"\0{a.login}\0{password}".encode())
    job = Job(host, int(port), a.tls == "implicit", a.helo, auth, a.sender, a.rcpt, data,
              a.per_session, ctx)
    t0 = time.monotonic()
    sent, refused = asyncio.run(run(job, a.count, min(a.sessions, a.count), a.source_net))
    dt = time.monotonic() - t0
    print(f"sent={sent} refused={refused} seconds={dt:.3f} msg_per_s={sent / dt:.1f}"
          f" sessions={a.sessions} per_session={a.per_session}")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
