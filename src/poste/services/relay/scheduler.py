"""When to try each queued message again, and what to tell its sender.

Every message in the spool has a next-attempt time.  A new message is tried at
once; after a temporary failure it waits `retry_min * 2**(attempts-1)` seconds,
capped at `retry_max`, times a random factor (jitter, so that a destination
coming back up is not hit by the whole queue at the same second).  A recipient
still undelivered `lifetime` after arrival fails for good.  5xx answers fail at
once.  Failures produce one RFC 3464 DSN per attempt to the original sender
(never to `<>`, never for a DSN), and a message still pending after
`warn_after` produces one "delayed" DSN.

Concurrency is bounded twice: `max_active` messages in flight, and
`max_per_domain` SMTP sessions per destination domain, so one slow domain
cannot hold every slot and we never hammer one receiver.

On start the scheduler takes the spool's exclusive lock (one relay per spool),
then reads and resumes the whole spool; a rescan every `rescan` seconds picks
up `poste queue retry|delete` done while the relay runs.  The state written
after an attempt is merged, under the message lock, into the envelope as it
is on disk then: a `retry` made during the attempt (a changed next_attempt)
is kept, and a `delete` made during it stays deleted.

The relay's metrics are counted here, where outcomes are decided, so every
builder of a scheduler (`poste relay`, `poste up`) counts the same:
`poste_queued` for each message written to the spool (DSNs included), and
`poste_deliveries` once per recipient per attempt with that attempt's
outcome: `delivered`, `deferred` (temporary failure, still pending) or
`bounced` (5xx, or the lifetime ran out: the recipient's last attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from poste.metrics import DELIVERIES, QUEUED, labelled
from poste.services.relay.dsn import DELAYED, FAILED, make_dsn
from poste.services.relay.own_mail import OwnKeys
from poste.services.relay.pools import arriving, departing
from poste.services.relay.settings import default
from poste.services.relay.spool import DELIVERED, PENDING, Entry, Recipient, Spool, SpoolError
from poste.smtp.message import Message
from poste.smtp.stage import Reply, new_queue_id

log = logging.getLogger("poste.relay")

# A mail just written to the spool keeps its envelope and (in-memory) bytes here for its
# first attempt, so that attempt does not read back from disk, in two thread trips, what
# it had a moment ago (issue 16: those trips were most of the delivery side's CPU per
# mail).  Bounded: mails up to FRESH_MAIL bytes, FRESH_TOTAL bytes at once; past that,
# or after a restart, the attempt reads the spool as ever.  The spool stays the record.
FRESH_MAIL = 256 * 1024
FRESH_TOTAL = 16 * 1024 * 1024

DeliverFn = Callable[[str, str, list[str], Message], Awaitable[dict[str, Reply]]]
# address -> [(target address, sender to use)]; lets a DSN to a local user reach its targets
ExpandFn = Callable[[str], list[tuple[str, str]]]


INFLOW_BACKLOG = 50  # mails waiting for or in their attempt, for the whole relay


@dataclass
class Policy:
    retry_min: float = default("retry-min")
    retry_max: float = default("retry-max")
    jitter: float = 0.25
    lifetime: float = default("lifetime")
    warn_after: float = default("warn-after")  # 0 disables the delay warning
    max_per_domain: int = int(default("domain-concurrency"))
    max_active: int = 50
    rescan: float = default("queue-rescan")
    # Inflow pacing (Postfix's in_flow_delay): while more than `inflow_backlog` mails wait
    # for or are in their attempt, a newly queued mail's 250 waits up to `inflow_delay` s.
    inflow_backlog: int = INFLOW_BACKLOG
    inflow_delay: float = 1.0

    def backoff(self, attempts: int) -> float:
        base = min(self.retry_min * (2 ** max(attempts - 1, 0)), self.retry_max)
        return float(base) * random.uniform(1 - self.jitter, 1 + self.jitter)


class Scheduler:
    def __init__(
        self,
        spool: Spool,
        deliver: DeliverFn,
        *,
        hostname: str,
        domain: str,
        policy: Policy | None = None,
        expand: ExpandFn | None = None,
        own_keys: OwnKeys | None = None,
    ) -> None:
        self.spool = spool
        self.own_keys = own_keys or OwnKeys()  # DSNs are DKIM-signed with them
        self.deliver = deliver
        self.hostname = hostname
        self.domain = domain
        self.policy = policy or Policy()
        self.expand = expand
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._busy: set[str] = set()
        self._fresh: dict[str, tuple[Entry, Message]] = {}  # for the first attempt
        self._fresh_bytes = 0
        self._new: set[str] = set()  # submitted, first attempt not begun
        self._caught_up = asyncio.Event()  # set when the backlog falls to inflow_backlog
        self._wake = asyncio.Event()
        self._active = asyncio.Semaphore(self.policy.max_active)
        self._domains: dict[str, asyncio.Semaphore] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False

    # -- life cycle ----------------------------------------------------------

    async def start(self) -> None:
        """Own the spool (SpoolLocked if another relay does), then resume it."""
        await departing(self.spool.lock)
        removed = await departing(self.spool.recover)
        if removed:
            log.info("spool: removed %d leftovers of interrupted writes", len(removed))
        entries = await departing(lambda: list(self.spool.entries()))
        for entry in entries:
            self._schedule(entry.id, entry.next_attempt)
        log.info("spool %s: %d message(s) queued", self.spool.path, len(entries))
        self._runner = asyncio.create_task(self._run(), name="relay-scheduler")

    async def stop(self) -> None:
        self._stopping = True
        if self._runner:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fresh.clear()  # on disk all the same
        self._fresh_bytes = 0
        self.spool.unlock()

    def submit(self, entry: Entry) -> None:
        """A message just written to the spool: try it now."""
        self._new.add(entry.id)
        self._schedule(entry.id, entry.next_attempt)

    async def enqueue(self, entry: Entry, message: Message, *, pace: bool = True) -> None:
        """Write the mail to the spool (fsync) and schedule it; then, if delivery lags, wait.

        Measured (issue 16): with 50 sessions sending into one process, receiving took
        the loop and the spool grew to over a thousand mails before delivery caught up.
        As Postfix's in_flow_delay, a mail queued while more than `inflow_backlog` mails
        wait for or are in their attempt holds its 250 up to `inflow_delay` seconds: the
        mail is on disk already (nothing is at risk), senders slow down, delivery gets
        the CPU.  Our own DSNs (`pace=False`) never wait for delivery, which queues them.
        """
        await arriving(self.spool.put, entry, message)
        QUEUED.inc()
        self._keep_fresh(entry, message)
        self.submit(entry)
        if pace and self._backlog() > self.policy.inflow_backlog:
            self._caught_up.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._caught_up.wait(), self.policy.inflow_delay)

    def _keep_fresh(self, entry: Entry, message: Message | bytes) -> None:
        if isinstance(message, bytes):  # what DSNs and tests hand over
            message = Message.of(message)
        size = message.size
        if not message.in_memory or size > FRESH_MAIL:
            return
        if self._fresh_bytes + size > FRESH_TOTAL or entry.id in self._fresh:
            return
        # a copy: the caller's Entry is its own; the bytes are immutable and shared
        self._fresh[entry.id] = (Entry.from_json(entry.to_json()), message.prepend(b""))
        self._fresh_bytes += size

    def _take_fresh(self, qid: str) -> tuple[Entry, Message] | None:
        fresh = self._fresh.pop(qid, None)
        if fresh is not None:
            self._fresh_bytes -= fresh[1].size
        return fresh

    def _backlog(self) -> int:
        return len(self._new) + len(self._busy)

    def _maybe_caught_up(self) -> None:
        if self._backlog() <= self.policy.inflow_backlog:
            self._caught_up.set()

    def _schedule(self, qid: str, when: float) -> None:
        self._due[qid] = when
        heapq.heappush(self._heap, (when, qid))
        self._wake.set()

    async def idle(self) -> bool:
        """True when nothing is in flight (for tests)."""
        return not self._busy

    # -- the loop ------------------------------------------------------------

    async def _run(self) -> None:
        next_scan = time.time() + self.policy.rescan
        # not `while True`: Python 3.11's wait_for loses a cancel that comes as the wait
        # ends (gh-86296), and stop() then waited for this loop for ever
        while not self._stopping:
            now = time.time()
            if now >= next_scan:
                await self._rescan()
                next_scan = now + self.policy.rescan
            while self._heap and self._heap[0][0] <= now:
                when, qid = heapq.heappop(self._heap)
                if self._due.get(qid) != when or qid in self._busy:
                    continue  # superseded, or running (it reschedules itself)
                del self._due[qid]
                await self._active.acquire()
                self._busy.add(qid)
                self._new.discard(qid)
                task = asyncio.create_task(self._process(qid), name=f"deliver-{qid}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            wait = next_scan - time.time()
            if self._heap:
                wait = min(wait, self._heap[0][0] - time.time())
            self._wake.clear()
            if wait > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)

    async def _rescan(self) -> None:
        """Take in what `poste queue` changed on disk, and forget what it deleted.

        The listing is read in a thread while mail keeps arriving: what was
        scheduled or rescheduled during it (a new mail, an attempt's outcome) is
        newer than the listing, so it is neither dropped nor overwritten by it.
        """
        before = dict(self._due)
        try:
            entries = await departing(lambda: list(self.spool.entries()))
        except OSError as exc:
            log.warning("spool rescan failed: %s", exc)
            return
        seen = set()
        for entry in entries:
            seen.add(entry.id)
            if entry.id in self._busy or self._due.get(entry.id) != before.get(entry.id):
                continue
            if self._due.get(entry.id) != entry.next_attempt:
                self._schedule(entry.id, entry.next_attempt)
        for qid, when in before.items():
            if qid not in seen and qid not in self._busy and self._due.get(qid) == when:
                del self._due[qid]
                self._new.discard(qid)  # deleted by `poste queue delete`: no longer waiting
                self._take_fresh(qid)
        self._maybe_caught_up()

    # -- one message ---------------------------------------------------------

    async def _process(self, qid: str) -> None:
        try:
            await self._attempt(qid)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: delivery attempt crashed; retrying later", qid)
            self._schedule(qid, time.time() + self.policy.retry_min)
        finally:
            self._busy.discard(qid)
            self._active.release()
            self._maybe_caught_up()

    async def _attempt(self, qid: str) -> None:
        fresh = self._take_fresh(qid)
        # `poste queue delete` right after the 250: a stat on the loop, microseconds
        if fresh is not None and self.spool.envelope_path(qid).exists():
            entry, message = fresh
            try:
                await self._attempt_with(entry, entry.next_attempt, message)
            finally:
                message.close()
            return
        try:
            entry = await departing(self.spool.load, qid)
        except SpoolError as exc:
            log.info("%s: gone from the spool (%s)", qid, exc)
            return
        seen_next = entry.next_attempt
        try:
            message = await departing(self.spool.open_message, qid, entry.wire_clean)
        except SpoolError as exc:
            # Only an outside hand removes a message file under its envelope.
            log.error("%s: %s; dropping its envelope", qid, exc)
            await departing(self.spool.remove, qid)
            return
        try:
            await self._attempt_with(entry, seen_next, message)
        finally:
            message.close()

    async def _attempt_with(self, entry: Entry, seen_next: float, message: Message) -> None:
        qid = entry.id
        tried = entry.pending
        groups: dict[tuple[str, str], list[Recipient]] = {}
        for r in tried:
            groups.setdefault((r.domain, r.sender), []).append(r)
        if groups:
            await asyncio.gather(
                *(
                    self._deliver_group(entry, dom, snd, rs, message)
                    for (dom, snd), rs in groups.items()
                )
            )
        now = time.time()
        expires = entry.created + self.policy.lifetime
        failed: list[Recipient] = []
        for r in entry.recipients:
            if r.state != PENDING:
                continue
            permanent = r.last_reply[:1] == "5"
            if permanent or now >= expires:
                if not permanent:
                    r.last_reply = f"{r.last_reply} (gave up after {_age(now - entry.created)})"
                r.state = "failed"
                failed.append(r)
                log.info("%s: to=<%s> status=bounced (%s)", qid, r.address, r.last_reply)
        for r in tried:
            if r.state == DELIVERED:
                labelled(DELIVERIES, "delivered").inc()
            elif r.state == PENDING:
                labelled(DELIVERIES, "deferred").inc()
            else:
                labelled(DELIVERIES, "bounced").inc()
        entry.attempts += 1
        if failed:
            await self._notify(entry, failed, FAILED, message)
        pending = entry.pending
        if (
            pending
            and not entry.warned
            and self.policy.warn_after
            and now - entry.created >= self.policy.warn_after
        ):
            await self._notify(entry, pending, DELAYED, message)
            entry.warned = True
        if pending:
            entry.next_attempt = min(now + self.policy.backoff(entry.attempts), max(expires, now))

        def merge(on_disk: Entry) -> Entry | None:
            # We are the only writer of delivery state; `poste queue retry`
            # only moves next_attempt.  If it did so during this attempt, keep it.
            if not entry.pending:
                return None
            if on_disk.next_attempt != seen_next:
                log.info("%s: retry requested during the attempt: kept", qid)
                entry.next_attempt = on_disk.next_attempt
            return entry

        try:
            written = await departing(self.spool.modify, qid, merge)
        except SpoolError as exc:
            log.info("%s: %s during the attempt; not rewritten", qid, exc)
            return
        if written is not None and not self._stopping:
            self._schedule(qid, written.next_attempt)

    async def _deliver_group(
        self, entry: Entry, domain: str, sender: str, rcpts: list[Recipient], message: Message
    ) -> None:
        sem = self._domains.setdefault(domain, asyncio.Semaphore(self.policy.max_per_domain))
        async with sem:
            try:
                results = await self.deliver(domain, sender, [r.address for r in rcpts], message)
            except Exception as exc:  # a bug must not lose the mail: defer it
                log.exception("%s: delivery to %s crashed", entry.id, domain)
                results = {r.address: Reply(451, f"4.3.0 Local error: {exc}") for r in rcpts}
        now = time.time()
        for r in rcpts:
            res = results.get(r.address) or Reply(451, "4.3.0 No result for this recipient")
            r.attempts += 1
            r.last_attempt = now
            r.last_reply = res.record
            r.remote_mta = res.remote_mta
            if res.ok:
                r.state = DELIVERED
                word = "sent"
            elif res.permanent:
                word = "bounced"
            else:
                word = "deferred"
            if word != "bounced":
                log.info(  # delay: since the mail came in, as Postfix's delay=
                    "%s: to=<%s> from=<%s> relay=%s delay=%.3f status=%s (%s)",
                    entry.id, r.address, sender, res.remote_mta or "none",
                    now - entry.created, word, res.record,
                )

    async def _notify(
        self, entry: Entry, rcpts: list[Recipient], action: str, message: Message
    ) -> None:
        """Queue a DSN about `rcpts` to the original sender (never to <>, never for a DSN)."""
        if not entry.return_path or entry.is_dsn:
            log.info("%s: no %s DSN (null sender or a DSN itself)", entry.id, action)
            return
        retry_until = entry.created + self.policy.lifetime
        dsn = make_dsn(
            action=action,
            reporting_mta=self.hostname,
            postmaster_domain=self.domain,
            to=entry.return_path,
            recipients=rcpts,
            original=message.header(),
            queue_id=entry.id,
            arrival=entry.created,
            retry_until=retry_until,
        )
        targets = self.expand(entry.return_path) if self.expand else [(entry.return_path, "")]
        if not targets:
            log.info("%s: no one to send the %s DSN to <%s>", entry.id, action, entry.return_path)
            return
        new_id = new_queue_id()
        dsn = await self.own_keys.sign(dsn, new_id)
        new = Entry(
            id=new_id,
            return_path="",
            recipients=[
                Recipient(address=t, sender="", original=entry.return_path) for t, _ in targets
            ],
            is_dsn=True,
        )
        await self.enqueue(new, Message.of(dsn), pace=False)
        log.info("%s: %s DSN to <%s> queued as %s", entry.id, action, entry.return_path, new.id)


def _age(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds:.0f} s"
