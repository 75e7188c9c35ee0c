"""Sending TLS-RPT reports from the relay: queued as mail in its own spool, once a day.

A report to a `mailto:` address is an ordinary outgoing mail: it is written
to the spool (DKIM-signed with the domain's keys when the relay has them,
since RFC 8460 5.3 asks for a signature), delivered and retried like any
other, and never bounced (an error about a report helps no one).  `poste
tls-report` writes to the same spool; a running relay takes it at its next
rescan.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from poste.services.relay.own_mail import OwnKeys
from poste.services.relay.spool import Entry, Recipient, Spool
from poste.services.relay.tls_policy.tlsrpt import MailFn, Reporter
from poste.smtp.message import Message
from poste.smtp.stage import new_queue_id

log = logging.getLogger("poste.relay.tlsrpt")


def spool_mail(
    spool: Spool, sender: str, keys: OwnKeys | None = None,
    submit: Callable[[Entry], None] | None = None,
) -> MailFn:
    """A MailFn that queues a report from `sender` in `spool` (and tells the scheduler)."""

    async def mail(to: str, message: bytes) -> None:
        qid = new_queue_id()
        if keys is not None:
            message = await keys.sign(message, qid)
        entry = Entry(id=qid, return_path="", is_dsn=True,
                      recipients=[Recipient(address=to, sender=sender, original=to)])
        await asyncio.to_thread(spool.put, entry, Message.of(message))
        if submit is not None:
            submit(entry)

    return mail


async def daily(reporter: Reporter, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
                ) -> None:
    """Report yesterday's sessions a few minutes after each UTC midnight (and at start,
    for days a stopped relay did not report)."""
    while True:
        try:
            await reporter.send_due()
        except Exception as exc:  # a report is never worth the relay's job: log, try tomorrow
            log.warning("TLS-RPT: reports not sent: %s: %s", type(exc).__name__, exc)
        now = dt.datetime.now(dt.UTC)
        nxt = (now + dt.timedelta(days=1)).replace(hour=0, minute=5, second=0, microsecond=0)
        await sleep((nxt - now).total_seconds())
