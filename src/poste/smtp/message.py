"""The bytes of one mail on their way through poste, in bounded memory.

A mail is the fields poste prepended (small, in memory) above the body as it
was received: in memory while it is small, in an anonymous temporary file once
it passes `SPILL_AT` (the DATA reader writes it there as it arrives), or the
relay's spool file.  Stages read what they need (`header()`, `head()`), hops
copy it on in chunks (`chunks()`), and the few checks that need the whole mail
as one `bytes` (DKIM hashing through dkimpy) take it under a byte budget
(`whole()`), so 30 clients sending 24 MB each cost disk, not 30 x 24 MB of
memory times every copy a library makes (issue 15).

Why our own type: aiosmtpd hands a handler the whole content as bytes and
aiosmtplib sends only bytes; neither has a file-backed message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import functools
import os
import re
import tempfile
import weakref
from collections.abc import AsyncIterator, Callable, Iterator

SPILL_AT = 1024 * 1024  # bodies larger than this go to a file as they arrive
CHUNK = 256 * 1024  # the unit of reads and writes of a file-backed body
MAX_HEADER = 256 * 1024  # header() reads no further than this
WHOLE_BUDGET = 32 * 1024 * 1024  # bytes of file-backed mails held whole at once, per process
# (dkimpy needs about 4.7 times the mail: 32 MB lets one 25 MB mail, or a few smaller, at once)


class _Body:
    """The received bytes, in memory or in a file, shared by every prepended view."""

    __slots__ = ("__weakref__", "_ascii", "data", "fd", "size", "wire_clean")

    def __init__(self, data: bytes | None, fd: int | None, size: int,
                 wire_clean: bool = False) -> None:
        self.data = data
        self.fd = fd
        self.size = size
        self._ascii: bool | None = None
        # only CRLF line ends, complete lines, none starting with a dot: DATA carries
        # these bytes as they are (the DATA reader knows; anything else is scanned)
        self.wire_clean = wire_clean

    def isascii(self) -> bool:
        if self._ascii is None:
            if self.data is not None:
                self._ascii = self.data.isascii()
            else:
                self._ascii = all(
                    self.read(at, CHUNK).isascii() for at in range(0, self.size, CHUNK)
                )
        return self._ascii

    def read(self, offset: int, n: int) -> bytes:
        if self.data is not None:
            return self.data[offset:offset + n]
        assert self.fd is not None, "read of a closed message"
        return os.pread(self.fd, n, offset)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


class Message:
    """Prepended fields (`prefix`) above a body; every method reads, none copies the body.

    `skip` bytes at the start of the body are not part of this mail: a mail
    whose header was rewritten (`replace_field`) holds its new header in the
    prefix and shares the body below the old one.
    """

    __slots__ = ("_body", "_skip", "prefix")

    def __init__(self, body: _Body, prefix: bytes = b"", skip: int = 0) -> None:
        self.prefix = prefix
        self._body = body
        self._skip = skip

    @classmethod
    def of(cls, data: bytes) -> Message:
        """A message held in memory (what poste writes itself, tests, small mails)."""
        return cls(_Body(bytes(data), None, len(data)))

    @classmethod
    def open(cls, path: str | os.PathLike[str], wire_clean: bool = False) -> Message:
        """A message read from a file (the relay's spool) as it is sent; close() it after.

        `wire_clean`: the file was written from a mail whose `wire_ready()` was true."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return cls(_Body(None, fd, os.fstat(fd).st_size, wire_clean))

    @property
    def size(self) -> int:
        return len(self.prefix) + self._body.size - self._skip

    @property
    def wire_clean(self) -> bool:
        """The body goes to DATA as it is (the DATA reader vouched for it); the prefix
        is always scanned."""
        return self._body.wire_clean

    def wire_ready(self) -> bool:
        """The whole mail, prefix too, goes to DATA as it is: what the spool notes of the
        file it writes (`chunks()`), so a later send of that file needs no scan either.
        The prefix is scanned here (a few hundred bytes of our own fields)."""
        prefix = self.prefix
        return self._body.wire_clean and (
            not prefix or (prefix.endswith(b"\r\n") and to_wire(prefix) == prefix))

    @property
    def in_memory(self) -> bool:
        return self._body.data is not None

    def isascii(self) -> bool:
        """No 8-bit byte anywhere (else the hop needs BODY=8BITMIME); the body's answer is kept.

        (After `replace_field` the old header is still asked too: an 8-bit byte
        there may claim 8BITMIME for nothing, never the other way round.)"""
        return self.prefix.isascii() and self._body.isascii()

    def prepend(self, fields: bytes) -> Message:
        """The same mail with `fields` (complete lines) on top; the body is shared."""
        return Message(self._body, fields + self.prefix, self._skip)

    def replace_field(self, name: bytes, field: bytes) -> Message:
        """The same mail with its first `name` field (with its continuation lines)
        replaced by `field` (complete lines, CRLF-terminated).

        Only the header section is copied, into the new view's prefix; the body
        below it is shared, so a spilled mail stays in its file.  Raises
        KeyError when there is no such field or no header section to find it
        in (the relay passes such a mail on as it is).
        """
        header = self.header()
        if not header.endswith(b"\r\n\r\n"):
            raise KeyError("no header section")
        start = _field_start(header, name)
        if start < 0:
            raise KeyError(name.decode("ascii", "replace"))
        end = start
        while True:  # the field's lines: the first, then those starting with WSP
            end = header.index(b"\r\n", end) + 2
            if header[end:end + 1] not in (b" ", b"\t"):
                break
        new_header = header[:start] + field + header[end:]
        skip = self._skip + len(header) - len(self.prefix)
        if skip < self._skip:  # the whole header was prepended: the body stays as it is
            return Message(self._body, new_header + self.prefix[len(header):], self._skip)
        return Message(self._body, new_header, skip)

    def close(self) -> None:
        """Let go of the file now (it goes anyway when the last view is collected)."""
        self._body.close()

    # -- reading ---------------------------------------------------------------

    def head(self, limit: int) -> bytes:
        """The first `limit` bytes (a spam classifier reads no further than this)."""
        prefix = self.prefix
        if limit <= len(prefix):
            return prefix[:limit]
        return prefix + self._body.read(self._skip, limit - len(prefix))

    def header(self, limit: int = MAX_HEADER) -> bytes:
        """The header section through its blank line, or the first `limit` bytes without one.

        What DMARC's From, the hop count and the header From policy read: a
        mail's header is small even when its body is not.
        """
        start = self.head(limit)
        end = start.find(b"\r\n\r\n")
        if end >= 0:
            return start[:end + 4]
        if start.startswith(b"\r\n"):
            return b"\r\n"
        return start

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The whole mail in pieces of about `size` bytes, each ending at a line end
        when the mail has one (so a piece never starts inside a line)."""
        if self.prefix:
            yield self.prefix
        yield from self._body_chunks(size)

    def wire_chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The mail as DATA carries it (`to_wire`), in pieces: CRLF line ends, leading
        dots doubled, the end marker not included.

        A body the DATA reader vouched for (`wire_clean`) goes as it is: the four scans
        of `to_wire` cost ~4 ms per megabyte per hop here (issue 16), and on the three
        processes' topology each mail is sent three times.
        """
        if self.prefix:
            yield to_wire(self.prefix)
        if self._body.wire_clean:
            yield from self._body_chunks(size)
        else:
            for piece in self._body_chunks(size):
                yield to_wire(piece)

    def _body_chunks(self, size: int) -> Iterator[bytes]:
        body = self._body
        if body.data is not None:
            yield from _line_pieces(body.data[self._skip:] if self._skip else body.data, size)
            return
        offset = self._skip
        carry = b""
        while offset < body.size:
            piece = body.read(offset, size)
            if not piece:
                break
            offset += len(piece)
            piece = carry + piece
            cut = piece.rfind(b"\n") + 1
            if cut == 0 and offset < body.size:
                carry = piece  # one line longer than a piece: keep reading
                continue
            carry = piece[cut:]
            if cut:
                yield piece[:cut]
        if carry:
            yield carry

    def to_bytes(self) -> bytes:
        """The whole mail as one bytes object: for small mails; big ones go through whole()."""
        data = self._body.data
        if data is not None:
            if self._skip:
                return self.prefix + data[self._skip:]
            return self.prefix + data if self.prefix else data
        return b"".join(self.chunks())

    @contextlib.asynccontextmanager
    async def whole(self) -> AsyncIterator[bytes]:
        """The whole mail as bytes, for a check that cannot read it in pieces.

        A file-backed mail waits for its share of the process's budget and
        is read off the event loop; a small one is just given.
        """
        if self._body.data is not None:
            yield self.to_bytes()
            return
        budget = _budget()
        size = self.size
        await budget.acquire(size)
        try:
            yield await asyncio.to_thread(self.to_bytes)
        finally:
            budget.release(size)


# glibc's malloc, set for every long-running poste process (runtime/command.py
# and `poste up` start themselves again with these when they are missing; the
# systemd units set them): a buffer over 1 MB gets a mapping of its own, and a
# heap gives back what is free at its top past 512 KB, instead of glibc raising
# both thresholds to 32 and 64 MB after the first big free.  Not less than 512 KB:
# asyncio reads a socket into a fresh 256 KB buffer (its transports' max_size) and
# shrinks it to what came; with 128 KB every read gave the top of the heap back and
# the next one took it again (two brk calls and page faults: 19-37 us a read on a
# socketpair here, 4-7 us at 512 KB; a mail is ~30 reads across the three processes).
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "524288"}
TRIM_AFTER = 3.0  # seconds without a big mail before the heaps are trimmed


def give_back_soon() -> None:
    """Trim the heaps once big mails have stopped for TRIM_AFTER seconds.

    The checks of a big mail (dkimpy's list of lines, in worker threads with
    malloc arenas of their own) leave free memory in the middle of heaps,
    pinned by a small live object above it, which no threshold gives back.
    Measured with 30 mails of 24 MB: the verifier stayed at 226 MB with no
    live mail, and malloc_trim(0) took it to 61 MB.  One trim (a few ms,
    in a thread) after the last of a burst, not one per mail.
    """
    loop = asyncio.get_running_loop()
    pending = _TRIMS.pop(loop, None)
    if pending is not None:
        pending.cancel()
    _TRIMS[loop] = loop.call_later(TRIM_AFTER, _trim, loop)


def _trim(loop: asyncio.AbstractEventLoop) -> None:
    _TRIMS.pop(loop, None)
    trim = _malloc_trim()
    if trim is not None:
        loop.run_in_executor(None, trim, 0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        return None


_TRIMS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.TimerHandle] = (
    weakref.WeakKeyDictionary()
)


_LINE_ENDS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def to_wire(piece: bytes) -> bytes:
    """One piece of a mail (starting at a line start) as DATA carries it: CRLF line
    ends, leading dots doubled.

    The scans that find nothing to change are C loops over the bytes, so a
    clean piece costs no regex pass.
    """
    if piece.count(b"\n") != piece.count(b"\r\n") or piece.count(b"\r") != piece.count(b"\r\n"):
        piece = _LINE_ENDS.sub(b"\r\n", piece)
    if piece.startswith(b".") or b"\n." in piece:
        piece = _LEADING_DOT.sub(b"..", piece)
    return piece


def _field_start(header: bytes, name: bytes) -> int:
    """Where the first field called `name` (any case) starts in `header`, or -1."""
    want = name.lower().rstrip(b":")
    at = 0
    while at < len(header):
        end = header.find(b"\r\n", at)
        if end < 0:
            return -1
        colon = header.find(b":", at, end)
        if colon > at and header[at:at + 1] not in (b" ", b"\t") and \
                header[at:colon].rstrip(b" \t").lower() == want:
            return at
        at = end + 2
    return -1


def _line_pieces(data: bytes, size: int) -> Iterator[bytes]:
    if len(data) <= size:
        if data:
            yield data
        return
    start = 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + size) + 1
        if end <= start:
            end = data.find(b"\n", start + size) + 1 or len(data)
        yield data[start:end]
        start = end


class Budget:
    """Bytes of whole mails in memory at once, granted first come, first served.

    A mail larger than all of it waits until it can have the budget alone.
    """

    def __init__(self, limit: int = WHOLE_BUDGET) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, n: int) -> None:
        n = min(n, self.limit)
        if not self._waiters and self.used + n <= self.limit:
            self.used += n
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append((n, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release(n)  # granted just as the client went away
            self._grant()
            raise

    def release(self, n: int) -> None:
        self.used -= min(n, self.limit)
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            n, granted = self._waiters[0]
            if granted.done():
                self._waiters.popleft()
                continue
            if self.used + n > self.limit:
                return
            self._waiters.popleft()
            self.used += n
            granted.set_result(None)


_BUDGETS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Budget] = (
    weakref.WeakKeyDictionary()
)


def _budget() -> Budget:
    """One budget per event loop (a process has one; a test run has many)."""
    loop = asyncio.get_running_loop()
    budget = _BUDGETS.get(loop)
    if budget is None:
        budget = _BUDGETS[loop] = Budget()
    return budget


class BodyWriter:
    """Collects a body line by line: in memory up to `spill_at`, then in a temporary file.

    The file is anonymous (O_TMPFILE where the file system has it, else
    unlinked at once), so a crash leaves nothing behind and nothing but the
    open descriptor names it.  Writes go out in CHUNK pieces: a slow client
    holds at most about `spill_at` bytes of memory, however big its mail.
    """

    def __init__(self, spill_at: int = SPILL_AT, folder: str | None = None) -> None:
        self.spill_at = spill_at
        self.folder = folder
        self.size = 0
        # the pieces as the DATA reader wrote them, joined once (at the end, or a CHUNK
        # for the file): a bytearray copied each piece in, grew by reallocation, and
        # was copied once more at the end (issue 16: ~8% of a hop's CPU at 1 MB)
        self._parts: list[bytes] = []
        self._buffered = 0
        self._fd: int | None = None

    def write(self, line: bytes) -> None:
        self._parts.append(line)
        self._buffered += len(line)
        self.size += len(line)
        if self._buffered >= CHUNK and (self._fd is not None or self.size > self.spill_at):
            self._flush()

    def _flush(self) -> None:
        if self._fd is None:
            self._fd = _anonymous_file(self.folder)
        view = memoryview(b"".join(self._parts))
        while view:
            view = view[os.write(self._fd, view):]
        view.release()
        self._parts.clear()
        self._buffered = 0

    def discard(self) -> None:
        """Forget what was written (a refused mail is still read to its end)."""
        self._parts.clear()
        self._buffered = 0
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def finish(self, wire_clean: bool = False) -> Message:
        """The body written; `wire_clean`: the writer vouches for its line ends and dots
        (only CRLF, complete lines, no line starting with `.`: the DATA reader's check)."""
        if self._fd is None:
            data = b"".join(self._parts)  # one piece: no copy at all
            self.discard()
            return Message(_Body(data, None, len(data), wire_clean))
        if self._parts:
            self._flush()
        fd, self._fd = self._fd, None
        return Message(_Body(None, fd, self.size, wire_clean))


def _anonymous_file(folder: str | None) -> int:
    folder = folder or tempfile.gettempdir()
    flags = os.O_RDWR | os.O_CLOEXEC
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            return os.open(folder, flags | tmpfile, 0o600)
        except OSError:  # a file system without O_TMPFILE
            pass
    fd, path = tempfile.mkstemp(prefix=".poste-data-", dir=folder)
    os.unlink(path)
    return fd
