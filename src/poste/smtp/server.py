"""The SMTP listener every service runs: aiosmtpd with poste's rules on top.

aiosmtpd gives us the command loop, STARTTLS (which discards what was
pipelined before it, CVE-2011-0411) and AUTH plumbing.  On top we add: the
limits of RFC 5321 4.5.3 with their reply codes, strict CRLF in DATA (a bare
CR or LF refuses the message, so `\\n.\\n` can never end it: SMTP smuggling),
enhanced status codes, a cap on connections and on bad commands, PIPELINING
in EHLO, async AUTH handlers, and cut-through to the next hop through
`StageTransaction`.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import base64
import binascii
import collections
import contextlib
import logging
import os
import re
import socket
import ssl
import time
import typing
from dataclasses import dataclass, field
from typing import Any

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, AuthResult, TLSSetupException, syntax

from poste.smtp import fast_init, listen
from poste.smtp import replies as R
from poste.smtp.address import AddressError, parse_path
from poste.smtp.admission import Admission, Fairness, Ticket
from poste.smtp.chain import StageTransaction
from poste.smtp.data_reader import DataState, DotReader
from poste.smtp.hop import Hop
from poste.smtp.message import SPILL_AT, BodyWriter, give_back_soon
from poste.smtp.stage import Envelope, Reply, Stage

fast_init.install(aiosmtpd.smtp)  # per-class introspection, not per connection

log = logging.getLogger("poste.smtp")


class _NoLoginDataWarning(logging.Filter):
    """aiosmtpd warns about its own deprecated attribute on every successful AUTH."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_NoLoginDataWarning())


@dataclass
class Limits:
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_command_line: int = 512
    max_text_line: int = 1000
    max_bad_commands: int = 10
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    max_connections: int = 100
    tls_handshake_timeout: float = 10.0
    spill_at: int = SPILL_AT  # a mail larger than this is kept in a file, not in memory
    spill_dir: str | None = None  # where (None: $TMPDIR or /tmp); best on a disk, not tmpfs
    fairness: Fairness = field(default_factory=Fairness)


_READ_SIZE = 256 * 1024  # what one read of DATA may take from the socket's buffer


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Give back bytes read past the end of data (a pipelined command) to the reader's front.

    `read` took all the reader held, so nothing is in front of them; the
    buffer is CPython's bytearray (3.11-3.13), else `feed_data` appends them
    to the (then empty) buffer, which is the same place.
    """
    buffer = getattr(reader, "_buffer", None)
    if isinstance(buffer, bytearray):
        buffer[:0] = data
    else:
        reader.feed_data(data)


_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}\b")
# Enhanced codes for aiosmtpd's own replies, which lack them (RFC 2034).
_DEFAULT_ENHANCED = {
    221: "2.0.0",
    250: "2.0.0",
    252: "2.5.0",
    421: "4.3.0",
    451: "4.3.0",
    452: "4.5.3",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    535: "5.7.8",
    550: "5.0.0",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.0.0",
    555: "5.5.4",
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_COMMAND_CODES = {500, 501, 502, 503, 504, 555}


_class_names: dict[type, tuple[list[str], frozenset[str]]] = {}


def _names_of(obj: object) -> list[str]:
    """`dir(obj)`'s names, the class's found once per class (then its instance's own).

    aiosmtpd's `SMTP.__init__` takes `dir()` of the protocol and of the handler on
    every connection, to find the smtp_* and handle_* methods: the walk over every
    class of the protocol's hierarchy was 4% of `poste up`'s CPU at 5 KB, one
    connection per mail (issue 16).  The same names, sorted by `dir()` as before.
    """
    cls = type(obj)
    known = _class_names.get(cls)
    if known is None:
        every = {n for c in cls.__mro__ for n in vars(c)}
        known = _class_names[cls] = (sorted(every), frozenset(every))
    names, seen = known
    own = getattr(obj, "__dict__", None)
    return names + [n for n in own if n not in seen] if own else names


class _Connection(SMTP):
    """One client connection."""

    def __dir__(self) -> list[str]:
        return _names_of(self)

    def __init__(self, service: SMTPService) -> None:
        self.service = service
        limits = service.limits
        self.limits = limits
        # aiosmtpd sizes its stream reader from this before anything else.
        self.line_length_limit = limits.max_text_line
        self.command_size_limit = limits.max_command_line
        self.command_size_limits = collections.defaultdict(lambda: limits.max_command_line)
        self.ticket: Ticket | None = None  # set by _Gate: the slot this connection holds
        self._deadline = 0.0  # when the idle or DATA timeout runs out (_reset_timeout)
        self._in_ehlo = False
        self._bad_commands = 0
        self._reading_rcpt = False
        self.poste_env = Envelope()  # session facts; each transaction copies it
        self.txn: StageTransaction | None = None
        super().__init__(
            _Handler(self),
            data_size_limit=limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=service.hostname,
            ident="poste ESMTP",
            tls_context=None if service.implicit_tls else service.tls_context,
            require_starttls=service.require_tls and not service.implicit_tls,
            timeout=limits.idle_timeout,
            auth_required=getattr(service.stage, "auth_required", False),
            auth_require_tls=True,
            loop=asyncio.get_running_loop(),
        )
        if not hasattr(service.stage, "authenticate"):
            self._auth_methods.clear()

    # -- connection life -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls_done = self._original_transport is not None
        if not starttls_done:
            self.service.connections.add(self)
        super().connection_made(transport)
        assert self.session is not None
        peer = transport.get_extra_info("peername") or ("", 0)
        sockname = transport.get_extra_info("sockname") or ("", 0)
        if self.service.unix:  # no address: the socket's folder vouches for the client
            peer, sockname = ("", 0), ("", 0)
        if starttls_done:
            self._abort_txn()
            env = self.poste_env.copy_for_transaction()
            self._tls_facts(env, self.session.ssl.get("ssl_object") if self.session.ssl else None)
            self.poste_env = env
            env.helo = ""
            return
        self.poste_env = Envelope(
            peer_ip=str(peer[0]), peer_port=int(peer[1]), local_ip=str(sockname[0]),
            own_hop=self.service.unix, via="unix" if self.service.unix else "",
        )
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # implicit TLS (port 465)
            self._tls_protocol = transport  # type: ignore[assignment]
            self.session.ssl = {"ssl_object": ssl_object}
            self._tls_facts(self.poste_env, ssl_object)

    async def _handle_client(self) -> None:
        """Ask the stage about the peer (rDNS, blocklists) before the greeting."""
        try:
            reply = await self.service.stage.on_connect(self.poste_env)
        except Exception:
            log.exception("on_connect failed for %s", self.poste_env.peer_ip)
            reply = R.CONNECT_FAILED
        if reply is not None:
            await self.push(str(reply))
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    @staticmethod
    def _tls_facts(env: Envelope, ssl_object: Any) -> None:
        if ssl_object is None:
            return
        env.tls = True
        env.tls_version = ssl_object.version()
        cipher = ssl_object.cipher()
        env.tls_cipher = cipher[0] if cipher else None

    def connection_lost(self, error: Exception | None) -> None:
        if self.ticket is not None:
            self.ticket.release()
        self.service.connections.discard(self)
        self._abort_txn()
        super().connection_lost(error)

    def _abort_txn(self) -> None:
        txn, self.txn = self.txn, None
        if txn is not None:
            task = self.loop.create_task(txn.abort())
            self.service.background.add(task)
            task.add_done_callback(self.service.background.discard)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timer, moved without a new TimerHandle per command.

        aiosmtpd cancels the timer and makes a new one on every command (7 per mail
        here, each left in the loop's heap until its time): 2.9% of `poste up`'s CPU at
        5 KB (issue 16).  The deadline moves instead; a timer that fires before it
        re-arms for what is left (`_timeout_cb`); only a nearer deadline makes a new one.
        """
        wait = duration or self._timeout_duration
        deadline = self.loop.time() + wait
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled() and handle.when() <= deadline:
            return
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_later(wait, self._timeout_cb)

    def _timeout_cb(self) -> None:
        left = self._deadline - self.loop.time()
        if left > 0:  # the deadline moved since the timer was set: wait for the rest
            self._timeout_handle = self.loop.call_later(left, self._timeout_cb)
            return
        if self.transport is not None and hasattr(self.transport, "write"):
            try:
                self.transport.write(R.TIMEOUT.wire())  # type: ignore[attr-defined]
            except Exception:
                pass
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    # -- replies -----------------------------------------------------------

    async def push(self, status: str | bytes) -> None:  # type: ignore[override]
        if isinstance(status, str) and not self._in_ehlo:
            status = self._enhance(status)
            code = int(status[:3]) if status[:3].isdigit() else 0
            if code in _BAD_COMMAND_CODES:
                self._bad_commands += 1
                if self._bad_commands > self.limits.max_bad_commands:
                    await super().push(status)  # type: ignore[type-var]
                    await super().push(str(R.TOO_MANY_ERRORS))
                    if self.transport is not None:
                        self.transport.close()
                    return
        await super().push(status)  # type: ignore[type-var]

    @staticmethod
    def _enhance(status: str) -> str:
        if "\r\n" in status or _HAS_ENHANCED.match(status):
            return status
        head = status[:3]
        if not head.isdigit() or (len(status) > 3 and status[3] != " "):
            return status
        enhanced = _DEFAULT_ENHANCED.get(int(head))
        if enhanced is None:
            return status
        return f"{head} {enhanced} {status[4:]}".rstrip()

    # -- commands ----------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        if hostname and _CONTROL.search(hostname):
            await self.push(str(R.CONTROL_IN_EHLO))
            return
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    async def smtp_HELO(self, hostname: str) -> None:
        if hostname and _CONTROL.search(hostname):
            await self.push(str(R.CONTROL_IN_HELO))
            return
        self._in_ehlo = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_ehlo = False

    async def smtp_VRFY(self, arg: str) -> None:
        # Answering would let anyone enumerate our users (RFC 5321 3.5.3).
        await self.push(str(R.VRFY))

    async def smtp_EXPN(self, arg: str) -> None:
        await self.push(str(R.NO_EXPN))

    # -- paths: poste's strict parser instead of aiosmtpd's (poste.smtp.address) --

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        self._reading_rcpt = False
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        self._reading_rcpt = True
        await super().smtp_RCPT(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The path as the canonical address text ("<>" for the null path) and the rest.

        None makes aiosmtpd answer 553 5.1.3: every control character, every
        form outside RFC 5321 4.1.2, so no later hop can read it differently.
        """
        if not arg:
            return "", ""
        try:
            address, rest = parse_path(arg, recipient=self._reading_rcpt)
        except AddressError as exc:
            log.info("%s bad path %s: %s", self.poste_env.peer_ip, ascii(arg), exc)
            return None, None
        return ("<>" if address is None else address.text), rest

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA with strict CRLF, RFC 5321 limits and bounded memory.

        Replaces aiosmtpd's reader loop: it would accept bare LF in the
        message and pass it on, where a downstream MTA could see `\\n.\\n`
        as the end of data (SMTP smuggling).  We reject such messages.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(str(R.NEED_RCPT))
            return
        if arg:
            await self.push(str(R.DATA_SYNTAX))
            return
        await self.push(str(R.START_DATA))
        body = BodyWriter(self.limits.spill_at, self.limits.spill_dir)
        try:
            reply = await self._read_data(body)
        finally:
            body.discard()  # a finished body owns nothing more; a cut-off one lets go here
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(reply)

    async def _read_data(self, body: BodyWriter) -> str:
        """Read to the end marker into `body`, then pass the mail on; the reply to give.

        The checks run over whatever the socket gave at once (data_reader.py), not per
        line; what a pipelining client sent after the end of data goes back to the
        reader for aiosmtpd's next command.
        """
        reader = DotReader(body, self.limits.max_message_size, self.limits.max_text_line)
        data_timeout = self.limits.data_timeout
        clock = self.loop.time
        armed = 0.0  # when the timer was last set: once a second is enough, not every read
        while self.transport is not None:
            now = clock()
            if now - armed >= 1.0:
                self._reset_timeout(data_timeout)
                armed = now
            chunk = await self._reader.read(_READ_SIZE)
            if not chunk:
                raise asyncio.IncompleteReadError(b"", None)
            after = reader.feed(chunk)
            if after is not None:
                if after:
                    _unread(self._reader, after)
                break
        state = reader.state
        self._reset_timeout()
        if state is not DataState.NOMINAL:
            log.info("%s DATA refused: %s", self.poste_env.peer_ip, state.value)
            self._abort_txn()
            if state is DataState.TOO_LONG:
                return str(R.LINE_TOO_LONG)
            if state is DataState.TOO_MUCH:
                return str(R.TOO_BIG)
            if state is DataState.NUL:
                return str(R.NUL_IN_DATA)
            return str(R.BARE_CR_LF)
        # every line the reader let through ends in CRLF; without a dot-stuffed line
        # the body goes on to the next hop as it is (Message.wire_chunks)
        message = body.finish(wire_clean=not reader.dotted)
        # Straight to the transaction: no copy into aiosmtpd's envelope and back out.
        txn, self.txn = self.txn, None
        if txn is None:
            return str(R.NEED_RCPT)
        try:
            return str(await txn.data(message))
        finally:
            message.close()
            if not message.in_memory:
                give_back_soon()

    # -- AUTH: async mechanisms so the password check never stalls the loop --

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            raw = await self.challenge_auth("", encode_to_b64=False)
            if not isinstance(raw, bytes):
                return AuthResult(success=False, handled=False)
        else:
            try:
                raw = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push(str(R.BAD_BASE64))
                return AuthResult(success=False, handled=True)
        parts = raw.split(b"\x00")
        if len(parts) != 3:
            await self.push(str(R.BAD_AUTH_VALUE))
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            # RFC 4616 section 2: acting as someone else is not something we grant.
            await self.push(str(R.FOREIGN_AUTHZID))
            return AuthResult(success=False, handled=True)
        return await self._check_login(login, password)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if not isinstance(login, bytes):
                return AuthResult(success=False, handled=False)
        else:
            try:
                login = base64.b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push(str(R.BAD_BASE64))
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=False)
        return await self._check_login(login, password)

    async def _check_login(self, login: bytes, password: bytes) -> AuthResult:
        user = login.decode("utf-8", "replace")
        secret = password.decode("utf-8", "replace")
        authenticate = self.service.stage.authenticate  # type: ignore[attr-defined]
        reply: Reply | None = await authenticate(self.poste_env, user, secret)
        if reply is None:
            self.poste_env.auth_user = user
            return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False, message=str(reply))


class _Gate(asyncio.Protocol):
    """The first protocol of every accepted socket: admission, then TLS, then SMTP.

    It runs before the greeting and, on an implicit-TLS port, before the
    handshake, so a refused client costs a few bytes, not an SSL object
    and its buffers; a handshake that does not finish within
    `Limits.tls_handshake_timeout` is dropped (asyncio's default is 60 s).
    """

    def __init__(self, service: SMTPService) -> None:
        self.service = service
        self.ticket: Ticket | None = None
        self.early: list[bytes] = []
        self.conn: _Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # duck-typed: another event loop's transports (uvloop's) are not asyncio's classes
        transport = typing.cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("socket")
        # TCP (v4 or v6) unless a unix socket: `sock.family` builds an enum on every
        # read, 1.7% of `poste up`'s CPU at 5 KB with a connection per mail (issue 16)
        if sock is not None and not self.service.unix:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.service.unix:
            admitted = self.service.admission.admit_own("unix")
            peer = ("unix",)
        else:
            admitted = self.service.admission.admit(str(peer[0]))
        if isinstance(admitted, str):
            if self.service.should_log_refusal(admitted):
                log.warning("refusing %s: %s", peer[0], admitted)
            if not self.service.implicit_tls:  # a TLS client could not read it anyway
                transport.write(R.TOO_MANY_CONNECTIONS.wire())
            transport.close()
            return
        self.ticket = admitted
        if self.service.implicit_tls:
            loop = asyncio.get_running_loop()
            waiter, tls = self._wrap(loop, transport)
            task = loop.create_task(self._handshake(transport, waiter, tls))
            self.service.background.add(task)
            task.add_done_callback(self.service.background.discard)
        else:
            self._hand_off(transport)

    def _wrap(self, loop: asyncio.AbstractEventLoop, raw: asyncio.Transport
              ) -> tuple[asyncio.Future[None], sslproto.SSLProtocol]:
        """Put the TLS layer under this connection now, inside connection_made.

        What loop.start_tls does, but synchronously: start_tls is a coroutine,
        so it runs a step later, and uvloop delivers the bytes that came with
        the connection (the ClientHello) in between, to this protocol, even if
        connection_made paused reading (it starts reading after connection_made).
        The handshake then waited for a ClientHello already consumed, until its
        timeout.  asyncio's SSLProtocol is the layer aiosmtpd's STARTTLS uses too.
        """
        assert self.service.tls_context is not None
        waiter: asyncio.Future[None] = loop.create_future()
        # (a float timeout works; typeshed says int)
        tls = sslproto.SSLProtocol(
            loop, self, self.service.tls_context, waiter, server_side=True,
            ssl_handshake_timeout=self.service.limits.tls_handshake_timeout,  # type: ignore[arg-type]
            call_connection_made=False)
        raw.set_protocol(tls)
        tls.connection_made(raw)
        return waiter, tls

    async def _handshake(self, raw: asyncio.Transport, waiter: asyncio.Future[None],
                         layer: sslproto.SSLProtocol) -> None:
        try:
            await waiter
            tls: asyncio.Transport | None = layer._app_transport
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            peer = raw.get_extra_info("peername") or ("?",)
            log.info("TLS handshake with %s failed: %s", peer[0], exc or type(exc).__name__)
            raw.abort()
            self._release()
            return
        if tls is None or raw.is_closing():
            self._release()
            return
        self._hand_off(tls)

    def _hand_off(self, transport: asyncio.Transport) -> None:
        conn = _Connection(self.service)
        conn.ticket, self.ticket = self.ticket, None
        self.conn = conn
        transport.set_protocol(conn)
        conn.connection_made(transport)
        for data in self.early:  # sent before our greeting: a bad client, but keep it
            conn.data_received(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.data_received(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()  # after the hand-off, the transport tells the _Connection itself

    def _release(self) -> None:
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            ticket.release()


class _Handler:
    """aiosmtpd hooks, bound to one connection, driving its StageTransaction."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    def __dir__(self) -> list[str]:
        return _names_of(self)

    @property
    def stage(self) -> Stage:
        return self.conn.service.stage

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.conn._abort_txn()
        self.conn.poste_env.helo = hostname
        self.conn.poste_env.esmtp = True
        # aiosmtpd advertises neither PIPELINING nor ENHANCEDSTATUSCODES.
        out = [r for r in responses if r != "250 HELP" and r.strip() != "250-AUTH"]
        out.insert(1, "250-PIPELINING")
        out.append("250-ENHANCEDSTATUSCODES")
        out.append("250 HELP")
        return out

    async def handle_HELO(self, server: SMTP, session: Any, envelope: Any, hostname: str) -> str:
        session.host_name = hostname
        self.conn._abort_txn()
        self.conn.poste_env.helo = hostname
        self.conn.poste_env.esmtp = False
        return f"250 {self.conn.service.hostname}"

    async def handle_MAIL(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        conn = self.conn
        conn._abort_txn()
        env = conn.poste_env.copy_for_transaction()
        sender = "" if address == "<>" else address
        if not sender.isascii() and "SMTPUTF8" not in options:
            return str(R.NEEDS_SMTPUTF8)
        txn = StageTransaction(self.stage, conn.service.hop, env, conn.service.hostname)
        reply = await txn.mail(sender, [o for o in options if not o.startswith("AUTH=")])
        if reply.ok:
            conn.txn = txn
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return str(reply)

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        conn = self.conn
        if conn.txn is None:
            return str(R.NEED_MAIL)
        if len(envelope.rcpt_tos) >= conn.limits.max_recipients:
            return str(R.TOO_MANY_RECIPIENTS)
        if not address.isascii() and "SMTPUTF8" not in conn.txn.env.mail_options:
            return str(R.NEEDS_SMTPUTF8)
        reply = await conn.txn.rcpt(address, options)
        if reply.ok:
            envelope.rcpt_tos.append(address)
        return str(reply)

    async def handle_RSET(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.conn._abort_txn()
        return str(R.OK)

    async def handle_NOOP(self, server: SMTP, session: Any, envelope: Any, arg: str) -> str:
        return str(R.OK)

    async def handle_QUIT(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.conn._abort_txn()
        return str(R.BYE)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client that gives up the handshake is routine on port 25, not a bug.
            log.warning("TLS handshake with %s failed: %s", self.conn.poste_env.peer_ip,
                        error.__cause__ or error)
            return str(R.TLS_FAILED)
        log.error("session error: %r", error, exc_info=error)
        self.conn._abort_txn()
        return str(R.LOCAL_ERROR)


class SMTPService:
    """One listener + one stage + one next hop (design.md section 1)."""

    def __init__(
        self,
        stage: Stage,
        hop: Hop,
        *,
        host: str,
        port: int,
        hostname: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        require_tls: bool = False,
        implicit_tls: bool = False,
        limits: Limits | None = None,
    ) -> None:
        if implicit_tls and tls_context is None:
            raise ValueError("implicit TLS needs a certificate")
        self.stage = stage
        self.hop = hop
        self.host = host
        self.port = port
        self.hostname = hostname or socket.getfqdn()
        self.unix = host.startswith("/")  # a unix socket's path (`unix:PATH`), not an address
        self.tls_context = tls_context
        self.require_tls = require_tls and tls_context is not None
        self.implicit_tls = implicit_tls
        self.limits = limits or Limits()
        self.admission = Admission(self.limits.max_connections, self.limits.fairness)
        self._refusal_logged: dict[str, float] = {}
        self.connections: set[_Connection] = set()
        self.background: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._more: list[asyncio.Server] = []  # a worker's further shared sockets (v4 and v6)
        self.sockname: tuple[str, int] = (host, port)

    def should_log_refusal(self, reason: str) -> bool:
        """One log line per reason per minute: a flood must not also flood the log."""
        now = time.monotonic()
        last = self._refusal_logged.get(reason)
        if last is not None and now - last < 60:
            return False
        if len(self._refusal_logged) > 1000:
            self._refusal_logged.clear()
        self._refusal_logged[reason] = now
        return True

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        shared = listen.inherited(self.host, self.port)  # a worker: the parent's sockets
        if shared is not None:
            await self._start_shared(loop, shared)
            return
        if self.unix:
            await self._start_unix(loop)
            return
        self._server = await loop.create_server(
            lambda: _Gate(self),
            host=self.host,
            port=self.port,
            # A flood of refused connections must not fill the accept queue, or a
            # legitimate SYN is dropped and waits a second for its retransmit.
            backlog=listen.BACKLOG,
            reuse_address=True,
        )
        self._listening()

    def _listening(self, shared: bool = False) -> None:
        """Say where the service listens, once it does (admins and tests read the port)."""
        tail = " (shared)" if shared else ""
        if self.unix:
            log.info("%s listening on unix:%s%s", self.stage.name, self.host, tail)
            return
        assert self._server is not None
        name = self._server.sockets[0].getsockname()
        self.sockname = (str(name[0]), int(name[1]))
        log.info("%s listening on %s:%d%s%s", self.stage.name, *self.sockname,
                 " (implicit TLS)" if self.implicit_tls else "", tail)

    async def _start_shared(self, loop: asyncio.AbstractEventLoop,
                            socks: list[socket.socket]) -> None:
        """Accept on sockets the parent bound (smtp/listen.py), as every worker does."""
        servers = []
        for sock in socks:
            if self.unix:
                servers.append(await loop.create_unix_server(lambda: _Gate(self), sock=sock))
            else:
                servers.append(await loop.create_server(lambda: _Gate(self), sock=sock))
        self._server, self._more = servers[0], servers[1:]
        self._listening(shared=True)

    async def _start_unix(self, loop: asyncio.AbstractEventLoop) -> None:
        """Listen on a unix socket, mode 0660: its owner and group (our services) may
        connect; the folder it is in is what keeps everyone else out."""
        path = self.host  # asyncio replaces a socket file left by a process that died
        old = os.umask(listen.UNIX_UMASK)
        try:
            self._server = await loop.create_unix_server(lambda: _Gate(self), path,
                                                          backlog=listen.BACKLOG)
        finally:
            os.umask(old)
        self._listening()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for more in self._more:
                more.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.close()
            await self._server.wait_closed()
            for more in self._more:
                await more.wait_closed()
            self._server, self._more = None, []
            close_idle = getattr(self.hop, "close_idle", None)
            if close_idle is not None:  # sessions an SMTPHop kept open to the next hop
                close_idle()
            if self.unix and listen.worker() is None:  # a worker's parent owns the file
                with contextlib.suppress(OSError):
                    os.unlink(self.host)
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)
