"""Deliver one message to the recipients of one destination domain over SMTP.

The relay's outgoing client differs from the filters' `SMTPHop`: it walks the
MX list (RFC 5321 5.1: by preference, equal preferences shuffled; no MX means
the domain's own A/AAAA; a null MX, RFC 7505, means the domain takes no mail),
tries every address of a host (IPv6 and IPv4), uses STARTTLS whenever offered
without checking the certificate (opportunistic, RFC 7435; a failed handshake
falls back to plain text), and returns one result per recipient, since each
RCPT can be accepted, deferred or refused on its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

log = logging.getLogger("poste.relay.delivery")


@dataclass
class Result:
    """What happened to one recipient in one attempt."""

    code: int
    text: str  # "250 2.0.0 Ok" style, or a description of a local failure
    remote_mta: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


class DomainFailure(Exception):
    """Every recipient of the domain gets the same result (no MX host could be used)."""

    def __init__(self, code: int, text: str, remote_mta: str = "") -> None:
        super().__init__(text)
        self.result = Result(code, text, remote_mta)


@dataclass
class Target:
    host: str  # MX name (for Remote-MTA and logs)
    address: str  # IP


def _tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Deliverer:
    """Delivers over SMTP to MX hosts found with `resolver`."""

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
    ) -> None:
        self.resolver = resolver
        self.helo = helo
        self.port = port
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.ipv6 = ipv6
        self.tls = tls
        self._tls_context = _tls_context()

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

    async def mx_hosts(self, domain: str) -> list[str]:
        """MX host names in the order to try them (implicit MX when there is none)."""
        try:
            answer = await self.resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise DomainFailure(550, f"5.1.2 Domain {domain} does not exist") from None
        except dns.resolver.NoAnswer:
            return [domain]  # implicit MX, RFC 5321 5.1
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
        hosts: list[str] = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            random.shuffle(group)
            hosts.extend(group)
        return hosts

    # -- SMTP --------------------------------------------------------------

    async def deliver(
        self, domain: str, sender: str, recipients: Sequence[str], message: bytes
    ) -> dict[str, Result]:
        """Try the MX hosts of `domain` until one gives a final answer for the recipients."""
        try:
            hosts = await self.mx_hosts(domain)
        except DomainFailure as exc:
            return dict.fromkeys(recipients, exc.result)
        last = Result(451, f"4.4.1 No MX host of {domain} could be reached")
        tried = 0
        for host in hosts:
            try:
                addrs = await self._addresses(host)
            except DomainFailure as exc:
                last = exc.result
                continue
            if not addrs:
                last = Result(451, f"4.4.4 MX host {host} has no address")
                continue
            for addr in addrs:
                tried += 1
                try:
                    return await self._session(Target(host, addr), sender, recipients, message)
                except DomainFailure as exc:
                    last = exc.result
                    log.info("delivery to %s [%s] for %s: %s", host, addr, domain, last.text)
                    if last.permanent:
                        return dict.fromkeys(recipients, last)
        if not tried and not hosts:
            last = Result(451, f"4.4.4 No MX host for {domain}")
        return dict.fromkeys(recipients, last)

    async def _session(
        self, target: Target, sender: str, recipients: Sequence[str], message: bytes
    ) -> dict[str, Result]:
        try:
            return await self._try(target, sender, recipients, message, tls=self.tls)
        except _TLSFailed:
            return await self._try(target, sender, recipients, message, tls=False)

    async def _try(
        self,
        target: Target,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        tls: bool,
    ) -> dict[str, Result]:
        mta = target.host
        client = aiosmtplib.SMTP(
            hostname=target.address,
            port=self.port,
            local_hostname=self.helo,
            timeout=self.timeout,
            start_tls=False,
            validate_certs=False,
        )
        try:
            try:
                await client.connect(timeout=self.connect_timeout)
            except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, OSError) as exc:
                raise DomainFailure(451, f"4.4.1 Connection to {mta} failed: {exc}", mta) from None
            except aiosmtplib.SMTPResponseException as exc:
                raise _failure(exc, mta, "greeting") from None
            await self._hello(client, mta)
            if tls and client.supports_extension("starttls"):
                try:
                    await client.starttls(tls_context=self._tls_context, validate_certs=False)
                except aiosmtplib.SMTPResponseException:
                    raise _TLSFailed() from None
                except (ssl.SSLError, aiosmtplib.SMTPException, OSError):
                    raise _TLSFailed() from None
                await self._hello(client, mta)
            options: list[str] = []
            if any(b > 127 for b in message) and client.supports_extension("8bitmime"):
                options.append("BODY=8BITMIME")
            needs_utf8 = not (sender + "".join(recipients)).isascii()
            if needs_utf8:
                if not client.supports_extension("smtputf8"):
                    raise DomainFailure(
                        553, "5.6.7 Destination does not support SMTPUTF8 addresses", mta
                    )
                options.append("SMTPUTF8")
            enc = "utf-8" if needs_utf8 else "ascii"
            try:
                await client.mail(sender, options=options, encoding=enc)
            except aiosmtplib.SMTPResponseException as exc:
                raise _failure(exc, mta, "MAIL FROM") from None
            results: dict[str, Result] = {}
            accepted: list[str] = []
            for rcpt in recipients:
                try:
                    resp = await client.rcpt(rcpt, encoding=enc)
                except aiosmtplib.SMTPResponseException as exc:
                    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
                        raise
                    results[rcpt] = Result(exc.code, f"{exc.code} {_flat(exc.message)}", mta)
                    continue
                accepted.append(rcpt)
                results[rcpt] = Result(resp.code, f"{resp.code} {_flat(resp.message)}", mta)
            if not accepted:
                await _quit(client)
                return results
            try:
                resp = await client.data(message)
                final = Result(resp.code, f"{resp.code} {_flat(resp.message)}", mta)
            except aiosmtplib.SMTPServerDisconnected as exc:
                final = Result(451, f"4.4.2 {mta} dropped the connection after DATA: {exc}", mta)
            except aiosmtplib.SMTPResponseException as exc:
                final = Result(exc.code, f"{exc.code} {_flat(exc.message)}", mta)
            except (aiosmtplib.SMTPException, OSError) as exc:
                final = Result(451, f"4.4.2 Lost connection with {mta} in DATA: {exc}", mta)
            for rcpt in accepted:
                results[rcpt] = final
            await _quit(client)
            return results
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            raise DomainFailure(451, f"4.4.2 Lost connection with {mta}: {exc}", mta) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise DomainFailure(451, f"4.4.2 SMTP error with {mta}: {exc}", mta) from None
        finally:
            client.close()

    async def _hello(self, client: aiosmtplib.SMTP, mta: str) -> None:
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            try:
                await client.helo()
            except aiosmtplib.SMTPResponseException as exc:
                raise _failure(exc, mta, "HELO") from None


class _TLSFailed(Exception):
    pass


def _failure(exc: aiosmtplib.SMTPResponseException, mta: str, stage: str) -> DomainFailure:
    code = exc.code if 400 <= exc.code < 600 else 451
    # A 5xx at greeting or HELO is about this host, not the mail: try the next one.
    if stage in ("greeting", "HELO") and code >= 500:
        code = 451
    return DomainFailure(code, f"{exc.code} {_flat(exc.message)}", mta)


def _flat(text: str) -> str:
    return " ".join(text.split())


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await asyncio.wait_for(client.quit(), 10)
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        pass
