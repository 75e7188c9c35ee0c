"""What `poste srv` writes mail into: a file, a folder or stdout, as an SMTP hop.

A real SMTP server (the same core as every service) whose next hop is a
file: the stand-in mailbox of our tests and of the `poste up` demo.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

from poste.smtp.message import Message
from poste.smtp.replies import OK
from poste.smtp.stage import Envelope, Reply


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

    def store(self, env: Envelope, message: Message) -> Path | None:
        if self.with_data:
            trace = f"Return-Path: <{env.mail_from}>\r\n".encode("utf-8", "surrogateescape")
            for rcpt in env.rcpt_tos:
                trace += f"Delivered-To: {rcpt}\r\n".encode("utf-8", "surrogateescape")
            message = message.prepend(trace)
        path = self._target()
        if path is None:
            sys.stdout.buffer.writelines(message.chunks())
            sys.stdout.buffer.flush()
        else:
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "wb") as f:
                f.writelines(message.chunks())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        with self._lock:
            self.received += 1
        rcpts = ",".join(f"<{r}>" for r in env.rcpt_tos)
        print(f"{path or '-'} from=<{env.mail_from}> to={rcpts} size={message.size}", file=sys.stderr)
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

    async def data(self, message: Message) -> Reply:
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


__all__ = ["OK", "Mailbox", "MailboxHop"]
