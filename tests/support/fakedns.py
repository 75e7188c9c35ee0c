"""A tiny programmable DNS server on loopback (UDP and TCP), for tests.

Knot serves ordinary zones; this one serves what an authoritative server
will not: answers that never come (timeouts), answers that come late, and
odd records (empty TXT, non-ASCII bytes) — over real sockets, so the code
under test goes through its real DNS stack.

A *lookup function* decides each answer: it gets (qname, qtype) and returns
an `Answer` (records + rcode, optional delay) or `DROP` (no answer at all).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset


@dataclass
class Answer:
    rrsets: list[dns.rrset.RRset] = field(default_factory=list)
    rcode: int = dns.rcode.NOERROR
    delay: float = 0.0


DROP = None  # a lookup function returns DROP to make the query time out

Lookup = Callable[[str, int], Answer | None]


def rrset(
    name: str, rdtype: str | int, *values: str | bytes | list[bytes], ttl: int = 60
) -> dns.rrset.RRset:
    """An RRset from presentation values; a TXT/SPF value is one string, bytes or a list of bytes."""
    typ = dns.rdatatype.from_text(rdtype) if isinstance(rdtype, str) else rdtype
    rs = dns.rrset.RRset(owner(name), dns.rdataclass.IN, typ)
    rs.update_ttl(ttl)
    for v in values:
        if typ in (dns.rdatatype.TXT, dns.rdatatype.SPF):
            # a str is one character-string (not zone-file text split on spaces)
            strings = (
                [v.encode()] if isinstance(v, str) else [v] if isinstance(v, bytes) else list(v)
            )
            rd = _txt(typ, strings)
        else:
            assert isinstance(v, str)
            rd = dns.rdata.from_text(dns.rdataclass.IN, typ, v)
        rs.add(rd)
    return rs


def _txt(typ: int, strings: list[bytes]) -> dns.rdata.Rdata:
    wire = b"".join(bytes([len(s)]) + s for s in strings)
    if not strings:  # zero strings: illegal but seen in the wild; build it raw
        return dns.rdata.GenericRdata(dns.rdataclass.IN, typ, b"")
    return dns.rdata.from_wire(dns.rdataclass.IN, typ, wire, 0, len(wire))


def records_lookup(
    records: dict[str, list[tuple[str, str | bytes]]],
    *,
    delays: dict[str, float] | None = None,
    dead: set[str] | None = None,
) -> Lookup:
    """A simple lookup: name -> [(type, value)]; names in `delays` answer late, in `dead` never."""
    table = {k.rstrip(".").lower(): v for k, v in records.items()}
    delays = {k.rstrip(".").lower(): v for k, v in (delays or {}).items()}
    dead = {k.rstrip(".").lower() for k in (dead or set())}

    def lookup(qname: str, qtype: int) -> Answer | None:
        name = qname.rstrip(".").lower()
        if name in dead:
            return DROP
        delay = delays.get(name, 0.0)
        if name not in table:
            return Answer(rcode=dns.rcode.NXDOMAIN, delay=delay)
        out = []
        for typ, value in table[name]:
            if dns.rdatatype.from_text(typ) == qtype:
                out.append(rrset(name + ".", typ, value))
        return Answer(rrsets=out, delay=delay)

    return lookup


class FakeDNS:
    """Serve `lookup` on host:port over UDP and TCP from background threads."""

    def __init__(self, lookup: Lookup, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.lookup = lookup
        self.host = host
        self.port = port or 0  # 0: the kernel picks one at start() (UDP, then TCP beside it)
        self.queries: list[tuple[str, str]] = []  # (name, type) seen, for assertions
        self.errors: list[str] = []  # exceptions raised while answering
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        for _ in range(50 if not self.port else 1):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                udp.bind((self.host, self.port))
                tcp.bind((self.host, udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                if self.port:
                    raise
                continue
            break
        else:
            raise RuntimeError(f"no port free for both UDP and TCP on {self.host}")
        self.port = int(udp.getsockname()[1])
        self._udp, self._tcp = udp, tcp
        self._udp.settimeout(0.2)
        self._tcp.listen(16)
        self._tcp.settimeout(0.2)
        for target in (self._serve_udp, self._serve_tcp):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()

    def __enter__(self) -> FakeDNS:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _respond(self, wire: bytes, max_size: int | None) -> bytes | None:
        try:
            return self._respond1(wire, max_size)
        except Exception as exc:  # a broken test zone must show, not look like a timeout
            self.errors.append(repr(exc))
            raise

    def _respond1(self, wire: bytes, max_size: int | None) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        q = query.question[0]
        self.queries.append((_plain(q.name).lower(), dns.rdatatype.to_text(q.rdtype)))
        answer = self.lookup(_plain(q.name), q.rdtype)
        if answer is None:
            return None
        if answer.delay:
            if self._stop.wait(answer.delay):
                return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.RA
        response.set_rcode(answer.rcode)
        response.answer.extend(answer.rrsets)
        if max_size is None:
            return response.to_wire()
        limit = max(512, query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    def _serve_udp(self) -> None:
        assert self._udp is not None
        while not self._stop.is_set():
            try:
                wire, addr = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._udp_one, args=(wire, addr), daemon=True).start()

    def _udp_one(self, wire: bytes, addr: tuple[str, int]) -> None:
        reply = self._respond(wire, 512)
        if reply is not None and self._udp is not None:
            with contextlib.suppress(OSError):
                self._udp.sendto(reply, addr)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                while not self._stop.is_set():
                    head = _recv_exact(conn, 2)
                    if head is None:
                        return
                    wire = _recv_exact(conn, struct.unpack("!H", head)[0])
                    if wire is None:
                        return
                    reply = self._respond(wire, None)
                    if reply is None:
                        time.sleep(0.05)
                        continue
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                return


def _plain(name: dns.name.Name) -> str:
    """The name as raw text, no escapes (test zones have names with spaces and '%')."""
    return ".".join(label.decode("latin-1") for label in name.labels if label)


def owner(text: str) -> dns.name.Name:
    """An absolute name from raw text, splitting on dots only."""
    labels = [label.encode("latin-1") for label in text.rstrip(".").split(".") if label]
    return dns.name.Name([*labels, b""])


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


@contextlib.contextmanager
def fake_dns(
    lookup: Lookup, *, host: str = "127.0.0.1", port: int | None = None
) -> Iterator[FakeDNS]:
    server = FakeDNS(lookup, host=host, port=port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
