"""The HTTP-01 responder (RFC 8555 8.3): for a domain whose DNS takes no UPDATE.

The CA fetches `http://NAME/.well-known/acme-challenge/TOKEN` on port 80 of
each name and expects the key authorization back.  The responder listens
only while an order waits for its validation (a `poste up` does not keep port
80 open between renewals), answers those paths and nothing else (404), and
reads one request line per connection: it has no other job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

log = logging.getLogger("poste.cert")

PREFIX = "/.well-known/acme-challenge/"


class ResponderError(Exception):
    """The responder cannot listen (one line)."""


@dataclass
class HTTP01:
    """Where to listen, and the key authorizations to hand out by token."""

    host: str
    port: int
    tokens: dict[str, str] = field(default_factory=dict)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)).strip():
                pass  # the headers: nothing in them matters
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 and parts[0] in ("GET", "HEAD") else ""
            answer = self.tokens.get(path[len(PREFIX):]) if path.startswith(PREFIX) else None
            body = (answer or "not found\n").encode()
            status = "200 OK" if answer else "404 Not Found"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + (body if parts[:1] != ["HEAD"] else b""))
            await writer.drain()
        except (OSError, TimeoutError, UnicodeError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Listen for the duration of the block."""
        try:
            server = await asyncio.start_server(self._handle, self.host, self.port,
                                                reuse_address=True)
        except OSError as exc:
            raise ResponderError(f"HTTP-01: cannot listen on {self.host}:{self.port}:"
                                 f" {exc.strerror or exc}") from None
        log.info("cert: HTTP-01 responder on %s:%d", self.host, self.port)
        try:
            yield
        finally:
            server.close()
            await server.wait_closed()
