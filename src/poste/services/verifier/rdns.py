"""Forward-confirmed reverse DNS of the connecting peer (FCrDNS).

A PTR name alone is whatever the owner of the address block wrote; it only
means something once the name's own A/AAAA records contain the address
again.  The name found here goes into the `Received:` field (`from HELO
(name [ip])`), so a missing or slow answer just leaves the peer unnamed:
it never delays the greeting by more than a short timeout and never
refuses a connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import weakref

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import dns.reversename

from poste.dns.resolver import SyncResolver, TTLMemo
from poste.smtp.address import ip_of

log = logging.getLogger("poste.verifier")

MAX_NAMES = 10  # PTR names tried, as for SPF's ptr mechanism (RFC 7208 4.6.4)
TIMEOUT = 3.0  # whole lookup, PTR and confirmation; the client waits for our greeting


def async_twin(resolver: SyncResolver) -> dns.asyncresolver.Resolver:
    """An async resolver asking the same servers as `resolver` (which runs in threads).

    Lookups done before the greeting must not hold a worker thread each:
    a burst of connections would starve the SPF and DKIM work of the pool.
    """
    twin = dns.asyncresolver.Resolver(configure=False)
    servers: list[str | dns.nameserver.Nameserver] = []
    for ns in resolver.nameservers:
        if isinstance(ns, str):
            servers.append(
                dns.nameserver.Do53Nameserver(ns, resolver.nameserver_ports.get(ns, resolver.port))
            )
        elif isinstance(ns, dns.nameserver.Do53Nameserver):
            servers.append(dns.nameserver.Do53Nameserver(ns.address, ns.port))
        else:
            servers.append(ns)
    twin.nameservers = servers
    twin.timeout = resolver.timeout
    twin.lifetime = resolver.lifetime
    twin.cache = dns.resolver.LRUCache()
    return twin


async def confirmed_name(
    resolver: dns.asyncresolver.Resolver, ip: str, *, tcp: bool = False, timeout: float = TIMEOUT
) -> str | None:
    """The first PTR name of `ip` whose A/AAAA records hold `ip`, or None.

    None also for every DNS failure and after `timeout` seconds in all.
    """
    addr = ip_of(ip)
    if addr is None:
        return None
    memo = _memo_of(resolver)
    hit = memo.get(addr) if resolver.cache is not None else None
    if hit is not None:
        return hit[0]  # type: ignore[no-any-return]
    until = [float("inf")]  # the first expiry of the answers the name was found with
    try:
        async with asyncio.timeout(timeout):
            name = await _confirmed(resolver, addr, tcp, timeout, until)
    except (TimeoutError, dns.exception.DNSException, OSError) as exc:
        log.debug("no rDNS for %s: %s", ip, exc.__class__.__name__)
        return None
    if resolver.cache is not None and until[0] < float("inf"):
        memo.put(addr, (name,), until[0])  # (name,): a name that is None is kept too
    return name


_memos: weakref.WeakKeyDictionary[dns.asyncresolver.Resolver, TTLMemo] = (
    weakref.WeakKeyDictionary()
)


def _memo_of(resolver: dns.asyncresolver.Resolver) -> TTLMemo:
    """Each resolver's names found, kept until the first answer they came from expires.

    Two lookups through dnspython's cache cost ~80 µs per connection even when both
    answers are cached (3% of `poste up`'s CPU at 5 KB, one connection per mail:
    issue 16); a name kept here never outlives its answers' TTL, as in the cache.
    """
    memo = _memos.get(resolver)
    if memo is None:
        memo = _memos[resolver] = TTLMemo()
    return memo


async def _confirmed(
    resolver: dns.asyncresolver.Resolver,
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
    tcp: bool,
    timeout: float,
    until: list[float],
) -> str | None:
    lifetime = min(timeout, resolver.lifetime)
    qtype = "AAAA" if addr.version == 6 else "A"
    ptr = await resolver.resolve(
        dns.reversename.from_address(str(addr)),
        "PTR",
        raise_on_no_answer=False,
        search=False,
        lifetime=lifetime,
        tcp=tcp,
    )
    until[0] = min(until[0], ptr.expiration)
    if ptr.rrset is None:
        return None
    for rdata in list(ptr.rrset)[:MAX_NAMES]:
        name = rdata.target
        try:
            answer = await resolver.resolve(
                name, qtype, raise_on_no_answer=False, search=False, lifetime=lifetime, tcp=tcp
            )
        except dns.exception.DNSException:
            until[0] = 0.0  # not kept: what the next try finds may differ
            continue  # this name is not confirmed; another one may be
        until[0] = min(until[0], answer.expiration)
        if answer.rrset is None:
            continue
        if any(ipaddress.ip_address(r.address) == addr for r in answer.rrset):
            text: str = name.to_text(omit_final_dot=True)
            return text
    return None
