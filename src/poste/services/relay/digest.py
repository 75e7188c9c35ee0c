"""The quarantine digest: one mail a day (or at the interval set) to each user with held spam.

It is poste's own mail, written the way a DSN is (dsn.py, own_mail.py): sent
from the null sender `<>` (so a digest to a dead target never bounces back
and forth; SPF then checks the relay's HELO name, which `poste dns records`
publishes), From `postmaster@` our domain, DKIM-signed with the domain's
keys, so it is aligned and passes DMARC at the receiver.  It goes to the
user's targets through the spool like any other mail.

`quarantine-digest` is a time of day (`06:00`, UTC) or an interval (`12h`);
`poste quarantine digest --now` leaves a request file the relay sees within
a second.  Each run also expires mail held longer than `quarantine-days`
(journalled and logged, never silently).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.header
import email.utils
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from poste.runtime.settings import ConfigError, parse_duration
from poste.services.relay.quarantine import Held, Quarantine
from poste.services.relay.scheduler import Scheduler
from poste.services.relay.spool import Entry, Recipient
from poste.smtp.message import Message
from poste.smtp.stage import new_queue_id

log = logging.getLogger("poste.relay")

DAY = 86400.0
MAX_LISTED = 500
_TIME_OF_DAY = re.compile(r"^\s*([01]?\d|2[0-3]):([0-5]\d)\s*$")


@dataclass(frozen=True)
class Schedule:
    """Daily at `at` seconds past midnight UTC, or every `every` seconds."""

    at: float | None = None
    every: float | None = None

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """`HH:MM` (UTC) or a duration; ConfigError naming `quarantine-digest` otherwise."""
        m = _TIME_OF_DAY.match(str(text))
        if m:
            return cls(at=int(m.group(1)) * 3600.0 + int(m.group(2)) * 60.0)
        try:
            every = parse_duration(text)
        except ValueError:
            every = 0.0
        if every < 60:
            raise ConfigError("quarantine-digest",
                              f"{text!r} is neither a time of day (06:00, UTC) nor an interval "
                              "of a minute or more (12h)")
        return cls(every=every)

    def next_after(self, now: float) -> float:
        if self.every is not None:
            return now + self.every
        midnight = now - now % DAY
        when = midnight + (self.at or 0.0)
        return when if when > now else when + DAY


def make_digest(
    *, user: str, held: Sequence[Held], domain: str, hostname: str, keep_days: int,
    now: float | None = None,
) -> bytes:
    """The digest mail (CRLF line ends) listing `held` for `user`."""
    ts = time.time() if now is None else now
    n = len(held)
    subject = f"Quarantine: {n} mail{'s' if n != 1 else ''} held as spam for {user}"
    if not subject.isascii():
        subject = email.header.Header(subject, "utf-8").encode()
    lines = [
        f"These mails to {user} were labelled spam and are held at {hostname},",
        "not forwarded to you.  Nothing here has been delivered.",
        f"Held mail is deleted after {keep_days} days.  To have one delivered, ask",
        "your postmaster to run:  poste quarantine release ID",
        "",
    ]
    shown = sorted(held, key=lambda x: x.held)
    if len(shown) > MAX_LISTED:  # a flood of spam must not make a digest no one can open
        lines += [f"The {MAX_LISTED} newest of {len(shown)} are listed; "
                  "your postmaster sees them all (poste quarantine list).", ""]
        shown = shown[-MAX_LISTED:]
    for h in shown:
        when = dt.datetime.fromtimestamp(h.held, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        lines += [
            f"ID {h.id}   held {when}   {h.entry.size} bytes",
            f"  From:    {h.sender or '-'}",
            f"  Subject: {h.subject or '-'}",
            f"  Date:    {h.date or '-'}",
            "",
        ]
    head = (
        f"From: poste quarantine <postmaster@{domain}>\r\n"
        f"To: <{user}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {email.utils.formatdate(ts, localtime=False)}\r\n"
        f"Message-ID: <digest.{secrets.token_hex(8)}@{hostname}>\r\n"
        "Auto-Submitted: auto-generated\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
    )
    return (head + "\r\n" + "\r\n".join(lines) + "\r\n").encode("utf-8")


class Digest:
    """The relay's background job: digests on schedule or on request, and expiry."""

    def __init__(
        self,
        quarantine: Quarantine,
        scheduler: Scheduler,
        targets: Callable[[str], list[tuple[str, str]]],
        *,
        domain: str,
        hostname: str,
        schedule: Schedule,
        keep_days: int,
        poll: float = 1.0,
    ) -> None:
        self.quarantine = quarantine
        self.scheduler = scheduler
        self.targets = targets
        self.domain = domain
        self.hostname = hostname
        self.schedule = schedule
        self.keep_days = keep_days
        self.poll = poll

    async def run(self) -> None:
        next_at = self.schedule.next_after(time.time())
        next_expiry = 0.0
        while True:
            now = time.time()
            try:
                asked = await asyncio.to_thread(self.quarantine.take_digest_request)
                if now >= next_expiry:
                    await self.expire()
                    next_expiry = now + 3600.0
                if asked or now >= next_at:
                    await self.send()
                    if now >= next_at:
                        next_at = self.schedule.next_after(now)
            except OSError as exc:  # a full disk must not end the job: try again later
                log.error("quarantine digest: %s", exc)
            await asyncio.sleep(self.poll)

    async def expire(self) -> None:
        gone = await asyncio.to_thread(self.quarantine.expire, self.keep_days * DAY)
        for h in gone:
            log.info("%s: quarantine expired after %d days: to=<%s> from=%s subject=%s size=%d",
                     h.id, self.keep_days, h.user, h.sender, h.subject, h.entry.size)

    async def send(self) -> int:
        """One digest per user with mail not yet in a digest; returns how many were queued."""
        fresh = [h for h in await asyncio.to_thread(lambda: list(self.quarantine.entries()))
                 if not h.digested]
        by_user: dict[str, list[Held]] = {}
        for h in fresh:
            by_user.setdefault(h.user.lower(), []).append(h)
        sent = 0
        for user, held in sorted(by_user.items()):
            targets = await asyncio.to_thread(self.targets, held[0].user)
            if not targets:
                log.warning("quarantine digest: <%s> has no target now; %d mail(s) kept",
                            user, len(held))
                continue
            mail = make_digest(user=held[0].user, held=held, domain=self.domain,
                               hostname=self.hostname, keep_days=self.keep_days)
            qid = new_queue_id()
            mail = await self.scheduler.own_keys.sign(mail, qid)
            entry = Entry(
                id=qid, return_path="",
                recipients=[Recipient(address=t, sender="", original=held[0].user)
                            for t, _ in targets],
                is_dsn=True,  # our own notice: never bounced itself
            )
            await self.scheduler.enqueue(entry, Message.of(mail))
            for h in held:
                h.digested = True
                await asyncio.to_thread(self.quarantine.update, h)
            log.info("quarantine digest for <%s>: %d mail(s), queued as %s", user, len(held), qid)
            sent += 1
        return sent
