"""Learn mails: a user forwards a spam to `learn-spam@DOMAIN` (a ham to `learn-ham@`).

Why here, in the relay: it is the one service that knows who our users are
and where their mail goes (the users repository), and it is the end of the
receiving path in both topologies (`poste up` and verifier -> spamfilter ->
relay processes), so the learn mail has the verifier's results on top and
needs no other process to know about users.  The relay updates the database
file the spamfilter reads (`learn-db`, the spamfilter's `--db`) under a lock
and atomically (`poste.spam.learn.learn_into`); the spamfilter sees the new
file before its next mail (`SpamfilterStage.follow`) and swaps its model.
The relay answers 250 only once the file is renamed in place and fsync'd;
the learn mail goes nowhere else (it is not queued, not forwarded).

Who may train: a user of the learn address's domain, from one of their own
target addresses (the single From: address of the learn mail), and only when
our verifier's Authentication-Results say SPF passed for a MAIL FROM domain
aligned with it, or DKIM passed with a d= aligned with it (relaxed, DMARC's
organisational domains; no DMARC record is needed).  Only the topmost
Authentication-Results field counts, and only if it carries our authserv-id
(`arc-authserv-id`, read with the ARC seal's `poste.dkim.arc.authserv_id`):
the one our verifier prepended.  A sender can write any field it likes below
ours.  A learn mail that comes by our own hop (submission) is refused at
RCPT: it has no verifier results, and a user could write any.

Anything else is refused with 550 at the end of DATA, never accepted and
dropped: a forged learn mail (From a user's target, SPF and DKIM failing)
gets `550 5.7.1`, so the MTA that brought it is told; a real user whose
provider broke alignment gets a bounce saying why instead of believing the
filter learnt; and nothing is stored, so there is no backscatter from us.
Each outcome is logged and counted (`poste_learn_mails_total{kind,result}`).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

from poste.dkim.arc import authserv_id
from poste.dns.dmarc import aligned
from poste.runtime.settings import ConfigError
from poste.smtp.address import domain_key, domain_of
from poste.smtp.message import Message
from poste.smtp.stage import Envelope, Reply
from poste.spam.database import DatabaseError
from poste.spam.learn import forwarded, learn_into
from poste.users.repo import UsersDB

log = logging.getLogger("poste.relay")

LEARN_LOCALS = {"learn-spam": True, "learn-ham": False}
# what is read of a learn mail: the original is in it, attached or quoted
LEARN_BYTES = 2 * 1024 * 1024

LEARN_MAILS = Counter(
    "poste_learn_mails",
    "Learn mails at the relay by kind (spam, ham) and result (learned; refused: forged, "
    "stranger, empty; error: the database could not be written).",
    ["kind", "result"],
)

LEARN_BY_MX = Reply(550, "5.7.1 Learn mail is forwarded from your target address to our MX, "
                         "not sent through submission")
ALONE = Reply(452, "4.5.3 A learn address goes in a transaction of its own; send the rest again")


@dataclass(frozen=True)
class Sender:
    """Who a learn mail is from, as far as our verifier's results show."""

    address: str  # the From: address ("" when there is no single one)
    authenticated: str  # "spf" / "dkim": what passed aligned with it; "" when nothing did
    why: str = ""


def check_learn_db(path: str) -> None:
    """At start: the database must load and its folder take the atomic rename (ConfigError)."""
    import os

    from poste.spam.database import Database

    try:
        Database.load(path)
    except DatabaseError as exc:
        raise ConfigError("learn-db", str(exc)) from None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.access(folder, os.W_OK):
        raise ConfigError("learn-db", f"{folder} is not writable: a learnt database is "
                                      "written beside the old one and renamed over it")


def learn_kind(rcpt: str, is_local_domain: Callable[[str], bool]) -> bool | None:
    """True for learn-spam@, False for learn-ham@ one of our domains; None otherwise."""
    local, at, domain = rcpt.strip().strip("<>").rpartition("@")
    if not at:
        return None
    kind = LEARN_LOCALS.get(local.lower())
    if kind is None or not is_local_domain(domain):
        return None
    return kind


def our_results(header: bytes, srv_id: str) -> list[tuple[str, str, dict[str, str]]]:
    """(method, result, properties) of the topmost Authentication-Results, if it is `srv_id`'s.

    Our verifier prepends its field above everything the sender wrote, and
    nothing after it adds one, so the topmost field is ours.  Requiring the
    topmost (not, as the ARC seal does, the topmost of our id) also holds
    when `arc-authserv-id` names something else than the verifier: a sender's
    field with that name, below the verifier's, is still never read.
    """
    import authres

    msg = email.message_from_bytes(header, policy=email.policy.compat32)
    for value in (msg.get_all("Authentication-Results") or [])[:1]:
        text = str(value)
        if authserv_id(text.encode("utf-8", "replace")) != srv_id:
            return []
        try:
            parsed = authres.AuthenticationResultsHeader.parse(
                "Authentication-Results: " + " ".join(text.split()))
        except Exception:  # ours always parse; a damaged one proves nothing
            return []
        return [
            (str(r.method).lower(), str(r.result).lower(),
             {f"{p.type}.{p.name}".lower(): str(p.value) for p in r.properties})
            for r in parsed.results
        ]
    return []


def sender_of(header: bytes, srv_id: str) -> Sender:
    """The From address, and whether SPF or DKIM passed aligned with its domain."""
    msg = email.message_from_bytes(header, policy=email.policy.compat32)
    froms = msg.get_all("From") or []
    found = [a for _, a in email.utils.getaddresses([str(f) for f in froms]) if a]
    if len(froms) != 1 or len(found) != 1 or "@" not in found[0]:
        return Sender("", "", "no single From address")
    address = found[0]
    domain = domain_of(address)
    results = our_results(header, srv_id)
    if not results:
        return Sender(address, "", f"no Authentication-Results of {srv_id}")
    for method, result, props in results:
        if result != "pass":
            continue
        if method == "spf" and "smtp.mailfrom" in props:
            if aligned(domain_of(props["smtp.mailfrom"]) or props["smtp.mailfrom"], domain, "r"):
                return Sender(address, "spf")
        if method == "dkim" and aligned(props.get("header.d", ""), domain, "r"):
            return Sender(address, "dkim")
    return Sender(address, "", f"neither SPF nor DKIM passed aligned with {domain}")


def owner(db: UsersDB | None, domain: str, address: str) -> str | None:
    """The user of `domain` one of whose targets is `address` (their address), or None."""
    if db is None or not address:
        return None
    want = address.lower()
    for user in db:
        if domain_key(user.domain) == domain and any(t.lower() == want for t in user.targets):
            return user.address
    return None


class Learning:
    """The relay's handling of learn mails: recognise, check, train, reply."""

    def __init__(
        self,
        db_path: str,
        srv_id: str,
        users: Callable[[], UsersDB | None],
        is_local_domain: Callable[[str], bool],
    ) -> None:
        self.db_path = db_path
        self.srv_id = srv_id.strip().lower()
        self.users = users
        self.is_local_domain = is_local_domain

    def kind(self, rcpt: str) -> bool | None:
        return learn_kind(rcpt, self.is_local_domain)

    async def data(self, env: Envelope, rcpt: str, is_spam: bool, message: Message) -> Reply:
        """Train on the forwarded mail, or the reply saying why not; 250 once it is on disk."""
        kind = "spam" if is_spam else "ham"
        qid = env.queue_id
        sender = sender_of(message.header(), self.srv_id)
        domain = domain_of(rcpt)
        user = owner(self.users(), domain, sender.address)
        # One reply for both, so that it does not tell a stranger which addresses are targets.
        refusal = Reply(550, f"5.7.1 Learn mail refused: it must come from a target address of "
                             f"a user of {domain}, with SPF or DKIM passing aligned with it")
        if user is None:
            why = sender.why or "not a target address of a user of " + domain
            return self._refuse(kind, "stranger", qid, sender, why, refusal)
        if not sender.authenticated:
            return self._refuse(kind, "forged", qid, sender, sender.why, refusal)
        raw = message.head(LEARN_BYTES)
        original = await asyncio.to_thread(forwarded, raw)
        if original is None:
            return self._refuse(kind, "empty", qid, sender, "no forwarded mail", Reply(
                550, "5.6.0 No forwarded mail found: forward it as an attachment or inline"))
        try:
            got = await asyncio.to_thread(learn_into, self.db_path, original.raw, is_spam)
        except (OSError, DatabaseError) as exc:
            LEARN_MAILS.labels(kind, "error").inc()
            log.error("%s learn %s from <%s>: %s cannot be updated: %s",
                      qid, kind, sender.address, self.db_path, exc)
            return Reply(451, "4.3.0 Could not update the spam database, try again later")
        LEARN_MAILS.labels(kind, "learned").inc()
        log.info("%s learned %s (%s, %s) from <%s> for <%s> (%s pass): score %.4f -> %.4f "
                 "in %d step(s), %s", qid, kind, original.how, _size(original.raw),
                 sender.address, user, sender.authenticated, got.before, got.after, got.steps,
                 self.db_path)
        return Reply(250, f"2.0.0 Ok: learned as {kind}")

    def _refuse(
        self, kind: str, result: str, qid: str, sender: Sender, why: str, reply: Reply
    ) -> Reply:
        LEARN_MAILS.labels(kind, result).inc()
        log.warning("%s learn %s refused (%s) from <%s>: %s", qid, kind, result,
                    sender.address, why)
        return reply


def _size(raw: bytes) -> str:
    return f"{len(raw)} bytes"
