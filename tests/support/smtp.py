"""In-process SMTP services and a raw line client for protocol tests."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from poste.smtp.hop import Hop
from poste.smtp.server import Limits, SMTPService
from poste.smtp.stage import Stage
from poste.tools.srv import Mailbox, MailboxHop


@asynccontextmanager
async def running(
    stage: Stage,
    hop: Hop,
    host: str = "127.0.0.1",
    **kwargs: object,
) -> AsyncIterator[SMTPService]:
    service = SMTPService(stage, hop, host=host, port=0, hostname="test.poste", **kwargs)  # type: ignore[arg-type]
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@asynccontextmanager
async def mailbox_server(
    folder: Path, host: str = "127.0.0.1", limits: Limits | None = None, **kwargs: object
) -> AsyncIterator[tuple[SMTPService, Mailbox]]:
    box = Mailbox(str(folder) + "/", 0, with_data=True)
    async with running(Stage(), MailboxHop(box), host, limits=limits, **kwargs) as service:
        yield service, box


class LineClient:
    """A raw SMTP client: sends exact bytes, reads replies (multi-line aware)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> LineClient:
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        return client

    async def reply(self, timeout: float = 10.0) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("closed: " + "".join(lines))
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply()

    async def cmd_bytes(self, line: bytes) -> str:
        """One command line of exact bytes (raw CR, NUL, 8-bit...), then its reply."""
        await self.send(line + b"\r\n")
        return await self.reply()

    async def starttls(self, ctx: ssl.SSLContext | None = None) -> None:
        if ctx is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        await self.writer.start_tls(ctx)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except Exception:
            pass
