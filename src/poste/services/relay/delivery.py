"""Deliver one message to the recipients of one destination domain over SMTP.

The relay's outgoing client differs from the filters' `SMTPHop`: it walks the
MX list (RFC 5321 5.1: by preference, equal preferences shuffled; no MX means
the domain's own A/AAAA; a null MX, RFC 7505, means the domain takes no mail),
tries every address of a host (IPv6 and IPv4), uses STARTTLS whenever offered
without checking the certificate (opportunistic, RFC 7435; a failed handshake
falls back to plain text) unless the destination's transport policy
(`tls_policy/`: MTA-STS, DANE) asks for more, and returns one result per recipient, since each
RCPT can be accepted, deferred or refused on its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from poste.services.relay.tls_policy.policy import (
    HostPlan,
    TLSRefused,
    TLSUnavailable,
    TransportPolicy,
)
from poste.smtp.address import AddressError, ip_of
from poste.smtp.client import dial, mail_from, new_client, rcpt_to, send_data
from poste.smtp.message import Message
from poste.smtp.stage import Reply

log = logging.getLogger("poste.relay.delivery")


class DomainFailure(Exception):
    """Every recipient of the domain gets the same result (no MX host could be used)."""

    def __init__(self, code: int, text: str, remote_mta: str = "", remote: bool = False) -> None:
        super().__init__(text)
        self.result = Reply(code, text, remote_mta, remote)


@dataclass
class Target:
    host: str  # MX name (for Remote-MTA and logs)
    address: str  # IP
    plan: HostPlan | None = None  # what TLS the host needs (None: no transport policy)


def _tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class _Session:
    """An open SMTP session kept for the next message to the same domain."""

    client: aiosmtplib.SMTP
    mta: str
    uses: int  # transactions done on it
    timer: asyncio.TimerHandle | None = None


class Deliverer:
    """Delivers over SMTP to MX hosts found with `resolver`.

    `self_addresses`: the IPs we listen on (a wildcard 0.0.0.0 / :: means
    every address of this machine); an MX resolving to one of them is mail
    that would loop back to us.

    Connection reuse (as Postfix's connection cache): after a clean
    transaction with the best MX of a domain, the session is kept open for
    `reuse_idle` seconds, and the next message to that domain starts with RSET
    on it instead of a new connection, up to `reuse_limit` messages per
    session.  `aclose()` ends the kept sessions with QUIT.
    """

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        *,
        helo: str,
        port: int = 25,
        timeout: float = 60.0,
        connect_timeout: float = 15.0,
        ipv6: bool = True,
        tls: bool = True,
        self_addresses: Iterable[str] = (),
        reuse_limit: int = 20,
        reuse_idle: float = 2.0,
        max_idle_per_domain: int = 10,
        transport: TransportPolicy | None = None,
    ) -> None:
        self.resolver = resolver
        self.helo = helo
        self.port = port
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.ipv6 = ipv6
        self.tls = tls
        self._tls_context = _tls_context()
        self.transport = transport
        self._self: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        self._self_any4 = self._self_any6 = False
        for text in self_addresses:
            addr = ip_of(text)
            if addr is None:
                raise ValueError(f"{text!r} is not an IP address")
            if addr.is_unspecified:
                if addr.version == 4:
                    self._self_any4 = True
                else:
                    self._self_any4 = self._self_any6 = True  # "::" is dual-stack on Linux
            else:
                self._self.add(addr)
        self.reuse_limit = reuse_limit
        self.reuse_idle = reuse_idle
        self.max_idle_per_domain = max_idle_per_domain
        self._idle: dict[str, list[_Session]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    # -- DNS ---------------------------------------------------------------

    async def _addresses(self, host: str) -> list[str]:
        found: list[str] = []
        kinds = ["AAAA", "A"] if self.ipv6 else ["A"]
        errors = 0
        for kind in kinds:
            try:
                answer = await self.resolver.resolve(host, kind)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException:
                errors += 1
                continue
            found.extend(r.to_text() for r in answer)
        if not found and errors:
            raise DomainFailure(451, f"4.4.3 DNS lookup of {host} failed, will retry")
        return found

    async def mx_records(self, domain: str) -> tuple[list[tuple[int, str]], bool]:
        """(preference, host) in the order to try them, and whether the MX is implicit."""
        try:
            answer = await self.resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise DomainFailure(550, f"5.1.2 Domain {domain} does not exist") from None
        except dns.resolver.NoAnswer:
            return [(0, domain)], True  # implicit MX, RFC 5321 5.1
        except dns.exception.DNSException as exc:
            raise DomainFailure(
                451, f"4.4.3 MX lookup of {domain} failed ({type(exc).__name__}), will retry"
            ) from None
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
        if any(name in ("", ".") for _, name in records):
            if len(records) == 1 and records[0][0] == 0:
                raise DomainFailure(556, f"5.1.10 Domain {domain} accepts no mail (null MX)")
            records = [(p, n) for p, n in records if n not in ("", ".")]
        by_pref: dict[int, list[str]] = {}
        for pref, name in records:
            by_pref.setdefault(pref, []).append(name)
        ordered: list[tuple[int, str]] = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            random.shuffle(group)
            ordered.extend((pref, name) for name in group)
        return ordered, False

    def is_self(self, address: str) -> bool:
        """True if `address` is one where we listen (so delivering there loops back)."""
        addr = ip_of(address)
        if addr is None:
            return False
        if addr in self._self:
            return True
        if (addr.version == 4 and self._self_any4) or (addr.version == 6 and self._self_any6):
            return _is_local_address(addr)
        return False

    # -- SMTP --------------------------------------------------------------

    async def deliver(
        self, domain: str, sender: str, recipients: Sequence[str], message: Message
    ) -> dict[str, Reply]:
        """Try the MX hosts of `domain` until one gives a final answer for the recipients."""
        reused = await self._deliver_reused(domain, sender, recipients, message)
        if reused is not None:
            return reused
        try:
            records, implicit = await self.mx_records(domain)
        except DomainFailure as exc:
            return dict.fromkeys(recipients, exc.result)
        domain_plan = await self.transport.domain(domain) if self.transport else None
        plans: dict[str, HostPlan] = {}
        last = Reply(451, f"4.4.1 No MX host of {domain} could be reached")
        tried = 0
        best = records[0][0] if records else 0
        # Resolve each preference level before trying it, so that a level holding one
        # of our own addresses ends the list (RFC 5321 5.1, as Postfix does).
        levels: dict[int, list[str]] = {}
        for pref, host in records:
            levels.setdefault(pref, []).append(host)
        for pref, hosts in levels.items():
            resolved: list[tuple[str, list[str]]] = []
            for host in hosts:
                if self.transport and domain_plan:
                    plans[host] = plan = await self.transport.host(domain_plan, host)
                    if plan.refused:  # never a session to a host the policy rules out
                        last = Reply(451, plan.refused)
                        log.info("delivery to %s for %s: %s", host, domain, plan.refused)
                        continue
                try:
                    addrs = await self._addresses(host)
                except DomainFailure as exc:
                    last = exc.result
                    continue
                if not addrs:
                    if implicit:  # no MX, no A/AAAA: the domain takes no mail (Postfix bounces)
                        kinds = "address record" if self.ipv6 else "IPv4 address (IPv6 is off)"
                        return dict.fromkeys(recipients, Reply(
                            550, f"5.4.4 Domain {domain} has no MX and no {kinds}"))
                    last = Reply(451, f"4.4.4 MX host {host} has no address")
                    continue
                resolved.append((host, addrs))
            if any(self.is_self(a) for _, addrs in resolved for a in addrs):
                if pref == best:
                    loop = Reply(554, f"5.4.6 mail for {domain} loops back to myself")
                    log.warning("delivery to %s: %s", domain, loop.record)
                    return dict.fromkeys(recipients, loop)
                log.info("delivery to %s: MX preference %d is ourselves; not trying it or "
                         "worse ones", domain, pref)
                break
            for host, addrs in resolved:
                for addr in addrs:
                    tried += 1
                    try:
                        return await self._session(
                            Target(host, addr, plans.get(host)), sender, recipients, message,
                            cache_as=domain if pref == best else None,
                        )
                    except DomainFailure as exc:
                        last = exc.result
                        log.info("delivery to %s [%s] for %s: %s", host, addr, domain, last.record)
                        if last.permanent:
                            return dict.fromkeys(recipients, last)
        if not tried and not records:
            last = Reply(451, f"4.4.4 No MX host for {domain}")
        return dict.fromkeys(recipients, last)

    async def _session(
        self,
        target: Target,
        sender: str,
        recipients: Sequence[str],
        message: Message,
        *,
        cache_as: str | None = None,
    ) -> dict[str, Reply]:
        try:
            return await self._try(target, sender, recipients, message, tls=self.tls,
                                   cache_as=cache_as)
        except _TLSFailed as exc:
            if exc.verified:  # a refused certificate (MTA-STS testing): encrypt unchecked
                try:
                    return await self._try(target, sender, recipients, message, tls=True,
                                           unchecked=True, cache_as=cache_as)
                except _TLSFailed:
                    pass
            return await self._try(target, sender, recipients, message, tls=False,
                                   cache_as=cache_as)

    async def _try(
        self,
        target: Target,
        sender: str,
        recipients: Sequence[str],
        message: Message,
        *,
        tls: bool,
        unchecked: bool = False,
        cache_as: str | None = None,
    ) -> dict[str, Reply]:
        mta = target.host
        client = new_client(target.address, self.port, helo=self.helo,
                            tls_context=self._tls_context, timeout=self.timeout)
        kept = False
        try:
            try:
                await dial(client, self.connect_timeout)
            except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, OSError) as exc:
                raise DomainFailure(451, f"4.4.1 Connection to {mta} failed: {exc}", mta) from None
            except aiosmtplib.SMTPResponseException as exc:
                raise _failure(exc, mta, "greeting") from None
            await self._hello(client, mta)
            if self.transport and target.plan and (tls or target.plan.required):
                try:
                    if await self.transport.starttls(client, target.plan, mta, target.address,
                                                     unchecked=unchecked):
                        await self._hello(client, mta)
                except TLSRefused as exc:
                    raise DomainFailure(451, str(exc), mta) from None
                except TLSUnavailable as exc:
                    raise _TLSFailed(exc.verified and not unchecked) from None
            elif tls and client.supports_extension("starttls"):
                try:
                    await client.starttls(tls_context=self._tls_context, validate_certs=False)
                except aiosmtplib.SMTPResponseException:
                    raise _TLSFailed() from None
                except (ssl.SSLError, aiosmtplib.SMTPException, OSError):
                    raise _TLSFailed() from None
                await self._hello(client, mta)
            results = await self._transaction(client, mta, sender, recipients, message)
            if cache_as is not None and _reusable(client, results):
                kept = self._park(cache_as, _Session(client, mta, 1))
            if not kept:
                await _quit(client)
            return results
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            raise DomainFailure(451, f"4.4.2 Lost connection with {mta}: {exc}", mta) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise DomainFailure(451, f"4.4.2 SMTP error with {mta}: {exc}", mta) from None
        finally:
            if not kept:
                client.close()

    async def _transaction(
        self,
        client: aiosmtplib.SMTP,
        mta: str,
        sender: str,
        recipients: Sequence[str],
        message: Message,
    ) -> dict[str, Reply]:
        """MAIL, RCPT..., DATA on an open session; DomainFailure before DATA only."""
        options: list[str] = []
        if client.supports_extension("8bitmime") and not message.isascii():
            options.append("BODY=8BITMIME")
        needs_utf8 = not (sender + "".join(recipients)).isascii()
        if needs_utf8:
            if not client.supports_extension("smtputf8"):
                raise DomainFailure(
                    553, "5.6.7 Destination does not support SMTPUTF8 addresses", mta
                )
            options.append("SMTPUTF8")
        try:
            await mail_from(client, sender, options)
        except AddressError as exc:  # never rewritten into another address: bounced instead
            raise DomainFailure(exc.code, f"{exc.text}: <{sender}>", mta) from None
        except aiosmtplib.SMTPResponseException as exc:
            if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
                raise
            raise _failure(exc, mta, "MAIL FROM") from None
        results: dict[str, Reply] = {}
        accepted: list[str] = []
        for rcpt in recipients:
            try:
                resp = await rcpt_to(client, rcpt)
            except AddressError as exc:
                results[rcpt] = Reply(exc.code, f"{exc.text}: <{rcpt}>", mta)
                continue
            except aiosmtplib.SMTPResponseException as exc:
                if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
                    raise
                results[rcpt] = Reply(exc.code, _flat(exc.message), mta, remote=True)
                continue
            accepted.append(rcpt)
            results[rcpt] = Reply(resp.code, _flat(resp.message), mta, remote=True)
        if not accepted:
            return results
        try:
            resp = await send_data(client, message)
            final = Reply(resp.code, _flat(resp.message), mta, remote=True)
        except aiosmtplib.SMTPServerDisconnected as exc:
            final = Reply(451, f"4.4.2 {mta} dropped the connection after DATA: {exc}", mta)
        except aiosmtplib.SMTPResponseException as exc:
            final = Reply(exc.code, _flat(exc.message), mta, remote=True)
        except (aiosmtplib.SMTPException, OSError) as exc:
            final = Reply(451, f"4.4.2 Lost connection with {mta} in DATA: {exc}", mta)
        for rcpt in accepted:
            results[rcpt] = final
        return results

    async def _hello(self, client: aiosmtplib.SMTP, mta: str) -> None:
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            try:
                await client.helo()
            except aiosmtplib.SMTPResponseException as exc:
                raise _failure(exc, mta, "HELO") from None

    # -- connection reuse --------------------------------------------------

    def _park(self, domain: str, session: _Session) -> bool:
        """Keep `session` for the next message to `domain`; False if it should be closed."""
        if session.uses >= self.reuse_limit or self.reuse_idle <= 0:
            return False
        idle = self._idle.setdefault(domain, [])
        if len(idle) >= self.max_idle_per_domain:
            return False
        loop = asyncio.get_running_loop()
        session.timer = loop.call_later(self.reuse_idle, self._expire, domain, session)
        idle.append(session)
        return True

    def _take(self, domain: str) -> _Session | None:
        idle = self._idle.get(domain)
        if not idle:
            return None
        session = idle.pop()
        if not idle:
            del self._idle[domain]
        if session.timer is not None:
            session.timer.cancel()
            session.timer = None
        return session

    def _expire(self, domain: str, session: _Session) -> None:
        idle = self._idle.get(domain, [])
        if session in idle:
            idle.remove(session)
            if not idle:
                self._idle.pop(domain, None)
            self._close_later(session)

    def _close_later(self, session: _Session) -> None:
        task = asyncio.get_running_loop().create_task(_quit_and_close(session.client))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """QUIT every kept session (at shutdown)."""
        sessions = [s for idle in self._idle.values() for s in idle]
        self._idle.clear()
        for s in sessions:
            if s.timer is not None:
                s.timer.cancel()
        await asyncio.gather(*(_quit_and_close(s.client) for s in sessions),
                             *list(self._closing), return_exceptions=True)

    async def _deliver_reused(
        self, domain: str, sender: str, recipients: Sequence[str], message: Message
    ) -> dict[str, Reply] | None:
        """Deliver over a kept session of `domain`, or None to open a new one.

        A kept session that fails before DATA (the server timed it out,
        refuses RSET, drops the line) is closed and the message goes the
        normal way, so reuse never turns into a failure of its own.
        """
        while (session := self._take(domain)) is not None:
            client, mta = session.client, session.mta
            try:
                if not client.is_connected:
                    raise aiosmtplib.SMTPServerDisconnected("closed while idle")
                await client.rset()
                results = await self._transaction(client, mta, sender, recipients, message)
            except DomainFailure as exc:
                if exc.result.permanent:  # a real answer of the server about this mail
                    self._close_later(session)
                    return dict.fromkeys(recipients, exc.result)
                self._close_later(session)
                continue
            except (aiosmtplib.SMTPException, OSError) as exc:
                log.debug("kept session to %s for %s unusable: %s", mta, domain, exc)
                client.close()
                continue
            session.uses += 1
            log.debug("%s: message %d on a kept session to %s", domain, session.uses, mta)
            if not (_reusable(client, results) and self._park(domain, session)):
                self._close_later(session)
            return results
        return None


class _TLSFailed(Exception):
    def __init__(self, verified: bool = False) -> None:
        super().__init__()
        self.verified = verified  # only the certificate was refused: TLS may work unchecked


def _failure(exc: aiosmtplib.SMTPResponseException, mta: str, stage: str) -> DomainFailure:
    code = exc.code if 400 <= exc.code < 600 else 451
    # A 5xx at greeting or HELO is about this host, not the mail: try the next one.
    if stage in ("greeting", "HELO") and code >= 500:
        code = 451
    if code == exc.code:
        return DomainFailure(code, _flat(exc.message), mta, remote=True)
    return DomainFailure(code, f"{exc.code} {_flat(exc.message)}", mta)


def _flat(text: str) -> str:
    return " ".join(text.split())


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await asyncio.wait_for(client.quit(), 10)
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        pass


async def _quit_and_close(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        await _quit(client)
    client.close()


def _reusable(client: aiosmtplib.SMTP, results: dict[str, Reply]) -> bool:
    """A session is kept only after a clean transaction (no 421, no local failure)."""
    return client.is_connected and all(
        r.code != 421 and r.remote for r in results.values()
    )


def _is_local_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `addr` belongs to this machine: only then can a socket bind to it."""
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(addr), 0))
    except OSError:
        return False
    return True
