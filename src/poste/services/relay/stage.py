"""The relay's stage (who may send where, loops) and its hop (the durable queue).

The stage refuses at RCPT time what cannot be delivered (unknown users, relay
attempts from outside `--granted`, forged SRS) and at DATA time mail that
went through too many hops.  The hop is the spool: its DATA answers 250 only
once the message and its envelope are on disk with fsync, so the sender may
forget the mail the moment it reads our 250.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from poste.services.relay.from_rewrite import Forwarding
from poste.services.relay.learn import ALONE, LEARN_BY_MX, Learning
from poste.services.relay.own_mail import ForwardSeal
from poste.services.relay.quarantine import Quarantine
from poste.services.relay.router import Delivery, Router
from poste.services.relay.scheduler import Scheduler
from poste.services.relay.settings import default
from poste.services.relay.spam_policy import (
    ACTED,
    MIXED,
    QUARANTINE,
    REFUSED,
    REJECT,
    TAG,
    SpamPolicy,
)
from poste.services.relay.spool import Entry, Recipient, SpoolError
from poste.smtp.hop import Transaction
from poste.smtp.message import Message
from poste.smtp.stage import Envelope, Reply, Stage, Verdict, new_queue_id

log = logging.getLogger("poste.relay")

MAX_RECEIVED = int(default("max-received"))
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)


def count_received(data: bytes) -> int:
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    return len(_RECEIVED.findall(head))


class RelayStage(Stage):
    """Judges DATA (mail loops); recipients are routed once, by the queue's transaction.

    Routing a recipient can write the SRS database, so doing it here and again
    in `QueueTransaction.rcpt` cost a second write and a second answer that
    could in principle differ from the first.
    """

    name = "relay"

    def __init__(self, max_received: int = MAX_RECEIVED, seal: ForwardSeal | None = None,
                 forwarding: Forwarding | None = None) -> None:
        self.max_received = max_received
        self.seal = seal  # ARC for forwarded mail (own_mail.py)
        self.forwarding = forwarding  # the From rewrite and X-Forwarded-* (from_rewrite.py)

    async def on_data(self, env: Envelope, message: Message) -> Verdict:
        hops = count_received(message.header())
        if hops > self.max_received:
            return Verdict(reply=Reply(554, f"5.4.6 Too many hops ({hops} Received:), mail loop?"))
        fwd = await self.forwarding.apply(env, message) if self.forwarding else None
        out = fwd.message if fwd and fwd.message else message  # sealed as it goes on
        seal = await self.seal.fields(env, out) if self.seal else b""
        return Verdict(prepend=(fwd.prepend if fwd else b"") + seal,
                       message=fwd.message if fwd else None, note=fwd.note if fwd else "")


class QueueHop:
    """A Hop whose transaction ends in the spool."""

    def __init__(
        self,
        router: Router,
        scheduler: Scheduler,
        spam: SpamPolicy | None = None,
        quarantine: Quarantine | None = None,
        learning: Learning | None = None,
    ) -> None:
        self.router = router
        self.scheduler = scheduler
        self.spam = spam  # per-user spam policy (spam_policy.py); None: every mail is `tag`
        self.quarantine = quarantine
        self.learning = learning  # learn-spam@ / learn-ham@ (learn.py), when configured

    async def open(self, env: Envelope) -> Transaction:
        return QueueTransaction(self, env)


class QueueTransaction:
    def __init__(self, hop: QueueHop, env: Envelope) -> None:
        self.hop = hop
        self.env = env
        self.sender = ""
        self.deliveries: list[Delivery] = []
        self.policy: str | None = None  # the spam policy class of the accepted recipients
        self.policy_rcpt = ""  # the first of them (whose mail the quarantine keeps)
        self.learn: tuple[str, bool] | None = None  # (learn address, is_spam)

    async def mail(self, sender: str, options: list[str]) -> Reply:
        self.sender = sender
        return Reply(250, "2.1.0 Ok")

    async def rcpt(self, rcpt: str, options: list[str]) -> Reply:
        """Route the recipient (the only place it is routed).

        On the loop when the router needs no SRS database file (`routes_inline`);
        it may write that database with fsync: then a thread, not the loop.
        """
        router = self.hop.router
        env = self.env
        learning = self.hop.learning
        kind = learning.kind(rcpt) if learning is not None else None
        if kind is not None or self.learn is not None:  # a learn mail is alone
            if env.own_hop:
                return LEARN_BY_MX
            if self.deliveries or (self.learn is not None and self.learn != (rcpt.lower(), kind)):
                return ALONE
            self.learn = (rcpt.lower(), bool(kind))
            return Reply(250, "2.1.5 Ok")
        granted = env.own_hop or router.is_granted(env.peer_ip)
        # Our own sending path has no spamfilter: its mail is never labelled, and a MUA
        # must not see a 452 for writing to a quarantine user beside someone else.
        policy = self.hop.spam.of(rcpt) if self.hop.spam and not granted else TAG
        if self.policy is not None and (
            policy != self.policy
            or (policy == QUARANTINE and rcpt.lower() != self.policy_rcpt.lower())
        ):
            log.info("%s deferred rcpt=<%s>: spam policy %s, this transaction's is %s",
                     env.queue_id, rcpt, policy, self.policy)
            return MIXED  # one DATA reply for all: another transaction (spam_policy.py)
        if router.routes_inline(self.sender, rcpt):
            got = router.route(self.sender, rcpt, granted)
        else:  # the SRS database is read or written (fsync): a thread, not the loop
            got = await asyncio.to_thread(router.route, self.sender, rcpt, granted)
        if isinstance(got, Reply):
            log.info(
                "%s refused rcpt=<%s> from=<%s> peer=%s: %s",
                env.queue_id, rcpt, self.sender, env.peer_ip, got,
            )
            return got
        self.deliveries.extend(got)
        if self.policy is None:
            self.policy, self.policy_rcpt = policy, rcpt
        return Reply(250, "2.1.5 Ok")

    async def data(self, message: Message) -> Reply:
        if self.learn is not None and self.hop.learning is not None:
            return await self.hop.learning.data(self.env, *self.learn, message)
        seen: set[tuple[str, str]] = set()
        rcpts: list[Recipient] = []
        for d in self.deliveries:
            key = (d.address.lower(), d.sender.lower())
            if key in seen:
                continue
            seen.add(key)
            rcpts.append(Recipient(address=d.address, sender=d.sender, original=d.original))
        if not rcpts:
            return Reply(554, "5.5.1 No valid recipients")
        entry = Entry(
            id=self.env.queue_id or new_queue_id(),
            return_path=self.sender,
            recipients=rcpts,
            created=time.time(),
            peer=self.env.peer_ip,
            helo=self.env.helo,
        )
        if self.policy in (QUARANTINE, REJECT) and self.hop.spam and self.hop.spam.is_spam(
            message.header()
        ):
            return await self._spam(entry, message)
        try:
            await self.hop.scheduler.enqueue(entry, message)
        except SpoolError:
            entry.id = new_queue_id()
            try:
                await self.hop.scheduler.enqueue(entry, message)
            except (OSError, SpoolError) as exc:
                return _queue_failed(entry, exc)
        except OSError as exc:
            return _queue_failed(entry, exc)
        for r in rcpts:  # the core's line says `queued as` at INFO; the expansion here
            log.debug(
                "%s queued from=<%s> to=<%s> (for <%s>) size=%d",
                entry.id, r.sender, r.address, r.original, message.size,
            )
        return Reply(250, f"2.0.0 Ok: queued as {entry.id}")

    async def _spam(self, entry: Entry, message: Message) -> Reply:
        """Spam for a `reject` user is refused; for a `quarantine` user it is held, not queued."""
        if self.policy == REJECT or self.hop.quarantine is None:
            log.info("%s refused as spam from=<%s> to=<%s> size=%d (policy reject)",
                     entry.id, self.sender, self.policy_rcpt, message.size)
            ACTED.labels("refused").inc()
            return REFUSED
        try:
            await asyncio.to_thread(self.hop.quarantine.hold, entry, message, self.policy_rcpt)
        except Exception as exc:
            return _queue_failed(entry, exc)
        log.info("%s quarantined from=<%s> to=<%s> size=%d",
                 entry.id, self.sender, self.policy_rcpt, message.size)
        ACTED.labels("held").inc()
        return Reply(250, f"2.0.0 Ok: held as {entry.id}")

    async def abort(self) -> None:
        self.deliveries = []
        self.policy = None
        self.learn = None
        await asyncio.sleep(0)


def _queue_failed(entry: Entry, exc: Exception) -> Reply:
    log.error("%s could not be queued: %s", entry.id, exc)
    return Reply(451, "4.3.0 Could not queue the message, try again later")
