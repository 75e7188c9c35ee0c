"""`poste srv`: receive N mails and write them as received (blaze's `srv`).

It is a real SMTP server (the same core as every service) whose next hop is
a file: the stand-in mailbox of our tests and a handy tool by hand.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import click

from poste.runtime.hostport import parse_hostport
from poste.runtime.service import setup_logging, tls_context_from
from poste.smtp.server import Limits, SMTPService
from poste.smtp.stage import OK, Envelope, Reply, Stage


def _parse_reply(text: str | None) -> Reply | None:
    if text is None:
        return None
    head, _, rest = text.strip().partition(" ")
    if len(head) != 3 or not head.isdigit() or head[0] not in "2345":
        raise click.BadParameter(f"not an SMTP reply 'CODE text': {text!r}")
    return Reply(int(head), rest or "Refused")


class Mailbox:
    """Where srv puts what it receives: a file, a folder, or stdout."""

    def __init__(self, output: str | None, count: int, with_data: bool) -> None:
        self.output = output
        self.count = count
        self.with_data = with_data
        self.received = 0
        self.done = asyncio.Event()
        self._lock = threading.Lock()  # stores run in threads; names must not collide
        self._next = 1
        if output and output.endswith("/"):
            Path(output).mkdir(parents=True, exist_ok=True)

    def _target(self) -> Path | None:
        if not self.output:
            return None
        if self.output.endswith("/"):
            folder = Path(self.output)
            with self._lock:
                while (folder / f"{self._next}.eml").exists():
                    self._next += 1
                path = folder / f"{self._next}.eml"
                self._next += 1
            return path
        return Path(self.output)

    def store(self, env: Envelope, message: bytes) -> Path | None:
        if self.with_data:
            trace = f"Return-Path: <{env.mail_from}>\r\n".encode("utf-8", "surrogateescape")
            for rcpt in env.rcpt_tos:
                trace += f"Delivered-To: {rcpt}\r\n".encode("utf-8", "surrogateescape")
            message = trace + message
        path = self._target()
        if path is None:
            sys.stdout.buffer.write(message)
            sys.stdout.buffer.flush()
        else:
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "wb") as f:
                f.write(message)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        with self._lock:
            self.received += 1
        rcpts = ",".join(f"<{r}>" for r in env.rcpt_tos)
        click.echo(f"{path or '-'} from=<{env.mail_from}> to={rcpts} size={len(message)}", err=True)
        return path

    def check_done(self) -> None:
        """Called on the event loop (asyncio.Event is not thread-safe)."""
        if self.count and self.received >= self.count:
            self.done.set()


class _MailboxTransaction:
    def __init__(
        self, box: Mailbox, env: Envelope, rcpt_reply: Reply | None, data_reply: Reply | None
    ) -> None:
        self.box = box
        self.env = env
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.rcpts: list[str] = []

    async def mail(self, sender: str, options: list[str]) -> Reply:
        return Reply(250, "2.1.0 Ok")

    async def rcpt(self, rcpt: str, options: list[str]) -> Reply:
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        self.rcpts.append(rcpt)
        return Reply(250, "2.1.5 Ok")

    async def data(self, message: bytes) -> Reply:
        if self.data_reply is not None:
            return self.data_reply
        env = Envelope(mail_from=self.env.mail_from, rcpt_tos=self.rcpts)
        await asyncio.to_thread(self.box.store, env, message)
        self.box.check_done()
        return Reply(250, f"2.0.0 Ok: queued as {self.env.queue_id}")

    async def abort(self) -> None:
        return None


class MailboxHop:
    def __init__(
        self, box: Mailbox, rcpt_reply: Reply | None = None, data_reply: Reply | None = None
    ) -> None:
        self.box = box
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply

    async def open(self, env: Envelope) -> _MailboxTransaction:
        return _MailboxTransaction(self.box, env, self.rcpt_reply, self.data_reply)


@click.command(context_settings={"help_option_names": ["--help"]})
@click.argument("address", default="127.0.0.1:2525", metavar="[ADDR:PORT]")
@click.option(
    "-o",
    "--output",
    default=None,
    metavar="FILE|DIR/",
    help="Write the mail to FILE, or each mail to DIR/N.eml (default: stdout).",
)
@click.option(
    "--count",
    default=1,
    show_default=True,
    type=click.IntRange(min=0),
    help="Exit after this many mails (0: never).",
)
@click.option(
    "--with-data",
    is_flag=True,
    help="Also record the envelope, as Return-Path: and Delivered-To: fields.",
)
@click.option("-k", "--key", type=click.Path(dir_okay=False), help="TLS key: offer STARTTLS.")
@click.option("-c", "--cert", type=click.Path(dir_okay=False), help="TLS certificate.")
@click.option("--hostname", default=None, help="Our name in the banner and in Received:.")
@click.option(
    "--rcpt-reply",
    default=None,
    metavar='"CODE text"',
    help="Answer every RCPT with this reply (to test senders).",
)
@click.option(
    "--data-reply",
    default=None,
    metavar='"CODE text"',
    help="Answer every DATA with this reply instead of storing (to test senders).",
)
@click.option("-v", "--verbose", count=True)
def main(
    address: str,
    output: str | None,
    count: int,
    with_data: bool,
    key: str | None,
    cert: str | None,
    hostname: str | None,
    rcpt_reply: str | None,
    data_reply: str | None,
    verbose: int,
) -> None:
    """Receive mails on ADDR:PORT and write each as received, with our Received: on top."""
    if verbose:
        setup_logging(verbose)
    host, port = parse_hostport(address, 25)
    if output and not output.endswith("/") and count != 1:
        raise click.UsageError("with --count other than 1, -o must be a folder (ending in /)")
    ctx = tls_context_from(cert, key)
    box = Mailbox(output, count, with_data)
    hop = MailboxHop(box, _parse_reply(rcpt_reply), _parse_reply(data_reply))
    service = SMTPService(
        Stage(),
        hop,
        host=host,
        port=port,
        hostname=hostname,
        tls_context=ctx,
        limits=Limits(max_connections=200),
    )

    async def run() -> None:
        try:
            await service.start()
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        click.echo(f"listening on {service.sockname[0]}:{service.sockname[1]}", err=True)
        await box.done.wait()
        # Let the client read our 250 and say QUIT before we go.
        for _ in range(100):
            if not service.connections:
                break
            await asyncio.sleep(0.02)
        await service.stop()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        sys.exit(130)


__all__ = ["OK", "Mailbox", "MailboxHop", "main"]
