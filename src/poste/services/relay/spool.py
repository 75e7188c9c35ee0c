"""The relay's queue on disk: the one place where poste keeps mail.

Layout of a spool folder (format version 1, see docs/relay.md):

    SPOOL/VERSION          "poste-spool 1"
    SPOOL/ID.eml           the message, raw bytes as received (our Received: on top)
    SPOOL/ID.json          the envelope: sender, recipients and their delivery state
    SPOOL/.tmp-*           files being written (removed on start)
    SPOOL/lock             held (flock) by the one relay that owns the spool

Two kinds of lock keep concurrent hands apart.  The relay holds an exclusive
flock on SPOOL/lock for its whole life, so a second relay on the same spool
refuses to start.  Every read-modify-write of an envelope (the relay's state
update, `poste queue retry|delete`) holds an flock on that message's ID.eml,
the one file that never changes, and re-reads the envelope under it: two
writers never interleave, and the relay keeps a `retry` made while it was
delivering (see `Spool.modify`).

The envelope is the commit record.  `put` writes the message, then the
envelope, each to a temporary file that is fsynced and renamed into place,
then fsyncs the folder (one fsync shared by the mails arriving meanwhile,
folder_sync.py); only after that does the relay answer 250.  A message
file without an envelope is an interrupted write and is removed on start; an
envelope is always complete (rename is atomic).  Updates rewrite the envelope
the same way, so after a crash the state is the last one written: at worst a
recipient delivered just before the crash is delivered again (a duplicate,
never a loss).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poste.services.relay.folder_sync import FolderSync, fsync_dir
from poste.smtp.address import domain_of
from poste.smtp.message import Message
from poste.smtp.stage import new_queue_id

VERSION = "poste-spool 1"

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"


class SpoolError(Exception):
    pass


class SpoolLocked(SpoolError):
    """Another process owns the spool (one line: the relay's builder says it as is)."""


@dataclass
class Recipient:
    """One destination address of a queued message and where it stands."""

    address: str  # where we deliver (a target, after expansion)
    sender: str  # MAIL FROM for this recipient (SRS-rewritten when forwarded)
    original: str = ""  # the RCPT TO we accepted (ORCPT in DSNs)
    state: str = PENDING
    attempts: int = 0
    last_attempt: float | None = None
    last_reply: str = ""  # "250 2.0.0 Ok" / "451 4.4.1 ..." as the remote said it
    remote_mta: str = ""  # host that gave last_reply, if any

    @property
    def domain(self) -> str:
        return domain_of(self.address)


@dataclass
class Entry:
    """The envelope file of one queued message."""

    id: str
    return_path: str  # the original envelope sender: where DSNs go ("" = never)
    recipients: list[Recipient]
    created: float = field(default_factory=time.time)
    next_attempt: float = 0.0
    attempts: int = 0
    warned: bool = False  # a delay DSN was sent
    peer: str = ""  # IP the message came from
    helo: str = ""
    size: int = 0
    is_dsn: bool = False  # a bounce we generated: never bounced itself
    # the message file goes to DATA as it is (CRLF only, no line starting with a dot:
    # Message.wire_ready when it was queued), so delivery sends it unscanned
    wire_clean: bool = False

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def to_json(self) -> dict[str, Any]:
        # The fields by hand, not dataclasses.asdict (a recursive deep copy): the same
        # dict, written at least twice per mail (queued, then delivered or deferred).
        data = {k: getattr(self, k) for k in _ENTRY_FIELDS}
        data["recipients"] = [{k: getattr(r, k) for k in _RECIPIENT_FIELDS}
                              for r in self.recipients]
        data["version"] = 1
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        rcpts = [Recipient(**r) for r in data.get("recipients", [])]
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["recipients"] = rcpts
        return cls(**known)


_ENTRY_FIELDS = tuple(Entry.__dataclass_fields__)
_RECIPIENT_FIELDS = tuple(Recipient.__dataclass_fields__)


def write_atomic(folder: Path, target: Path, data: bytes | Message) -> None:
    """`data` at `target`, whole or not at all: written to a temporary file in `folder`
    (the target's), fsynced, renamed over it.  The caller fsyncs the folder (once for
    several files).  A Message is written piece by piece, never as one bytes object."""
    tmp = folder / f".tmp-{target.name}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for piece in data.chunks() if isinstance(data, Message) else (data,):
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.rename(tmp, target)


class Spool:
    """Blocking file operations on a spool folder (call them through asyncio.to_thread)."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
            version = self.path / "VERSION"
            if not version.exists():
                self._write_atomic(version, (VERSION + "\n").encode())
                fsync_dir(self.path)
        elif not self.path.is_dir():
            raise SpoolError(f"no spool folder at {self.path}")
        version = self.path / "VERSION"
        if version.exists() and version.read_text().strip() != VERSION:
            raise SpoolError(f"{version}: unknown spool format {version.read_text().strip()!r}")
        self._owner_fd: int | None = None
        # the folder fsync after a put, update or removal: shared by concurrent ones
        self.folder_sync = FolderSync(self.path)

    # -- ownership -------------------------------------------------------

    def lock(self) -> None:
        """Own the spool for this process's life; SpoolLocked if another relay does.

        An flock dies with its process (even on SIGKILL), so a crash never
        leaves a stale lock behind.  Idempotent for the same Spool object.
        """
        if self._owner_fd is not None:
            return
        path = self.path / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise SpoolLocked(
                f"spool {self.path} is in use by another relay (pid {holder})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._owner_fd = fd

    def unlock(self) -> None:
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None

    @contextlib.contextmanager
    def message_lock(self, qid: str) -> Iterator[None]:
        """Hold the per-message lock (flock on ID.eml); SpoolError if the message is gone.

        Blocking, and held only for a read-modify-write of the envelope, never
        across a delivery.  Not reentrant: a second open of the file in the
        same process waits for the first.
        """
        try:
            fd = os.open(self.message_path(qid), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SpoolError(f"no message {qid} in {self.path}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- paths -----------------------------------------------------------

    def message_path(self, qid: str) -> Path:
        return self.path / f"{qid}.eml"

    def envelope_path(self, qid: str) -> Path:
        return self.path / f"{qid}.json"

    # -- writing ---------------------------------------------------------

    def _write_atomic(self, target: Path, data: bytes | Message) -> None:
        write_atomic(self.path, target, data)

    def put(self, entry: Entry, message: Message | bytes) -> None:
        """Store a new message durably; when this returns the mail survives a crash.

        Written piece by piece from wherever the message is (memory or the
        DATA reader's file): a big mail is never one bytes object here.
        """
        if isinstance(message, bytes):
            message = Message.of(message)
        if not entry.id:
            entry.id = new_queue_id()
        entry.size = message.size
        entry.wire_clean = message.wire_ready()
        if self.envelope_path(entry.id).exists():
            raise SpoolError(f"queue id {entry.id} already in the spool")
        self._write_atomic(self.message_path(entry.id), message)
        self._write_atomic(self.envelope_path(entry.id), _dump(entry))
        self.folder_sync.sync()  # one folder fsync for the mails arriving meanwhile

    def update(self, entry: Entry) -> None:
        """Rewrite the envelope (delivery state) atomically, under the message lock.

        Refused once the message is gone (`poste queue delete` while a delivery
        ran), so a deleted message never comes back as an envelope alone.
        """
        self.modify(entry.id, lambda _current: entry)

    def modify(self, qid: str, change: Callable[[Entry], Entry | None]) -> Entry | None:
        """Read-modify-write one envelope under the message lock.

        `change` gets the envelope as it is on disk now and returns the one to
        write, or None to remove the message.  SpoolError if the message is
        gone.  Every writer goes through here, so no update is ever lost to
        another's stale copy.
        """
        with self.message_lock(qid):
            if not self.envelope_path(qid).exists():
                raise SpoolError(f"no message {qid} in {self.path}")
            new = change(self.load(qid))
            if new is None:
                self._remove_files(qid)
                return None
            self._write_atomic(self.envelope_path(qid), _dump(new))
            self.folder_sync.sync()
            return new

    def remove(self, qid: str) -> None:
        """Forget a message: envelope first (the commit record), then the bytes."""
        try:
            with self.message_lock(qid):
                self._remove_files(qid)
        except SpoolError:  # no message file: drop what is left
            self._remove_files(qid)

    def _remove_files(self, qid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.envelope_path(qid).unlink()
        with contextlib.suppress(FileNotFoundError):
            self.message_path(qid).unlink()
        self.folder_sync.sync()

    # -- reading ---------------------------------------------------------

    def load(self, qid: str) -> Entry:
        try:
            data = json.loads(self.envelope_path(qid).read_bytes())
        except FileNotFoundError:
            raise SpoolError(f"no message {qid} in {self.path}") from None
        except ValueError as exc:
            raise SpoolError(f"{self.envelope_path(qid)}: bad envelope: {exc}") from None
        return Entry.from_json(data)

    def read_message(self, qid: str) -> bytes:
        """The whole message as bytes (for `poste queue show`, tests); delivery uses open_message."""
        try:
            return self.message_path(qid).read_bytes()
        except FileNotFoundError:
            raise SpoolError(f"message file of {qid} is missing") from None

    def open_message(self, qid: str, wire_clean: bool = False) -> Message:
        """The message, read from its file as it is sent; close() it after.

        `wire_clean`: what its envelope says (`Entry.wire_clean`)."""
        try:
            return Message.open(self.message_path(qid), wire_clean=wire_clean)
        except FileNotFoundError:
            raise SpoolError(f"message file of {qid} is missing") from None

    def ids(self) -> list[str]:
        return sorted(p.name[:-5] for p in self.path.glob("*.json") if not p.name.startswith("."))

    def entries(self) -> Iterator[Entry]:
        for qid in self.ids():
            try:
                yield self.load(qid)
            except SpoolError:
                continue

    def recover(self, grace: float = 0.0) -> list[str]:
        """Remove what an interrupted write left behind; returns the names removed.

        Run at start, when no write is in flight.  `grace` spares files younger
        than that many seconds (for `poste queue` running beside a live relay).
        """
        removed: list[str] = []
        now = time.time()
        envelopes = {p.name[:-5] for p in self.path.glob("*.json")}
        for p in self.path.iterdir():
            stale = False
            if p.name.startswith(".tmp-"):
                stale = True
            elif p.suffix == ".eml" and p.name[:-4] not in envelopes:
                stale = True
            if stale:
                try:
                    if grace and now - p.stat().st_mtime < grace:
                        continue
                    p.unlink()
                    removed.append(p.name)
                except FileNotFoundError:
                    continue
        if removed:
            fsync_dir(self.path)
        return removed


def _dump(entry: Entry) -> bytes:
    """The envelope as one line of compact JSON (the same keys and values as ever, so
    any reader of format 1 reads it; indenting it cost more than writing it)."""
    return (json.dumps(entry.to_json(), separators=(",", ":"), sort_keys=True)
            + "\n").encode("utf-8")
