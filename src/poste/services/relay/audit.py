"""The spool audit: mail that was acknowledged but is not on its way.

"No mail is ever lost" is checked from the outside here, without the relay's
help: every envelope must be readable, have its message file, and either
have a pending recipient whose next attempt is not long past (the scheduler
lost track of it: a stall) or be about to be removed.  `poste queue check`
prints the findings; `/metrics` counts the overdue ones
(`poste_spool_overdue_messages`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from poste.services.relay.spool import Entry, Spool, SpoolError

OVERDUE_SLACK = 300.0  # the scheduler rescans every 30 s; 5 min late is a stall


@dataclass(frozen=True)
class Finding:
    qid: str
    problem: str  # "overdue", "unreadable", "no message file", "nothing pending"
    detail: str


def is_overdue(entry: Entry, now: float, slack: float = OVERDUE_SLACK) -> bool:
    """Pending, and its next attempt more than `slack` past: the scheduler is not moving it."""
    return bool(entry.pending) and entry.next_attempt < now - slack


def audit(spool: Spool, now: float | None = None, slack: float = OVERDUE_SLACK) -> list[Finding]:
    now = time.time() if now is None else now
    found: list[Finding] = []
    for qid in spool.ids():
        try:
            entry = spool.load(qid)
        except SpoolError as exc:
            found.append(Finding(qid, "unreadable", str(exc)))
            continue
        if not spool.message_path(qid).exists():
            found.append(Finding(qid, "no message file", str(spool.message_path(qid))))
        if not entry.pending:
            found.append(Finding(qid, "nothing pending",
                                 "every recipient is done, yet the envelope is still here"))
        elif is_overdue(entry, now, slack):
            late = now - entry.next_attempt
            found.append(Finding(qid, "overdue",
                                 f"next attempt was due {late:.0f} s ago "
                                 f"({len(entry.pending)} recipient(s) pending)"))
    return found
