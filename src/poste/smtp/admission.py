"""Who may hold a connection: fair shares per client, as Postfix's anvil gives them.

A single global cap lets one address take every slot (1,200 idle connections
from one host kept a poste MX unusable for everyone).  So, before the greeting
and before any TLS handshake is paid for, each connection is admitted against:
the global cap, a cap per client address, a cap per network (/24 for IPv4,
/64 for IPv6: one host often has a whole /64), and a rate of new connections
per client per minute.  Exempt networks (our own hops, the relay's granted
networks) skip the per-client caps and have a budget of their own, so an
attacker who fills the public share cannot starve the stack's own traffic.
"""

from __future__ import annotations

import collections
import ipaddress
import time
from dataclasses import dataclass

from poste.smtp.address import ip_of

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_EXEMPT = ("127.0.0.1/32", "::1/128")  # the address our own hops connect from


@dataclass(frozen=True)
class Fairness:
    max_per_client: int = 10  # concurrent connections from one address (0: no cap)
    max_per_network: int = 20  # concurrent connections from one /24 or /64 (0: no cap)
    max_rate_per_client: int = 120  # new connections per address per minute (0: no cap)
    exempt: tuple[str, ...] = DEFAULT_EXEMPT


def _network(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Network:
    prefix = 24 if addr.version == 4 else 64
    return ipaddress.ip_network(f"{addr}/{prefix}", strict=False)


class Ticket:
    """One admitted connection; `release()` gives its slots back (once, however often called)."""

    def __init__(self, gate: Admission, client: str, network: str, exempt: bool) -> None:
        self._gate = gate
        self.client = client
        self.network = network
        self.exempt = exempt
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate._release(self)


class Admission:
    """Counts held connections; `admit` says yes (a Ticket) or why not (a str)."""

    def __init__(self, max_connections: int, fairness: Fairness) -> None:
        self.max_connections = max_connections
        self.fairness = fairness
        self.exempt: list[Network] = [ipaddress.ip_network(n, strict=False)
                                      for n in fairness.exempt]
        self.public = 0
        self.own = 0
        self._clients: collections.Counter[str] = collections.Counter()
        self._networks: collections.Counter[str] = collections.Counter()
        self._recent: dict[str, collections.deque[float]] = {}

    @property
    def held(self) -> int:
        return self.public + self.own

    def is_exempt(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return addr is not None and any(addr in net for net in self.exempt)

    def admit_own(self, peer: str = "") -> Ticket | str:
        """A slot from our own hops' budget (an exempt address, a unix socket)."""
        if self.own >= self.max_connections:
            return "too many connections"
        self.own += 1
        return Ticket(self, peer, "", True)

    def admit(self, peer_ip: str, now: float | None = None) -> Ticket | str:
        addr = ip_of(peer_ip)
        if self.is_exempt(addr):
            return self.admit_own(peer_ip)
        if self.public >= self.max_connections:
            return "too many connections"
        client = str(addr) if addr is not None else peer_ip
        network = str(_network(addr)) if addr is not None else peer_ip
        f = self.fairness
        if f.max_per_client and self._clients[client] >= f.max_per_client:
            return f"too many connections from {client}"
        if f.max_per_network and self._networks[network] >= f.max_per_network:
            return f"too many connections from {network}"
        if f.max_rate_per_client:
            now = time.monotonic() if now is None else now
            recent = self._recent.setdefault(client, collections.deque())
            while recent and recent[0] <= now - 60:
                recent.popleft()
            if len(recent) >= f.max_rate_per_client:
                return f"too many new connections from {client} in a minute"
            recent.append(now)
            if len(self._recent) > 10 * max(self.max_connections, 1):
                self._forget(now)
        self.public += 1
        self._clients[client] += 1
        self._networks[network] += 1
        return Ticket(self, client, network, False)

    def _forget(self, now: float) -> None:
        """Drop rate windows that have emptied, so a scan of many addresses costs nothing."""
        for key in [k for k, q in self._recent.items() if not q or q[-1] <= now - 60]:
            del self._recent[key]

    def _release(self, ticket: Ticket) -> None:
        if ticket.exempt:
            self.own -= 1
            return
        self.public -= 1
        for counter, key in ((self._clients, ticket.client), (self._networks, ticket.network)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]
