"""What the relay does with a mail our spamfilter labelled spam, per user (docs/users.md).

Each local user chooses `tag` (forward it labelled: the default), `quarantine`
(keep it here, list it in a daily digest, forward it only when released) or
`reject` (refuse it at the end of DATA with 550 5.7.1, so the sender's MTA
tells the sender).  Mail for anyone else (a remote address we relay for our
own users, postmaster, a bounce coming back to an SRS address) is `tag`.

One transaction, one policy.  The DATA reply is one for all recipients, so
a transaction cannot both refuse (reject) and accept (tag) the same spam:
a RCPT whose policy differs from the first accepted one is answered
`452 4.5.3`, which RFC 5321 (3.3, 4.5.3.1.10) lets the client take as "send
this one again in another transaction": Postfix sends it at its next queue
run (tests/test_spam_policy.py), poste's own delivery retries it.  A `quarantine` recipient
is a class of its own (one per transaction), so each held mail belongs to
one user, whose digest lists it and who alone decides its release.

Which label counts.  Anyone can write `X-Spamtacus: no` into a mail; only
the field our spamfilter prepended counts.  Every hop of ours prepends its
fields above its own `Received:` and passes the rest on byte for byte, so the
spamfilter's label is the one between the relay's own `Received:` and the
next one down (the spamfilter's); a label lower in the header was written
before the spamfilter (by the sender, or a hop outside) and is ignored.  We
do not remove the sender's field: the bytes we forward stay the bytes we got,
and a DKIM signature over them stays valid.  A mail that reaches the relay
without passing our spamfilter (its label missing there) is not spam to us:
`tag`, forwarded as before (docs/relay.md says to keep the relay's inbound
listener to the spamfilter alone).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from prometheus_client import Counter

from poste.smtp.address import domain_of
from poste.smtp.stage import Reply
from poste.users.repo import DEFAULT_SPAM_POLICY, UsersDB

log = logging.getLogger("poste.relay")

TAG, QUARANTINE, REJECT = "tag", "quarantine", "reject"
SPAM = "yes"

MIXED = Reply(452, "4.5.3 Recipient of another spam policy: send it in a separate transaction")
REFUSED = Reply(550, "5.7.1 Message refused as spam by the recipient's policy")

ACTED = Counter("poste_spam_policy_mails",
                "Mails labelled spam that a user's policy held or refused.", ["action"])

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:(.*)$", re.DOTALL)


def header_fields(header: bytes) -> list[tuple[str, bytes]]:
    """(lower-cased name, unfolded value) of each field, top first; junk lines are skipped."""
    out: list[tuple[str, bytes]] = []
    for line in re.split(rb"\r?\n(?![ \t])", header):
        m = _FIELD.match(line)
        if m:
            out.append((m.group(1).decode("ascii").lower(), m.group(2)))
    return out


def trusted_label(header: bytes, name: str = "X-Spamtacus", own_received: int = 1) -> str | None:
    """The label our spamfilter wrote, or None when there is none where it writes it.

    `own_received`: how many `Received:` the relay put on top before looking
    (1: the queue's view, below the relay stage's own field).  The label is
    the first `name:` field after that many `Received:` and before the next.
    """
    want = name.lower()
    seen = 0
    for field, value in header_fields(header):
        if field == "received":
            seen += 1
            if seen > own_received:
                return None
        elif field == want and seen == own_received:
            return value.decode("ascii", "replace").strip().lower()
    return None


class SpamPolicy:
    """The per-user policy, read from the users repository as it is now."""

    def __init__(
        self,
        users: Callable[[], UsersDB | None],
        is_local_domain: Callable[[str], bool],
        label_name: str = "X-Spamtacus",
    ) -> None:
        self.users = users
        self.is_local_domain = is_local_domain
        self.label_name = label_name

    def of(self, rcpt: str) -> str:
        """The policy class of one RCPT TO (`tag` for anything but a local user)."""
        address = rcpt.strip()
        if "@" not in address or not self.is_local_domain(domain_of(address)):
            return TAG
        db = self.users()
        user = db.lookup(address) if db is not None else None
        return user.spam if user is not None else DEFAULT_SPAM_POLICY

    def is_spam(self, header: bytes) -> bool:
        return trusted_label(header, self.label_name) == SPAM
