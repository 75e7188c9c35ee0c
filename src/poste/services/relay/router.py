"""Who may send through the relay, and where each recipient really goes.

The relay is reached by our own services (granted networks) and must never be
an open relay: a peer outside `--granted` can only reach local addresses.
A local address expands to its targets from the users repository (a
forwarded mail, so the envelope sender is SRS-rewritten unless it is ours);
`postmaster@` goes to `--postmaster`; an SRS address of ours is a bounce
coming back and goes to the original sender, and a `fwd+...` address of ours
(the From of a mail whose From we rewrote, fwd_token.py) is a reply going to
its author; anything else local is refused at RCPT time, so no mail is ever
dropped silently.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from poste.services.relay.fwd_token import FwdTokens, is_fwd
from poste.services.relay.srs import SRS, SRSError, is_srs
from poste.smtp.address import domain_key, domain_of, ip_of
from poste.smtp.stage import Reply
from poste.users.repo import UsersDB

RELAY_DENIED = Reply(550, "5.7.1 Relay access denied")
MAX_DEPTH = 8

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Delivery:
    """One expanded recipient: where to deliver, as which sender, for which RCPT."""

    address: str
    sender: str
    original: str


def parse_networks(specs: Iterable[str]) -> list[Network]:
    """CIDR list for --granted; raises ValueError with the bad item."""
    nets: list[Network] = []
    for spec in specs:
        try:
            nets.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError:
            raise ValueError(f"bad network {spec!r} (expected CIDR like 10.0.0.0/8)") from None
    return nets


class Router:
    def __init__(
        self,
        domains: list[str],
        postmaster: str,
        srs: SRS,
        users: Callable[[], UsersDB | None],
        granted: list[Network],
        tokens: FwdTokens | None = None,
    ) -> None:
        self.domains = [domain_key(d) for d in domains]
        self.postmaster = postmaster
        self.srs = srs
        self.users = users
        self.granted = granted
        self.tokens = tokens

    def is_granted(self, ip: str) -> bool:
        addr = ip_of(ip)
        return addr is not None and any(addr in net for net in self.granted)

    def is_local_domain(self, domain: str) -> bool:
        domain = domain_key(domain)
        if domain in self.domains:
            return True
        db = self.users()
        return db is not None and db.is_local_domain(domain)

    def routes_inline(self, sender: str, rcpt: str) -> bool:
        """Whether `route` may run on the event loop: no SRS database file to read or
        write (a database-form SRS or `fwd+` recipient, a forwarded sender too long for
        plain SRS).  Everything else it does is in memory (the users snapshot, HMACs),
        cheaper than the trip to a thread (issue 16)."""
        if self.srs.db is None:
            return True
        address = rcpt.strip()
        if is_srs(address) or is_fwd(address):
            return False
        return not self.srs.needs_db(sender)

    def sender_for_forward(self, sender: str) -> str:
        """The envelope sender for mail we forward: SRS unless null or ours."""
        if not sender or "@" not in sender or self.is_local_domain(domain_of(sender)):
            return sender
        return self.srs.forward(sender)

    def route(self, sender: str, rcpt: str, granted: bool) -> list[Delivery] | Reply:
        """Expand one RCPT TO, or the reply refusing it."""
        address = rcpt.strip()
        if "@" not in address:
            if address.lower() == "postmaster":  # RFC 5321 4.5.1: <Postmaster> with no domain
                return self._expand(sender, self.postmaster, rcpt, 0, set())
            return Reply(550, "5.1.3 Recipient address needs a domain")
        if not self.is_local_domain(domain_of(address)):
            if not granted:
                return RELAY_DENIED
            return [Delivery(address, sender, rcpt)]
        return self._local(sender, address, rcpt, 0, set())

    def _local(
        self, sender: str, address: str, original: str, depth: int, seen: set[str]
    ) -> list[Delivery] | Reply:
        key = address.lower()
        if key in seen or depth > MAX_DEPTH:
            return Reply(554, "5.4.6 Alias loop in the users database")
        seen.add(key)
        local = address.rpartition("@")[0]
        if local.lower() == "postmaster":
            return self._expand(sender, self.postmaster, original, depth, seen)
        if self.tokens is not None and is_fwd(address):
            try:
                author = self.tokens.author(address)
            except SRSError as exc:
                return Reply(550, f"5.1.1 Invalid forwarding address: {exc}")
            return self._expand(sender, author, original, depth, seen)  # a reply, forwarded
        if is_srs(address):
            try:
                back = self.srs.reverse(address)
            except SRSError as exc:
                return Reply(550, f"5.1.1 Invalid SRS address: {exc}")
            # A bounce coming back: to the original sender, as it was sent to us.
            return self._expand(sender, back, original, depth, seen, forward=False)
        db = self.users()
        user = db.lookup(address) if db is not None else None
        if user is None:
            return Reply(550, f"5.1.1 <{address}>: Recipient address rejected: User unknown")
        if not user.targets:
            return Reply(550, f"5.1.1 <{address}>: Mailbox has no destination")
        out: list[Delivery] = []
        for target in user.targets:
            got = self._expand(sender, target, original, depth + 1, seen)
            if isinstance(got, Reply):
                return got
            out.extend(got)
        return out

    def _expand(
        self,
        sender: str,
        address: str,
        original: str,
        depth: int,
        seen: set[str],
        *,
        forward: bool = True,
    ) -> list[Delivery] | Reply:
        if "@" in address and self.is_local_domain(domain_of(address)):
            return self._local(sender, address, original, depth + 1, seen)
        mail_from = self.sender_for_forward(sender) if forward else sender
        return [Delivery(address, mail_from, original)]

    def dsn_targets(self, address: str) -> list[tuple[str, str]]:
        """Where a DSN to `address` goes (a local sender gets it at its targets)."""
        got = self.route("", address, granted=True)
        if isinstance(got, Reply):
            return []
        return [(d.address, "") for d in got]
