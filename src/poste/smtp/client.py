"""The SMTP client side: a hop to `--destination`, and a one-shot sender for the tools.

Built on aiosmtplib.  Replies of the next hop are passed back as they are
(code and text), so a 5xx downstream becomes a 5xx to our client and a
4xx a 4xx; a hop we cannot reach or that breaks mid-way is a 451.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib

from poste.smtp import replies as R
from poste.smtp.address import AddressError, smtp_path
from poste.smtp.hop import HopError
from poste.smtp.message import Message
from poste.smtp.stage import Envelope, Reply
from poste.smtp.tls import client_context

log = logging.getLogger("poste.smtp")

# MAIL parameters we may pass on, when the next hop supports them.
_PASSABLE = ("BODY=", "SMTPUTF8", "SIZE=")


def _reply(code: int, message: str) -> Reply:
    return Reply(code, " ".join(message.split("\n")) if message else "")


async def mail_from(
    client: aiosmtplib.SMTP, sender: str, options: Sequence[str] = ()
) -> aiosmtplib.SMTPResponse:
    """MAIL FROM with the address byte for byte (aiosmtplib's own `mail` re-parses it).

    Raises aiosmtplib.SMTPSenderRefused on a refusal, as aiosmtplib does, and
    AddressError for an address no SMTP server may be sent.
    """
    response = await client.execute_command(
        b"MAIL", b"FROM:" + smtp_path(sender), *(o.encode("ascii") for o in options)
    )
    if response.code != 250:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)
    return response


async def rcpt_to(
    client: aiosmtplib.SMTP, recipient: str, options: Sequence[str] = ()
) -> aiosmtplib.SMTPResponse:
    """RCPT TO with the address byte for byte; SMTPRecipientRefused unless 250/251."""
    response = await client.execute_command(
        b"RCPT", b"TO:" + smtp_path(recipient), *(o.encode("ascii") for o in options)
    )
    if response.code not in (250, 251):
        raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)
    return response


async def send_data(
    client: aiosmtplib.SMTP, message: Message, timeout: float | None = None
) -> aiosmtplib.SMTPResponse:
    """DATA, the mail written piece by piece as fast as the socket takes it, and the reply.

    Why not aiosmtplib's `data()`: it takes the whole mail as one bytes,
    makes two more copies of it (line ends, dot-stuffing) and writes all of
    it to the transport at once, 72 MB of memory per hop for a 24 MB mail.
    This is its `execute_data_command` with the same wire bytes, written in
    pieces that start at line starts (so stuffing each piece stuffs the
    whole) with the protocol's flow control in between.  It uses that
    protocol's internals (the command lock, the reply flag), so aiosmtplib
    is pinned in the locks.  Raises what `data()` raises.
    """
    protocol = client.protocol
    if protocol is None or protocol._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    if timeout is None:
        timeout = client.timeout
    try:
        async with protocol._command_lock:
            protocol._response_pending = True
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=timeout)
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            last = b"\n"
            for piece in message.wire_chunks():
                protocol.write(piece)
                last = piece[-1:]
                await protocol._drain_helper()
            protocol._response_pending = True
            protocol.write(b".\r\n" if last == b"\n" else b"\r\n.\r\n")
            response = await protocol.read_response(timeout=timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, ConnectionError):
        client.close()
        raise
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


@functools.cache
def _fqdn() -> str:
    """socket.getfqdn() may query DNS: once per process is enough."""
    return socket.getfqdn()


def _nodelay(client: aiosmtplib.SMTP) -> None:
    transport = getattr(client, "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def new_client(
    host: str,
    port: int,
    *,
    helo: str | None = None,
    implicit_tls: bool = False,
    tls_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
    source_address: str | None = None,
) -> aiosmtplib.SMTP:
    """The one way poste makes an SMTP client (hops, the relay's delivery, the tools).

    A `host` that is an absolute path is a unix socket (`unix:PATH` in the settings).
    """
    unix = host.startswith("/")
    return aiosmtplib.SMTP(
        hostname=None if unix else host,
        port=None if unix else port,
        socket_path=host if unix else None,
        local_hostname=helo or _fqdn(),
        use_tls=implicit_tls,
        start_tls=False,
        tls_context=tls_context or client_context(),
        timeout=timeout,
        source_address=(source_address, 0) if source_address else None,
    )


async def dial(client: aiosmtplib.SMTP, timeout: float | None = None) -> None:
    """Connect (within `timeout`, else the client's) with TCP_NODELAY: no Nagle stalls."""
    if timeout is None:
        await client.connect()
    else:
        await client.connect(timeout=timeout)
    _nodelay(client)


async def connect(
    host: str,
    port: int,
    *,
    helo: str | None = None,
    starttls: bool | None = None,
    implicit_tls: bool = False,
    tls_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
    source_address: str | None = None,
) -> aiosmtplib.SMTP:
    """Connect and greet; STARTTLS when `starttls` is True, or when offered if None."""
    ctx = tls_context or client_context()
    client = new_client(host, port, helo=helo, implicit_tls=implicit_tls, tls_context=ctx,
                        timeout=timeout, source_address=source_address)
    await dial(client)
    await client.ehlo()
    if not implicit_tls and starttls is not False:
        if client.supports_extension("starttls"):
            await client.starttls(tls_context=ctx)
            await client.ehlo()
        elif starttls:
            client.close()
            raise aiosmtplib.SMTPException(f"{host}:{port} does not offer STARTTLS")
    return client


# Idle sessions an own hop keeps open to its next service (`SMTPHop(keep=...)`).
HOP_KEEP = 8
# A kept session idle longer than this is closed, not used: well under the idle
# timeout of a poste listener (300 s), so the other side never hangs up first.
HOP_IDLE = 30.0


class _SMTPTransaction:
    def __init__(
        self, client: aiosmtplib.SMTP, queue_id: str, hop: SMTPHop | None = None,
        reused: bool = False,
    ) -> None:
        self.client = client
        self.queue_id = queue_id
        self.hop = hop
        self.reused = reused  # a kept session: MAIL may find it closed by the other side
        self._over = False

    async def _call(self, what: str, coro) -> Reply:  # type: ignore[no-untyped-def]
        try:
            response = await coro
        except (aiosmtplib.SMTPException, OSError, AddressError) as exc:
            return self._failed(what, exc)
        return _reply(response.code, response.message)

    def _failed(self, what: str, exc: aiosmtplib.SMTPException | OSError | AddressError) -> Reply:
        """The reply for a command that raised: the hop's own refusal, or HopError."""
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            if exc.code < 400:  # garbage from the hop: do not claim success
                self.client.close()
                raise HopError(R.HOP_UNAVAILABLE) from exc
            return _reply(exc.code, exc.message)
        if isinstance(exc, AddressError):
            return Reply(exc.code, exc.text)
        log.warning("%s next hop failed at %s: %s", self.queue_id, what, exc)
        self.client.close()
        raise HopError(R.HOP_UNAVAILABLE) from exc

    async def mail(self, sender: str, options: list[str]) -> Reply:
        opts = [
            o
            for o in options
            if o.upper().startswith(_PASSABLE) and self.client.supports_extension(o.split("=")[0])
        ]
        if self.reused and self.hop is not None:
            # A kept session the next hop closed meanwhile (its idle timeout, a restart):
            # MAIL is the first command and changes nothing there, so a new session
            # takes over.  Any other answer is the hop's own.
            self.reused = False
            try:
                response = await mail_from(self.client, sender, opts)
            except AddressError as exc:
                return self._failed("MAIL", exc)
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code != 421:  # the hop's own answer
                    return self._failed("MAIL", exc)
                self.client.close()  # 421: the hop is closing the kept session
            except (aiosmtplib.SMTPException, OSError):
                self.client.close()  # the kept session is gone
            else:
                return _reply(response.code, response.message)
            self.client = await self.hop.connect_new(self.queue_id)
        return await self._call("MAIL", mail_from(self.client, sender, opts))

    async def rcpt(self, rcpt: str, options: list[str]) -> Reply:
        return await self._call("RCPT", rcpt_to(self.client, rcpt))

    async def data(self, message: Message) -> Reply:
        try:
            reply = await self._call("DATA", send_data(self.client, message))
        except BaseException:
            await self._end(rset=False)
            raise
        # the next hop answered the end of data: its transaction is over, the session
        # is ready for the next MAIL (RFC 5321 4.1.1.4)
        await self._end(rset=False, reusable=True)
        return reply

    async def abort(self) -> None:
        await self._end(rset=True, reusable=True)

    async def _end(self, *, rset: bool, reusable: bool = False) -> None:
        """Give the session back to the hop (after RSET when a transaction was open), or QUIT."""
        if self._over:
            return
        self._over = True
        client = self.client
        if reusable and self.hop is not None and self.hop.keep > 0 and client.is_connected:
            try:
                if rset:
                    await client.rset()
            except (aiosmtplib.SMTPException, OSError):
                client.close()
                return
            if self.hop.give_back(client):
                return
        if client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


class SMTPHop:
    """A hop to the next service or host over SMTP.

    One session per transaction, or, with `keep`, sessions kept open between
    transactions (at most `keep` idle, each for at most HOP_IDLE seconds): the
    next mail starts at MAIL, not at the TCP handshake, the greeting and EHLO,
    and nothing ends with QUIT (issue 16: the three processes over unix sockets
    spent four round trips per hop per mail on those).  A transaction the
    client abandoned is ended with RSET before its session is kept; the reply
    to DATA is still the next hop's own (cut-through does not change).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        helo: str | None = None,
        starttls: bool = False,
        tls_context: ssl.SSLContext | None = None,
        timeout: float = 300.0,
        keep: int = 0,
    ) -> None:
        self.host = host
        self.port = port
        self.helo = helo
        self.starttls = starttls
        self.tls_context = tls_context
        self.timeout = timeout
        self.keep = keep
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []  # newest last

    async def open(self, env: Envelope) -> _SMTPTransaction:
        client = self._take()
        if client is not None:
            return _SMTPTransaction(client, env.queue_id, self, reused=True)
        return _SMTPTransaction(await self.connect_new(env.queue_id), env.queue_id, self)

    async def connect_new(self, queue_id: str) -> aiosmtplib.SMTP:
        """A new session, greeted; HopError when the hop cannot be reached."""
        try:
            return await connect(
                self.host,
                self.port,
                helo=self.helo,
                starttls=self.starttls,
                tls_context=self.tls_context,
                timeout=self.timeout,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.warning(
                "%s next hop %s:%d unreachable: %s", queue_id, self.host, self.port, exc
            )
            raise HopError(R.HOP_UNAVAILABLE) from exc

    def _take(self) -> aiosmtplib.SMTP | None:
        """The most recently used kept session still open and not idle too long."""
        now = time.monotonic()
        while self._idle:
            client, since = self._idle.pop()
            if now - since < HOP_IDLE and client.is_connected:
                return client
            client.close()
        return None

    def give_back(self, client: aiosmtplib.SMTP) -> bool:
        """Keep `client` for the next transaction; False when enough are kept already."""
        now = time.monotonic()
        fresh = []
        for c, since in self._idle:  # the stale ones go now, not at the next take
            if now - since < HOP_IDLE and c.is_connected:
                fresh.append((c, since))
            else:
                c.close()
        self._idle = fresh
        if len(self._idle) >= self.keep:
            return False
        self._idle.append((client, now))
        return True

    def close_idle(self) -> None:
        """Close every kept session (a stopping service)."""
        idle, self._idle = self._idle, []
        for client, _ in idle:
            client.close()


class ProbeError(Exception):
    """What stopped a STARTTLS probe, in one line for an admin."""


async def probe_starttls(
    ip: str, port: int, name: str, ctx: ssl.SSLContext, timeout: float = 10.0
) -> tuple[str, dict[str, object]]:
    """Greet `ip`, STARTTLS with `ctx` verifying the certificate for `name`.

    Returns the TLS version and the peer certificate (as `getpeercert()`
    gives it): what `poste doctor` shows about our MX from outside.
    """
    client = aiosmtplib.SMTP(hostname=ip, port=port, local_hostname="doctor.poste.invalid",
                             timeout=timeout, start_tls=False, tls_context=ctx)
    try:
        try:
            await client.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise ProbeError(f"greeting {exc.code}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise ProbeError(f"cannot connect: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            await client.ehlo()
        except aiosmtplib.SMTPResponseException as exc:
            raise ProbeError(f"EHLO refused ({exc.code})") from None
        if not client.supports_extension("starttls"):
            raise ProbeError("STARTTLS not offered: mail to us travels in clear text")
        try:
            await client.starttls(server_hostname=name, tls_context=ctx)
        except aiosmtplib.SMTPResponseException as exc:
            raise ProbeError(f"STARTTLS refused: {exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
            cause = exc.__cause__ or exc.__context__ or exc
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise ProbeError(
                    f"certificate not valid for {name}: {cause.verify_message}") from None
            raise ProbeError(f"TLS handshake failed: {cause}") from None
        ssl_object = client.get_transport_info("ssl_object")
        version = ssl_object.version() if ssl_object is not None else "?"
        cert = ssl_object.getpeercert() if ssl_object is not None else {}
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.quit()
        return str(version), dict(cert or {})
    finally:
        client.close()


@dataclass
class SendResult:
    """What happened to one mail: the reply per recipient and to DATA."""

    rcpt_replies: dict[str, Reply] = field(default_factory=dict)
    data_reply: Reply | None = None
    tls: bool = False

    @property
    def accepted(self) -> list[str]:
        if self.data_reply is None or not self.data_reply.ok:
            return []
        return [r for r, rep in self.rcpt_replies.items() if rep.ok]


async def send_message(
    host: str,
    port: int,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    *,
    helo: str | None = None,
    implicit_tls: bool = False,
    starttls: bool | None = None,
    tls_context: ssl.SSLContext | None = None,
    username: str | None = None,
    password: str | None = None,
    timeout: float = 60.0,
) -> SendResult:
    """Send one mail; per-recipient replies are kept.  Raises aiosmtplib errors on failure."""
    client = await connect(
        host,
        port,
        helo=helo,
        starttls=starttls,
        implicit_tls=implicit_tls,
        tls_context=tls_context,
        timeout=timeout,
    )
    result = SendResult(tls=implicit_tls or client.get_transport_info("sslcontext") is not None)
    try:
        if username is not None:
            await client.login(username, password or "")
        options = []
        if client.supports_extension("8bitmime") and not message.isascii():
            options.append("BODY=8BITMIME")
        if client.supports_extension("size"):
            options.append(f"SIZE={len(message)}")
        if not (sender + "".join(recipients)).isascii() and client.supports_extension(
            "smtputf8"
        ):
            options.append("SMTPUTF8")
        await mail_from(client, sender, options)
        for rcpt in recipients:
            try:
                r = await rcpt_to(client, rcpt)
                result.rcpt_replies[rcpt] = _reply(r.code, r.message)
            except aiosmtplib.SMTPRecipientRefused as exc:
                result.rcpt_replies[rcpt] = _reply(exc.code, exc.message)
        if any(r.ok for r in result.rcpt_replies.values()):
            try:
                r = await send_data(client, Message.of(message))
                result.data_reply = _reply(r.code, r.message)
            except aiosmtplib.SMTPResponseException as exc:
                result.data_reply = _reply(exc.code, exc.message)
        await client.quit()
    finally:
        client.close()
    return result
