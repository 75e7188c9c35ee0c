"""A small HTTPS/1.0 client for MTA-STS policies and TLS-RPT reports.

Our own, not `requests`: the host (`mta-sts.DOMAIN`, a report endpoint) must
be resolved through the relay's own resolver (`--nameserver`), the request
must not follow redirects (RFC 8461 3.3), the body is capped, and it runs on
the event loop.  HTTP/1.0 with `Connection: close` keeps the reply to one
body read to end of stream (no chunking).
"""

from __future__ import annotations

import asyncio
import ssl

import dns.asyncresolver
import dns.exception
import dns.resolver


class HTTPSError(Exception):
    """The request failed: the text says how (for logs and TLS-RPT's additional-information)."""

    def __init__(self, text: str, *, tls: bool = False) -> None:
        super().__init__(text)
        self.tls = tls  # the certificate was refused (sts-webpki-invalid)


async def _addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    found: list[str] = []
    for kind in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(host, kind)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as exc:
            raise HTTPSError(f"DNS lookup of {host} failed: {type(exc).__name__}") from None
        found.extend(r.to_text() for r in answer)
    if not found:
        raise HTTPSError(f"{host} has no address")
    return found


async def request(
    resolver: dns.asyncresolver.Resolver,
    ctx: ssl.SSLContext,
    host: str,
    path: str,
    *,
    port: int = 443,
    method: str = "GET",
    body: bytes = b"",
    content_type: str = "",
    limit: int = 64 * 1024,
    timeout: float = 60.0,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers in lower case, body) of one request to `https://host:port/path`."""
    last: HTTPSError | None = None
    for addr in await _addresses(resolver, host):
        try:
            return await asyncio.wait_for(
                _one(addr, ctx, host, path, port, method, body, content_type, limit), timeout)
        except ssl.SSLCertVerificationError as exc:
            last = HTTPSError(f"certificate of {host} refused: {exc.verify_message}", tls=True)
        except TimeoutError:
            last = HTTPSError(f"{host} [{addr}]: timed out")
        except (OSError, ssl.SSLError) as exc:
            last = HTTPSError(f"{host} [{addr}]: {exc}")
    assert last is not None
    raise last


async def _one(
    addr: str, ctx: ssl.SSLContext, host: str, path: str, port: int, method: str,
    body: bytes, content_type: str, limit: int,
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(addr, port, ssl=ctx, server_hostname=host)
    try:
        head = [f"{method} {path} HTTP/1.0", f"Host: {host}", "User-Agent: poste",
                "Connection: close"]
        if method != "GET":
            head += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body)
        await writer.drain()
        data = b""
        while len(data) <= limit + 16 * 1024:  # the header fields count too
            piece = await reader.read(65536)
            if not piece:
                break
            data += piece
        else:
            raise HTTPSError(f"{host}: reply larger than {limit} bytes")
    finally:
        writer.close()
    top, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        raise HTTPSError(f"{host}: not an HTTP reply")
    lines = top.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise HTTPSError(f"{host}: not an HTTP reply")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if len(rest) > limit:
        raise HTTPSError(f"{host}: reply larger than {limit} bytes")
    return int(parts[1]), headers, rest
