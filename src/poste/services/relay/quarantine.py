"""The quarantine: spam the relay keeps for a `quarantine` user instead of forwarding it.

Layout, in the spool's folder (docs/relay.md):

    SPOOL/quarantine/ID.eml      the message, exactly the bytes the spool would have
                                 queued (our Received: and ARC set on top)
    SPOOL/quarantine/ID.json     the envelope it would have had (an `Entry`) and
                                 what the digest shows: user, From, Subject, Date
    SPOOL/quarantine/journal     one JSON line per event (held, released, deleted,
                                 expired, digest): nothing leaves without a trace
    SPOOL/quarantine/digest-now  asks the running relay for a digest now

A mail is held the way the spool keeps one: message, then record, each
written to a temporary file, fsynced and renamed, then the folder fsynced,
and only then does the relay answer 250.  The record is the commit point;
a message file without one is an interrupted write (removed by `recover`).
Releasing puts message and envelope into the spool unchanged (`Spool.put`,
so a running relay picks it up at its next rescan and delivers it through
the normal path), then removes them here: at worst, after a crash between
the two, the mail is in both places, never in neither.
"""

from __future__ import annotations

import contextlib
import email.header
import email.parser
import email.policy
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poste.runtime.logs import escape
from poste.services.relay.folder_sync import fsync_dir
from poste.services.relay.spool import Entry, Spool, SpoolError, write_atomic
from poste.smtp.message import Message

FOLDER = "quarantine"
TRIGGER = "digest-now"


class QuarantineError(Exception):
    pass


@dataclass
class Held:
    """One held mail: the envelope it would have been queued with and what a person sees."""

    entry: Entry
    user: str  # the RCPT TO of the `quarantine` user
    sender: str  # header From, as written (decoded, one line)
    subject: str
    date: str
    held: float
    digested: bool = False

    @property
    def id(self) -> str:
        return self.entry.id

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1, "entry": self.entry.to_json(), "user": self.user,
            "from": self.sender, "subject": self.subject, "date": self.date,
            "held": self.held, "digested": self.digested,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Held:
        return cls(
            entry=Entry.from_json(data["entry"]), user=str(data.get("user", "")),
            sender=str(data.get("from", "")), subject=str(data.get("subject", "")),
            date=str(data.get("date", "")), held=float(data.get("held", 0.0)),
            digested=bool(data.get("digested", False)),
        )


def _oneline(text: str, limit: int = 200) -> str:
    """A header value for the digest and the terminal: decoded, one line, no control bytes."""
    try:
        parts = email.header.decode_header(text)
        text = "".join(
            p.decode(c or "utf-8", "replace") if isinstance(p, bytes) else p for p, c in parts
        )
    except (ValueError, LookupError):
        pass
    text = escape(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary_of(header: bytes) -> tuple[str, str, str]:
    """(From, Subject, Date) of a header block; compat32, which never raises on bad fields."""
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(header)
    return tuple(_oneline(str(msg.get(k, "") or "")) for k in ("From", "Subject", "Date"))  # type: ignore[return-value]


class Quarantine:
    """Blocking file operations on SPOOL/quarantine (call them through asyncio.to_thread)."""

    def __init__(self, spool_path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(spool_path) / FOLDER
        if create:
            self.path.mkdir(parents=True, exist_ok=True)

    def _write_atomic(self, target: Path, data: bytes | Message) -> None:
        write_atomic(self.path, target, data)  # as the spool writes

    def journal(self, event: str, held: Held, **more: Any) -> None:
        """Append one event line, fsynced: the trace of every mail that leaves the quarantine."""
        line = {"time": time.time(), "event": event, "id": held.id, "user": held.user,
                "from": held.sender, "subject": held.subject, "size": held.entry.size, **more}
        fd = os.open(self.path / "journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _eml(self, qid: str) -> Path:
        return self.path / f"{qid}.eml"

    def _json(self, qid: str) -> Path:
        return self.path / f"{qid}.json"

    def hold(self, entry: Entry, message: Message, user: str) -> Held:
        """Keep `message` durably; when this returns the mail survives a crash."""
        entry.size = message.size
        sender, subject, date = summary_of(message.header())
        held = Held(entry, user, sender, subject, date, time.time())
        if self._json(entry.id).exists():
            raise QuarantineError(f"id {entry.id} already in the quarantine")
        self._write_atomic(self._eml(entry.id), message)
        self._write_atomic(self._json(entry.id), _dump(held))
        fsync_dir(self.path)
        self.journal("held", held)
        return held

    def ids(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name[:-5] for p in self.path.glob("*.json") if not p.name.startswith("."))

    def load(self, qid: str) -> Held:
        if "/" in qid or qid.startswith("."):
            raise QuarantineError(f"not a quarantine id: {qid!r}")
        try:
            return Held.from_json(json.loads(self._json(qid).read_bytes()))
        except FileNotFoundError:
            raise QuarantineError(f"no mail {qid} in the quarantine {self.path}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise QuarantineError(f"{self._json(qid)}: bad record: {exc}") from None

    def entries(self) -> Iterator[Held]:
        for qid in self.ids():
            with contextlib.suppress(QuarantineError):
                yield self.load(qid)

    def read_message(self, qid: str) -> bytes:
        self.load(qid)
        try:
            return self._eml(qid).read_bytes()
        except FileNotFoundError:
            raise QuarantineError(f"message file of {qid} is missing") from None

    @contextlib.contextmanager
    def _locked(self, qid: str) -> Iterator[bool]:
        """Hold the mail's lock (flock on ID.eml, as the spool's): False if it is gone.

        The relay (marking a mail digested) and `poste quarantine` (release,
        delete) each change a record only under it, so neither undoes the other.
        """
        try:
            fd = os.open(self._eml(qid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._json(qid).exists()
        finally:
            os.close(fd)

    def update(self, held: Held) -> None:
        """Rewrite a record (the digest marks it); one released or deleted meanwhile stays gone."""
        with self._locked(held.id) as there:
            if there:
                self._write_atomic(self._json(held.id), _dump(held))
                fsync_dir(self.path)

    def _remove(self, qid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._json(qid).unlink()  # the commit record first
        with contextlib.suppress(FileNotFoundError):
            self._eml(qid).unlink()
        fsync_dir(self.path)

    def release(self, qid: str, spool: Spool) -> Held:
        """Into the spool, unchanged (its next rescan delivers it), then out of here."""
        self.load(qid)
        with self._locked(qid) as there:
            if not there:
                raise QuarantineError(f"no mail {qid} in the quarantine {self.path}")
            held = self.load(qid)
            message = Message.open(self._eml(qid))
            try:
                entry = held.entry
                # due now; its lifetime in the queue counts from the release, not the arrival
                entry.next_attempt = 0.0
                entry.created = time.time()
                try:
                    spool.put(entry, message)
                except SpoolError as exc:
                    raise QuarantineError(str(exc)) from None
            finally:
                message.close()
            self.journal("released", held)
            self._remove(qid)
        return held

    def delete(self, qid: str, why: str = "deleted") -> Held:
        self.load(qid)
        with self._locked(qid) as there:
            if not there:
                raise QuarantineError(f"no mail {qid} in the quarantine {self.path}")
            held = self.load(qid)
            self.journal(why, held)
            self._remove(qid)
        return held

    def expire(self, max_age: float, now: float | None = None) -> list[Held]:
        """Remove mail held longer than `max_age` seconds, each one journalled."""
        now = time.time() if now is None else now
        gone = []
        for held in list(self.entries()):
            if now - held.held >= max_age:
                with contextlib.suppress(QuarantineError):  # released or deleted meanwhile
                    gone.append(self.delete(held.id, "expired"))
        return gone

    def recover(self, grace: float = 0.0) -> list[str]:
        """Remove what an interrupted hold left (temporary files, a message without record);
        `grace` spares files younger than that (other relay workers hold mail here too)."""
        removed: list[str] = []
        if not self.path.is_dir():
            return removed
        now = time.time()
        records = {p.name[:-5] for p in self.path.glob("*.json")}
        for p in self.path.iterdir():
            if p.name.startswith(".tmp-") or (p.suffix == ".eml" and p.name[:-4] not in records):
                with contextlib.suppress(FileNotFoundError):
                    if grace and now - p.stat().st_mtime < grace:
                        continue
                    p.unlink()
                    removed.append(p.name)
        return removed

    # -- the operator's "digest now" ---------------------------------------

    def request_digest(self) -> None:
        self._write_atomic(self.path / TRIGGER, b"")
        fsync_dir(self.path)

    def take_digest_request(self) -> bool:
        try:
            (self.path / TRIGGER).unlink()
        except FileNotFoundError:
            return False
        return True

    def digest_requested(self) -> bool:
        return (self.path / TRIGGER).exists()


def _dump(held: Held) -> bytes:
    return (json.dumps(held.to_json(), indent=1, sort_keys=True) + "\n").encode("utf-8")
