"""SPF (RFC 7208) through pyspf, with its DNS going through poste's resolver.

pyspf is synchronous and looks names up through one module-level function,
`spf.DNSLookup`.  We install a dispatcher there once; it finds the resolver of
the evaluation running on the *current thread* (a thread-local), so
evaluations with different nameservers can run side by side in worker threads
and the event loop never waits on pyspf.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.resolver
import spf as pyspf

from poste.dns.resolver import SyncResolver, make_sync_resolver
from poste.services.verifier import workers
from poste.smtp.address import ip_of

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")

# RFC 7208 4.6.4: at most 20 seconds for the whole evaluation.
TOTAL_TIME = 20.0

_local = threading.local()
_install_lock = threading.Lock()
_original_lookup: Any = None


def _answers(resolver: SyncResolver, name: str, qtype: str, timeout: float) -> list[Any]:
    """One lookup in the shape pyspf expects: [((name, type), value), ...].

    NXDOMAIN and NODATA are an empty list (pyspf counts it as a void
    lookup); every other DNS failure is pyspf's TempError, so a broken
    resolver yields `temperror`, never an exception out of the check.
    """
    try:
        answer = resolver.resolve(  # type: ignore[no-untyped-call]
            name,
            qtype,
            lifetime=max(min(timeout, resolver.lifetime), 0.1),
            raise_on_no_answer=False,
            search=False,
        )
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel):
        return []  # a name that cannot exist in the DNS has no records
    except dns.exception.Timeout:
        raise pyspf.TempError(f"DNS timeout for {name} {qtype}") from None
    except dns.resolver.NoNameservers:
        raise pyspf.TempError(f"DNS servers failed for {name} {qtype}") from None
    except (dns.exception.DNSException, OSError) as exc:
        raise pyspf.TempError(f"DNS {exc.__class__.__name__} for {name} {qtype}") from None
    out: list[Any] = []
    if answer.rrset is None:
        return out
    for rdata in answer.rrset:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange.to_text(True))))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), list(rdata.strings)))
    return out


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[Any]:
    resolver: SyncResolver | None = getattr(_local, "resolver", None)
    if resolver is None:  # someone else using pyspf directly in this process
        return list(_original_lookup(name, qtype, strict, timeout))
    return _answers(resolver, name, qtype, float(timeout))


def _install() -> None:
    global _original_lookup
    with _install_lock:
        if pyspf.DNSLookup is not _dispatch:
            _original_lookup = pyspf.DNSLookup
            pyspf.DNSLookup = _dispatch


class _Query(pyspf.query):  # type: ignore[misc]
    """pyspf's query, with RFC 7208 section 5.5 on DNS errors while validating PTR names."""

    def validated_ptrs(self) -> list[str]:
        # "If a DNS error occurs while doing an A RR lookup, then that domain
        # name is skipped and the search continues" (5.5): pyspf lets the
        # TempError end the whole evaluation instead.
        if self.strict > 1:
            return list(super().validated_ptrs())
        limit = pyspf.MAX_PTR if self.strict else pyspf.MAX_PTR * 4
        names: list[str] = []
        for name in self.dns_ptr(self.i)[:limit]:
            try:
                addresses = self.dns_a(name, self.A)
            except pyspf.TempError:
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                names.append(name)
        return names


@dataclass(frozen=True)
class SPFResult:
    result: str  # one of RESULTS
    identity: str  # "mailfrom" or "helo"
    domain: str  # the domain checked (MAIL FROM's, or the HELO name)
    client_ip: str
    sender: str  # MAIL FROM as given ("" for <>)
    helo: str
    explanation: str = ""  # pyspf's explanation (exp= or default text)
    mechanism: str = ""  # the mechanism that matched, when one did
    problem: str = ""  # why, for permerror/temperror

    def comment(self, receiver: str) -> str:
        who = f"domain of {self.domain}" if self.identity == "mailfrom" else f"helo {self.domain}"
        ip = self.client_ip
        text = {
            "pass": f"{who} designates {ip} as permitted sender",
            "fail": f"{who} does not designate {ip} as permitted sender",
            "softfail": f"transitioning {who} does not designate {ip} as permitted sender",
            "neutral": f"{ip} is neither permitted nor denied by {who}",
            "none": f"{who} does not designate permitted sender hosts",
            "permerror": f"permanent error in processing {who}: {self.problem}",
            "temperror": f"temporary error in processing {who}: {self.problem}",
        }[self.result]
        return f"{receiver}: {text}"

    def received_spf(self, receiver: str) -> str:
        """The value of a `Received-SPF:` field, RFC 7208 section 9.1 (folded once)."""
        pairs = [("client-ip", self.client_ip)]
        if self.sender:  # also when the HELO identity decided: the reader wants both
            pairs.append(("envelope-from", self.sender))
        if self.helo:
            pairs.append(("helo", self.helo))
        pairs.append(("receiver", receiver))
        if self.mechanism and self.result not in ("permerror", "temperror", "none"):
            pairs.append(("mechanism", self.mechanism))
        if self.problem and self.result in ("permerror", "temperror"):
            pairs.append(("problem", self.problem))
        pairs.append(("identity", self.identity))
        kv = "; ".join(f"{k}={_kv_value(v)}" for k, v in pairs)
        return f"{self.result} ({_comment_text(self.comment(receiver))})\r\n\t{kv}"

    def field(self, receiver: str) -> str:
        """The whole field, folded after the comment, without the final CRLF."""
        return f"Received-SPF: {self.received_spf(receiver)}"


_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


def _kv_value(value: str) -> str:
    """A key-value-pair value: dot-atom as is, anything else a quoted-string."""
    if _DOT_ATOM.match(value):
        return value
    cleaned = "".join(c if 32 <= ord(c) < 127 else "?" for c in value)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment_text(text: str) -> str:
    cleaned = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return cleaned.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _identity(sender: str, helo: str) -> tuple[str, str, str]:
    """(identity, local-part, domain) that pyspf must evaluate, RFC 7208 2.4 and 4.3.

    The domain is what follows the *last* "@" (a quoted local part may hold
    one); a sender with no "@" at all is taken as a bare domain, as pyspf
    does.  Reporting another domain than the one evaluated would let a
    sender's own SPF pass be counted for the HELO name in DMARC alignment.
    """
    if not sender:
        return "helo", "postmaster", helo
    local, at, domain = sender.rpartition("@")
    if not at:
        return "mailfrom", "postmaster", sender
    return "mailfrom", local or "postmaster", domain


_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def helo_checkable(helo: str) -> bool:
    """Whether the HELO name can be an SPF identity (RFC 7208 2.3).

    Only a fully qualified domain name is: an address literal, a bare word
    or anything else that is not a hostname is skipped (no result), so a
    client that greets with `[192.0.2.1]` costs no DNS lookup.
    """
    name = helo.rstrip(".")
    if not name or len(name) > 253 or "." not in name:
        return False
    labels = name.split(".")
    return all(_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def check_sync(
    ip: str,
    sender: str,
    helo: str,
    resolver: SyncResolver,
    *,
    receiver: str = "unknown",
    default_explanation: str | None = None,
    total_time: float = TOTAL_TIME,
    strict: bool | int = True,
    identity: str = "mailfrom",
) -> SPFResult:
    """Evaluate SPF on this thread (blocking); `check` is the async entry point.

    The identity is MAIL FROM, or `postmaster@HELO` for the null sender
    (RFC 7208 2.4); with `identity="helo"` it is the HELO name whatever the
    sender (RFC 7208 2.3), the sender still being reported.  Never raises
    on DNS trouble: that is `temperror`.
    """
    _install()
    if identity == "helo":
        identity, local, domain = _identity("", helo)
    else:
        identity, local, domain = _identity(sender, helo)
    client_ip = normal_ip(ip)
    _local.resolver = resolver
    try:
        q = _Query(
            i=client_ip,
            s=sender if identity == "mailfrom" else "",
            h=helo,
            receiver=receiver,
            strict=strict,
            timeout=total_time,
            querytime=total_time,
        )
        # pyspf splits the sender at its first "@"; evaluate what we report
        q.l, q.o, q.d = local, domain, domain
        if default_explanation is not None:
            q.set_default_explanation(default_explanation)
        try:
            result, _code, explanation = q.check()
        except pyspf.TempError as exc:  # raised outside check()'s own handler
            result, explanation = "temperror", f"SPF Temporary Error: {exc}"
            q.prob = str(exc)
        except pyspf.AmbiguityWarning as exc:
            result, explanation = "permerror", f"SPF Permanent Error: {exc}"
            q.prob = str(exc)
    except pyspf.PermError as exc:  # e.g. a malformed client IP
        return SPFResult("permerror", identity, domain, client_ip, sender, helo, problem=str(exc))
    finally:
        _local.resolver = None
    result = {"unknown": "permerror", "error": "temperror"}.get(result, result)
    mechanism = getattr(q, "mechanism", "") or ""
    problem = ""
    if result in ("permerror", "temperror"):
        problem = str(getattr(q, "prob", "") or explanation)
    return SPFResult(
        result,
        identity,
        domain,
        client_ip,
        sender,
        helo,
        explanation=explanation or "",
        mechanism=str(mechanism),
        problem=problem,
    )


def normal_ip(ip: str) -> str:
    """The address as SPF sees it: an IPv4-mapped IPv6 address is the IPv4 one."""
    addr = ip_of(ip)
    return ip if addr is None else str(addr)


async def check(
    ip: str,
    sender: str,
    helo: str,
    resolver: SyncResolver,
    *,
    receiver: str = "unknown",
    default_explanation: str | None = None,
    total_time: float = TOTAL_TIME,
    strict: bool | int = True,
    identity: str = "mailfrom",
) -> SPFResult:
    """Evaluate SPF off the event loop, on the auth thread pool."""
    return await workers.run(
        lambda: check_sync(
            ip,
            sender,
            helo,
            resolver,
            receiver=receiver,
            default_explanation=default_explanation,
            total_time=total_time,
            strict=strict,
            identity=identity,
        ),
    )


class TolerantNameserver(dns.nameserver.Do53Nameserver):
    """Plain DNS over UDP/TCP that keeps the usable part of an answer with a bad record.

    dnspython refuses a whole answer when one record in it is malformed (an
    empty TXT with no strings, say) and, over UDP, silently waits for a
    better one until it times out.  SPF must not turn a domain's odd
    unrelated record into `temperror` (RFC 7208 test suite, `null-text`), so
    the answer is parsed with `continue_on_error`: bad records are dropped,
    the rest is used.
    """

    def query(  # type: ignore[override]
        self,
        request: dns.message.QueryMessage,
        timeout: float,
        source: str | None,
        source_port: int,
        max_size: bool,
        one_rr_per_rrset: bool = False,
        ignore_trailing: bool = False,
    ) -> dns.message.Message:
        try:
            return self._query(request, timeout, source, source_port, max_size)
        except TimeoutError:
            # a socket timeout is dnspython's Timeout: the server is slow or
            # drops queries (retried within the lifetime, reported as a
            # timeout), not broken (an OSError takes it out of the answer)
            raise dns.exception.Timeout(timeout=timeout) from None  # type: ignore[no-untyped-call]

    def _query(
        self,
        request: dns.message.QueryMessage,
        timeout: float,
        source: str | None,
        source_port: int,
        max_size: bool,
    ) -> dns.message.Message:
        family = dns.inet.af_for_address(self.address)
        expiration = time.monotonic() + timeout
        wire = request.to_wire()
        with socket.socket(family, socket.SOCK_STREAM if max_size else socket.SOCK_DGRAM) as sock:
            if source or source_port:
                sock.bind(
                    (source or ("::" if family == socket.AF_INET6 else "0.0.0.0"), source_port)
                )
            sock.settimeout(timeout)
            sock.connect((self.address, self.port))
            if max_size:
                sock.sendall(struct.pack("!H", len(wire)) + wire)
                (length,) = struct.unpack("!H", _recv_exact(sock, 2, expiration))
                return self._parse(request, _recv_exact(sock, length, expiration), False)
            sock.send(wire)
            while True:
                sock.settimeout(_remaining(expiration))
                data = sock.recv(65535)
                try:
                    response = self._parse(request, data, True)
                except dns.message.Truncated:
                    raise
                except dns.exception.FormError:
                    continue  # junk on our socket: keep waiting, as dnspython does
                if request.is_response(response):
                    return response

    @staticmethod
    def _parse(request: dns.message.Message, data: bytes, udp: bool) -> dns.message.Message:
        response = dns.message.from_wire(
            data,
            raise_on_truncation=udp,
            continue_on_error=True,
        )
        if not request.is_response(response) and not udp:
            raise dns.query.BadResponse
        return response


def _remaining(expiration: float) -> float:
    left = expiration - time.monotonic()
    if left <= 0:
        raise dns.exception.Timeout
    return left


def _recv_exact(sock: socket.socket, n: int, expiration: float) -> bytes:
    buf = b""
    while len(buf) < n:
        sock.settimeout(_remaining(expiration))
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("DNS server closed the connection")
        buf += chunk
    return buf


def resolver_for(nameservers: Iterable[str], timeout: float = 5.0) -> SyncResolver:
    """The resolver SPF uses for these `--nameserver` flags (system resolver when none)."""
    resolver = make_sync_resolver(list(nameservers), timeout)
    tolerant: list[str | dns.nameserver.Nameserver] = []
    for ns in resolver.nameservers:
        if isinstance(ns, str):
            port = resolver.nameserver_ports.get(ns, resolver.port)
            tolerant.append(TolerantNameserver(ns, port))
        elif isinstance(ns, dns.nameserver.Do53Nameserver):
            tolerant.append(TolerantNameserver(ns.address, ns.port))
        else:
            tolerant.append(ns)
    resolver.nameservers = tolerant
    resolver.cache = dns.resolver.LRUCache()
    return resolver
