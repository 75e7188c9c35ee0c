"""One DNS resolver for every service, built from `--nameserver` flags.

A flag is `[tcp:|udp:]IP[:PORT]` (ptt's form); IPv6 addresses go in brackets
when a port follows (`[::1]:53`).  With no flag, the system's resolv.conf is
used.
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver


class NameserverError(ValueError):
    pass


class NotCached(Exception):
    """`SyncResolver.resolve_cached`: the answer is not in the cache (not a DNS error)."""


class CacheMiss(dns.exception.DNSException):
    """`resolve` inside `SyncResolver.cached_only()` found no answer in the cache.

    A DNS error to the code that asked (SPF, DKIM and DMARC turn it into `temperror`),
    so that code needs no change; the `cached_only` block's counter says the result
    is not to be used, and the caller runs it again where lookups may wait.
    """

    msg = "not in the cache"


class _Misses:
    """How many lookups of a `cached_only` block missed the cache."""

    def __init__(self) -> None:
        self.count = 0

    def __bool__(self) -> bool:
        return self.count > 0


class TTLMemo:
    """Values computed from DNS answers, each kept until the first of those answers
    expires (`time.time()`, as dnspython's `Answer.expiration`), at most SIZE of them.

    dnspython's cached lookup costs ~40 µs even on a hit (its `_Resolution`, a `Name`
    from text, an NXDOMAIN built and raised): what poste derives from answers per mail
    or per connection (a DMARC policy, a confirmed rDNS name) is kept here instead,
    never longer than the answers' TTL (issue 16).  `get` gives None for a miss: keep
    a value that may itself be None inside a tuple.
    """

    SIZE = 4096

    def __init__(self) -> None:
        self._kept: dict[Hashable, tuple[float, Any]] = {}

    def get(self, key: Hashable) -> Any | None:
        hit = self._kept.get(key)
        if hit is None or hit[0] <= time.time():
            return None
        return hit[1]

    def put(self, key: Hashable, value: Any, expires: float) -> None:
        if expires <= time.time():
            return  # nothing left to keep
        if len(self._kept) >= self.SIZE:
            self._kept.clear()  # bounded; refilled from dnspython's cache on the next lookups
        self._kept[key] = (expires, value)


_mode = threading.local()  # `cached_only` is per thread: the event loop's, not the pool's


@dataclass(frozen=True)
class Nameserver:
    ip: str
    port: int = 53
    tcp: bool = False

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{'tcp' if self.tcp else 'udp'}:{host}:{self.port}"


def parse_nameserver(spec: str) -> Nameserver:
    """Parse `[tcp:|udp:]IP[:PORT]`; raises NameserverError with a one-line reason."""
    text = spec.strip()
    tcp = False
    low = text.lower()
    if low.startswith("tcp:"):
        tcp, text = True, text[4:]
    elif low.startswith("udp:"):
        text = text[4:]
    port = 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise NameserverError(f"bad nameserver {spec!r}: missing ']'")
        if rest:
            if not rest.startswith(":"):
                raise NameserverError(f"bad nameserver {spec!r}")
            port = _port(rest[1:], spec)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p, spec)
    else:
        host = text
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise NameserverError(f"bad nameserver {spec!r}: {host!r} is not an IP address") from None
    return Nameserver(host, port, tcp)


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise NameserverError(f"bad nameserver {spec!r}: bad port {text!r}")
    return int(text)


def _point(
    resolver: dns.resolver.BaseResolver, nameservers: list[Nameserver] | None, timeout: float
) -> bool:
    """Aim a dnspython resolver at our nameservers; returns whether to use TCP.

    Nameserver objects (not bare IPs) keep each server's own port, so two
    servers on one address but different ports stay distinct.
    """
    if nameservers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ns.ip, ns.port) for ns in nameservers]
    resolver.lifetime = timeout
    resolver.timeout = timeout
    return any(ns.tcp for ns in nameservers or [])


class Resolver(dns.asyncresolver.Resolver):
    """dnspython's async resolver, pointed at our nameservers, TCP when asked."""

    def __init__(self, nameservers: list[Nameserver] | None = None, timeout: float = 5.0) -> None:
        super().__init__(configure=not nameservers)
        self.use_tcp = _point(self, nameservers, timeout)
        self.cache = dns.resolver.LRUCache()

    async def resolve(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        kwargs.setdefault("tcp", self.use_tcp)
        return await super().resolve(*args, **kwargs)


class SyncResolver(dns.resolver.Resolver):
    """The same nameservers for code that must be synchronous (pyspf runs in a thread).

    Answers are cached by TTL, as in the async twin: the relay's forward plan asked
    nsd for the author domain's DMARC record on every mail (8% of `poste up`'s CPU at
    5 KB, issue 16).  dnspython's LRU cache is thread-safe.
    """

    def __init__(self, nameservers: list[Nameserver] | None = None, timeout: float = 5.0) -> None:
        super().__init__(configure=not nameservers)
        self.use_tcp = _point(self, nameservers, timeout)
        self.cache = dns.resolver.LRUCache()
        self._memo = TTLMemo()

    def resolve(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        misses = getattr(_mode, "misses", None)
        if misses is not None:
            return self._from_cache(misses, *args, **kwargs)
        kwargs.setdefault("tcp", self.use_tcp)
        return super().resolve(*args, **kwargs)

    @contextlib.contextmanager
    def cached_only(self) -> Iterator[_Misses]:
        """Within the block, on this thread, `resolve` answers from the cache alone and
        raises CacheMiss (counted) for anything else: blocking code whose lookups are
        all cached (most mail: the same senders' domains) can run on the event loop,
        and a result made while one missed is thrown away by the caller."""
        misses = _Misses()
        outer = getattr(_mode, "misses", None)
        _mode.misses = misses
        try:
            yield misses
        finally:
            _mode.misses = outer

    def _from_cache(  # the signature of dnspython's Resolver.resolve
        self, misses: _Misses, qname: dns.name.Name | str,
        rdtype: dns.rdatatype.RdataType | str = dns.rdatatype.A,
        rdclass: dns.rdataclass.RdataClass | str = dns.rdataclass.IN,
        tcp: bool = False, source: str | None = None, raise_on_no_answer: bool = True,
        source_port: int = 0, lifetime: float | None = None, search: bool | None = None,
    ) -> dns.resolver.Answer:
        plain = (dns.rdataclass.RdataClass.make(rdclass) == dns.rdataclass.IN
                 and not (self.use_search_by_default if search is None else search))
        try:
            if not plain:  # what resolve_cached does not do the same way: ask for real
                raise NotCached(str(qname))
            return self.resolve_cached(qname, rdtype, raise_on_no_answer=raise_on_no_answer)
        except NotCached:
            misses.count += 1
            raise CacheMiss() from None  # type: ignore[no-untyped-call]

    def memo_get(self, key: Hashable) -> Any | None:
        """A value computed from cached answers, while the first of them lives (else None):
        the forward plan's DMARC policy, two lookups per mail, was 6% of `poste up`'s CPU
        at 5 KB (issue 16).  Nothing is kept when the resolver keeps no cache."""
        return None if self.cache is None else self._memo.get(key)

    def memo_put(self, key: Hashable, value: Any, expires: float) -> None:
        """Keep `value` until `expires` (time.time(), as dnspython's `Answer.expiration`)."""
        if self.cache is not None:
            self._memo.put(key, value, expires)

    def nxdomain_expiration(self, qname: str) -> float:
        """When the cached NXDOMAIN of `qname` expires (0: not cached)."""
        if self.cache is None:
            return 0.0
        entry = self.cache.get((dns.name.from_text(qname), dns.rdatatype.ANY, dns.rdataclass.IN))
        return float(entry.expiration) if entry is not None else 0.0

    def resolve_cached(
        self, qname: dns.name.Name | str, rdtype: dns.rdatatype.RdataType | str, *,
        raise_on_no_answer: bool = True,
    ) -> dns.resolver.Answer:
        """The answer `resolve` would give from the cache alone, never a network wait.

        Raises NotCached when the cache does not have it (then ask `resolve`, off
        the event loop), and NXDOMAIN/NoAnswer when the cache has those.  So a
        caller on the event loop answers from the cache and takes the trip to a
        thread only for what is not cached.  dnspython's own first step of
        `resolve` (its `_Resolution`, pinned in the locks), without the rest.
        """
        key = ("answer", qname, rdtype, raise_on_no_answer)
        kept = self.memo_get(key)  # the same Answer the cache would give, without its lookup
        if kept is not None:
            return kept  # type: ignore[no-any-return]
        resolution = dns.resolver._Resolution(
            self, qname, rdtype, dns.rdataclass.IN, self.use_tcp, raise_on_no_answer, False
        )
        _request, answer = resolution.next_request()
        if answer is None:
            raise NotCached(f"{qname} {rdtype}")
        self.memo_put(key, answer, float(answer.expiration))
        return answer


def make_resolver(specs: list[str] | tuple[str, ...], timeout: float = 5.0) -> Resolver:
    return Resolver([parse_nameserver(s) for s in specs], timeout)


def make_sync_resolver(specs: list[str] | tuple[str, ...], timeout: float = 5.0) -> SyncResolver:
    return SyncResolver([parse_nameserver(s) for s in specs], timeout)
