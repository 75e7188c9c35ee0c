"""Our MTA-STS policy (RFC 8461) at https://mta-sts.DOMAIN/.well-known/mta-sts.txt.

A few lines of HTTP/1.x on asyncio rather than a web framework: one path,
one small text, GET only.  It serves with the MX listener's own TLS context
(`TLSFiles`: the ACME certificate, whose names then include mta-sts.DOMAIN,
or tls-cert/tls-key), so a renewal reaches it the same way.  Anything but
the policy of one of our domains is 404; a client that sends nothing useful
within 10 s or more than 8 KB of header is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from poste.runtime.run import StartError
from poste.smtp import listen

log = logging.getLogger("poste.verifier.mta_sts")

PATH = "/.well-known/mta-sts.txt"
_HEAD_LIMIT = 8192
_TIMEOUT = 10.0


class PolicyServer:
    """Serves `policy` for every `mta-sts.D` with D in `domains`."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, domains: list[str],
                 policy: str) -> None:
        self.host, self.port, self.ctx = host, port, ctx
        self.names = {f"mta-sts.{d.rstrip('.').lower()}" for d in domains}
        self.policy = policy.encode("ascii")
        self._server: asyncio.Server | None = None

    @property
    def sockname(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[:2]  # type: ignore[no-any-return]

    async def start(self) -> None:
        try:
            shared = listen.inherited(self.host, self.port)  # a worker: the parent's socket
            if shared:
                self._server = await asyncio.start_server(
                    self._serve, sock=shared[0], ssl=self.ctx, ssl_handshake_timeout=_TIMEOUT)
                for extra in shared[1:]:  # one address is what mta-sts-listen names
                    extra.close()
            else:
                self._server = await asyncio.start_server(
                    self._serve, self.host or None, self.port, ssl=self.ctx,
                    ssl_handshake_timeout=_TIMEOUT)
        except OSError as exc:
            raise StartError(f"MTA-STS policy server: cannot listen on {self.host}:{self.port}: "
                             f"{exc.strerror or exc}") from None
        host, port = self.sockname
        log.info("MTA-STS policy (%s) on https://%s:%d%s", ", ".join(sorted(self.names)),
                 host, port, PATH)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _TIMEOUT)
            status, body = self._answer(head)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}"
                "\r\nCache-Control: max-age=300\r\nConnection: close\r\n\r\n".encode("ascii")
                + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, bytes]:
        if len(head) > _HEAD_LIMIT:
            return "431 Request Header Fields Too Large", b""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b""
        host = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "host":
                host = value.strip().lower().rsplit(":", 1)[0] if "]" not in value else ""
        if parts[1] != PATH or host.rstrip(".") not in self.names:
            return "404 Not Found", b"not found\n"
        return "200 OK", self.policy if parts[0] == "GET" else b""
