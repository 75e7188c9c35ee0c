"""Learning from one mail a user sends back: the forwarded original, and the locked update.

A forwarding-only user (Gmail behind poste) has no Junk folder we could read,
so they tell us by forwarding: the mail they forward to `learn-spam@` or
`learn-ham@` carries the one to learn, either attached or inline.  What is
taken out of the wrapper (`forwarded`):

- **attached** (`message/rfc822`, what "forward as attachment" makes in
  Gmail, Outlook and Thunderbird; or an attachment named `*.eml`): the
  first such part, as it is, with its own header (Received, From, Subject,
  links...).  This is the good way: every token of the original is there.
- **inline** (Gmail's plain "Forward"): the first text part of the wrapper,
  from its forward marker line (`---------- Forwarded message ---------`,
  `-------- Original Message --------`, `Begin forwarded message:`, and the
  same in a few languages) on: the `Name: value` lines right after the
  marker become the header (From, Date, Subject, To, Cc as the forwarder's
  client quoted them), the rest the body.  Without a marker, the lines
  quoted with `>` are the body.  Only what the client quoted survives: no
  Received, Message-ID or MIME structure, so an inline forward teaches the
  words, the sender and the links, but not the header tokens.

The wrapper itself (the user's own From, their client's signature) is never
trained: it would teach the user's own address as spam.

A learn mail is trained again and again until its original scores past the
goal (`teach`: one FTRL step barely moves a mail never seen).

`learn_into` (the relay's learn mails) and `update_into` (`poste spam train
--update`) are one read-modify-write of a database file: under an exclusive
`flock` on `DB.lock` beside it (two learners never lose each other's step;
the database itself is replaced by rename, so it cannot carry the lock),
loaded fresh from disk (an operator's retraining is not undone by a stale
copy in memory), trained, and written atomically (`Database.save`: temporary
file, fsync, rename, fsync of the folder).  When it returns, the step is on
disk: only then may the sender be told 250.
"""

from __future__ import annotations

import email
import email.policy
import fcntl
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message as EmailMessage

from poste.spam.database import BIAS, MEMBERS, Database, Learning, _sigmoid, scale
from poste.spam.mime import DEFAULT_MAX_BYTES
from poste.spam.tokenizer import tokenize

# One learn mail moves the shared model until its original scores past these
# (beyond the default cutoffs 0.97 / 0.10, with room for the next copy's
# different Received: and A-R fields), in at most MAX_STEPS FTRL steps (with the
# one-model shipped database of alpha 0.3, a 40-token spam scored 0.58 needed 24).  One plain FTRL
# step barely moves a mail the model has never seen (a new token's first |z|
# is at most 1, often under l1, so its weight stays 0): a user who took the
# trouble to forward a spam expects the next copy to be caught.
SPAM_GOAL = 0.99
HAM_GOAL = 0.01
MAX_STEPS = 32

_MARKER = re.compile(
    r"^\s*(?:-{2,}\s*(?:forwarded message|original message|message transf[ée]r[ée]|"
    r"weitergeleitete nachricht|mensaje reenviado|messaggio inoltrato|"
    r"doorgestuurd bericht)\s*-{2,}|begin forwarded message:)\s*$",
    re.IGNORECASE,
)
_PSEUDO_FIELD = re.compile(r"^\s*\*?([A-Za-z][A-Za-z-]{0,30})\*?:\s*(.*)$")
_FIELD_NAMES = {
    # what clients write above an inline forward, in a few languages -> our field
    "from": "From", "de": "From", "von": "From", "van": "From", "da": "From",
    "sent": "Date", "date": "Date", "datum": "Date", "envoyé": "Date", "gesendet": "Date",
    "subject": "Subject", "objet": "Subject", "betreff": "Subject", "asunto": "Subject",
    "onderwerp": "Subject", "oggetto": "Subject",
    "to": "To", "à": "To", "an": "To", "para": "To", "aan": "To", "a": "To",
    "cc": "Cc", "reply-to": "Reply-To",
}


@dataclass(frozen=True)
class Forwarded:
    """The mail to learn from, and how it was found ("attached" or "inline")."""

    raw: bytes
    how: str


def forwarded(raw: bytes) -> Forwarded | None:
    """The original out of a forwarding wrapper, or None when there is none to find."""
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception:  # compat32 rarely raises; a wrapper it cannot read has nothing to learn
        return None
    for part in _parts(msg):
        got = _attached(part)
        if got is not None:
            return Forwarded(got, "attached")
    for part in _parts(msg):
        if part.get_content_type() == "text/plain" and not _is_attachment(part):
            got = _inline(_text_of(part))
            if got is not None:
                return Forwarded(got, "inline")
    return None


def _parts(msg: EmailMessage, depth: int = 0) -> Iterator[EmailMessage]:
    """The parts of the wrapper, depth first, not into attached messages (bounded)."""
    yield msg
    if depth > 8 or not msg.is_multipart() or msg.get_content_type() == "message/rfc822":
        return
    payload = msg.get_payload()
    if isinstance(payload, list):
        for sub in payload[:64]:
            if isinstance(sub, EmailMessage):
                yield from _parts(sub, depth + 1)


def _is_attachment(part: EmailMessage) -> bool:
    return (part.get("Content-Disposition") or "").strip().lower().startswith("attachment")


def _attached(part: EmailMessage) -> bytes | None:
    ctype = part.get_content_type()
    if ctype == "message/rfc822":
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], EmailMessage):
            try:
                return inner[0].as_bytes(policy=email.policy.compat32.clone(linesep="\r\n"))
            except Exception:
                return None
        return None
    name = (part.get_filename() or "").lower()
    if name.endswith(".eml") and not part.is_multipart():
        data = part.get_payload(decode=True)
        return data if isinstance(data, bytes) and data.strip() else None
    return None


def _text_of(part: EmailMessage) -> str:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def _inline(text: str) -> bytes | None:
    lines = text.replace("\r\n", "\n").split("\n")
    start = next((i for i, line in enumerate(lines) if _MARKER.match(line)), None)
    if start is not None:
        rest = lines[start + 1 :]
        if rest and all(not x.strip() or x.lstrip().startswith(">") for x in rest):
            rest = [_unquote(x) for x in rest]
    else:
        quoted = [x for x in lines if x.lstrip().startswith(">")]
        if not quoted:
            return None
        rest = [_unquote(x) for x in quoted]
    fields: list[str] = []
    i = 0
    while i < len(rest) and not rest[i].strip():
        i += 1
    while i < len(rest):
        m = _PSEUDO_FIELD.match(rest[i])
        if not m:
            break
        name = _FIELD_NAMES.get(m.group(1).lower())
        if name is not None:
            fields.append(f"{name}: {_oneline(m.group(2))}")
        i += 1
    body = "\n".join(rest[i:]).strip("\n")
    if not body.strip() and not fields:
        return None
    head = "\r\n".join([*fields, "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8"])
    return (head + "\r\n\r\n" + body.replace("\n", "\r\n") + "\r\n").encode("utf-8")


def _unquote(line: str) -> str:
    line = line.lstrip()
    if line.startswith(">"):
        line = line[1:]
        if line.startswith(" "):
            line = line[1:]
    return line


def _oneline(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text).strip()[:998]


# -- the locked update ----------------------------------------------------------

_thread_lock = threading.Lock()  # flock is per open file: threads of one process wait here


@contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive hold of the database at `path` for a read-modify-write (blocks)."""
    lock_path = os.fspath(path) + ".lock"
    with _thread_lock:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock


@dataclass(frozen=True)
class Learnt:
    """What one learn step did: FTRL steps taken, the original's score before and after."""

    steps: int
    before: float
    after: float


def teach(db: Database, tokens: Iterable[str], is_spam: bool) -> Learnt:
    """Train `db` on one mail until it scores past the goal (at most MAX_STEPS steps)."""
    feats = frozenset(tokens)
    before = score = _score(db, feats)
    steps = 0
    bias: list[tuple[float, float]] | None = None
    while steps < MAX_STEPS and (score < SPAM_GOAL if is_spam else score > HAM_GOAL):
        db.train(feats, is_spam)  # a step of every member
        steps += 1
        if bias is None:
            bias = db.bias_state()
        else:
            # Steps after the first move the mail's own tokens, not the bias: the
            # bias is in every mail, and 32 steps of one spam on it would push
            # every mail's score towards spam.
            db.set_bias_state(bias)
        score = _score(db, feats)
    if steps > 1:  # the mail counts once, in the counts and in its tokens' mail counts
        if is_spam:
            db.nspam -= steps - 1
        else:
            db.nham -= steps - 1
        seen = db.seen
        for t in feats:
            seen[t] -= steps - 1
    if steps == 0:  # already where the user wants it: still counted as one mail of its kind
        if is_spam:
            db.nspam += 1
        else:
            db.nham += 1
        db.generation += 1
    return Learnt(steps, before, score)


def _score(db: Database, feats: frozenset[str]) -> float:
    """The classifier's score of these tokens, from the mail's own weights only.

    (A Classifier would rebuild its table of every weighted token after each step.)
    """
    weights = [db.weight(t) for t in feats]
    weights.append(db.weight(BIAS))
    x = scale(len(feats) + 1, db.learning.length)
    return _sigmoid(x * math.fsum(weights))


def learn_into(
    path: str | os.PathLike[str],
    raw: bytes,
    is_spam: bool,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Learnt:
    """Teach the database file at `path` one mail, durably (locked, atomic, fsync'd).

    Raises DatabaseError (the file is damaged) or OSError (it cannot be
    read or written); the file is then as it was.
    """
    tokens = tokenize(raw, max_bytes)  # outside the lock: the lock is for the file
    with locked(path):
        db = Database.load(path)
        got = teach(db, tokens, is_spam)
        db.save(path, compress=_is_gzip(path))
    return got


def _is_gzip(path: str | os.PathLike[str]) -> bool:
    """Write it back as it was: a gzipped file stays gzipped whatever its name."""
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


# -- noticing a new file ------------------------------------------------------------


def stamp(path: str | os.PathLike[str]) -> tuple[int, int, int, int, int] | None:
    """What changes whenever the file is replaced or rewritten (None: not there).

    A rename gives a new inode; device, size, mtime and ctime in nanoseconds
    cover an inode number reused by the filesystem.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def update_into(
    path: str | os.PathLike[str],
    mails: list[tuple[frozenset[str], bool]],
    epochs: int = 5,
    *,
    min_count: int = 1,
    drop_prefixes: tuple[str, ...] = (),
    sparse: bool = False,
    note: str | None = None,
    compress: bool | None = None,
    members: int = MEMBERS,
    seed: int = 0,
    merge: bool = False,
    learning: Learning | None = None,
) -> tuple[Database, int]:
    """`poste spam train --update`: go on learning the file at `path` from tokenized mails.

    The same read-modify-write as a learn mail (locked, loaded fresh, saved
    atomically), so an operator's batch and the users' learn mails never
    undo each other.  A missing file starts from an empty database of
    `members` members (and `learning`'s knobs); an existing one keeps its own
    members and knobs, each member trained on.
    Returns the database written and how many tokens were dropped.
    """
    with locked(path):
        if os.path.exists(path):
            db = Database.load(path)
            if compress is None:
                compress = _is_gzip(path) or None
        else:
            db = Database(learning, members=members)
        dropped = train_into(db, mails, epochs, min_count=min_count,
                             drop_prefixes=drop_prefixes, sparse=sparse, note=note, seed=seed,
                             merge=merge)
        db.save(path, compress=compress)
    return db, dropped


def train_into(
    db: Database,
    mails: Sequence[tuple[Iterable[str], bool]],
    epochs: int,
    *,
    min_count: int = 1,
    drop_prefixes: tuple[str, ...] = (),
    sparse: bool = False,
    note: str | None = None,
    seed: int = 0,
    merge: bool = False,
) -> int:
    """Train `db` on tokenized mails (`poste spam train`, with or without --update).

    Rare tokens (`min_count`) and `drop_prefixes` are left out before learning,
    so the other weights are learnt without them.  Returns how many tokens were
    dropped.
    """
    if drop_prefixes or min_count > 1:
        seen = dict(db.seen)
        if min_count > 1:
            for tokens, _ in mails:
                for t in tokens:
                    seen[t] = seen.get(t, 0) + 1
        pre = drop_prefixes
        mails = [
            (frozenset(t for t in tokens if not (pre and t.startswith(pre))
                       and (min_count < 2 or seen.get(t, 0) >= min_count)), is_spam)
            for tokens, is_spam in mails
        ]
    db.fit(mails, epochs, seed)
    dropped = db.prune(min_count) if min_count > 1 else 0
    dropped += db.drop_prefixes(drop_prefixes)
    if sparse:
        dropped += db.sparse()
    if merge:
        db.merge()
    if note is not None:
        db.note = note
    return dropped
