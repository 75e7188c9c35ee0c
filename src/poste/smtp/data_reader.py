"""The DATA reader's checks over large buffers, not per line.

Reading DATA one line at a time (`readuntil(b"\\r\\n")` and a few tests per line)
cost more than half of `poste up`'s CPU for a 1 MB mail (issue 16, the profile in
docs/performance.md).  `DotReader` takes whatever the socket gave (up to 256 KB at
once) and does the same work with C-speed bytes operations over all the complete
lines in it:

- the end of data is the first `.CRLF` at the start of a line (`CRLF.CRLF`, or `.CRLF`
  first of all); a `.` after a bare LF or CR, or after an overlong line's head, is not
  one (SMTP smuggling);
- a region of complete lines is clean when it has as many CR and as many LF as CRLF,
  no NUL, keeps the size under the limit and has no line longer than allowed; then its
  dot-stuffing is undone with one `replace` and it is written to the body at once;
- a region that is not clean goes through the per-line rules as before
  (`_slow`), so a refused mail gets the same reply as it always did (the first fault
  in the mail decides);
- an incomplete line longer than any allowed line is a line too long at once (the
  rest of it, up to its CRLF, is never an end of data), so memory stays bounded.
"""

from __future__ import annotations

import enum
from typing import Protocol


class DataState(enum.Enum):
    NOMINAL = "ok"
    TOO_LONG = "line too long"
    TOO_MUCH = "too big"
    BARE = "bare CR or LF"
    NUL = "NUL byte"


class Body(Protocol):
    def write(self, line: bytes) -> None: ...
    def discard(self) -> None: ...


class DotReader:
    """Feed it the bytes of DATA as they come; it finds the end, checks and unstuffs."""

    def __init__(self, body: Body, limit: int, max_line: int) -> None:
        self.body = body
        self.limit = limit  # bytes of the mail as sent (dot-stuffed), CRLFs included
        self.max_line = max_line  # bytes of a line once unstuffed, CRLF included
        self.state = DataState.NOMINAL
        self.size = 0
        self._tail = b""  # the start of a line whose CRLF has not come yet
        self._fragment = False  # inside the rest of an overlong line

    def feed(self, chunk: bytes) -> bytes | None:
        """Take `chunk`; None while the end of data is to come, else what follows it."""
        data = self._tail + chunk if self._tail else chunk
        self._tail = b""
        pos = 0
        if self._fragment:  # skip to the end of the overlong line, never an end of data
            i = data.find(b"\r\n")
            if i < 0:
                self._tail = b"\r" if data.endswith(b"\r") else b""
                return None
            self._fragment = False
            pos = i + 2
        if data.startswith(b".\r\n", pos):
            return data[pos + 3:]
        j = data.find(b"\r\n.\r\n", pos)
        if j >= 0:
            self._take(data[pos:j + 2])
            return data[j + 5:]
        last = data.rfind(b"\r\n", pos)
        if last >= 0:
            self._take(data[pos:last + 2])
            pos = last + 2
        rest = data[pos:]
        if len(rest) > self.max_line + 1:  # longer than any line can be, even dot-stuffed
            self._fault(DataState.TOO_LONG)
            self._fragment = True
            self._tail = b"\r" if rest.endswith(b"\r") else b""
        else:
            self._tail = rest
        return None

    def _fault(self, state: DataState) -> None:
        if self.state is DataState.NOMINAL:
            self.state = state
        self.body.discard()

    def _take(self, region: bytes) -> None:
        """Complete lines (the region ends with CRLF), none of them the end of data."""
        if not region:
            return
        before = self.size
        self.size += len(region)
        if self.state is not DataState.NOMINAL:
            return
        crlf = region.count(b"\r\n")
        clean = (
            region.count(b"\r") == crlf
            and region.count(b"\n") == crlf
            and b"\x00" not in region
            and self.size <= self.limit
        )
        if clean and len(region) > self.max_line:
            # 2 for the CRLF; a dot-stuffed line may be one longer (the slow path decides)
            clean = max(map(len, region.split(b"\r\n"))) + 2 <= self.max_line
        if not clean:
            self._slow(region, before)
            return
        if region.startswith(b"."):
            region = region[1:]
        self.body.write(region.replace(b"\r\n.", b"\r\n"))

    def _slow(self, region: bytes, size: int) -> None:
        """The per-line rules, in their order: the first fault of the mail decides."""
        for part in region.split(b"\r\n")[:-1]:
            if len(part) > self.max_line:
                # Past what the line reader ever held: too long, whatever else it holds
                # (and not counted in the size, as the line reader never took it whole).
                self._fault(DataState.TOO_LONG)
                continue
            line = part + b"\r\n"
            size += len(line)
            if self.state is not DataState.NOMINAL:
                continue
            if b"\r" in part or b"\n" in part:
                self._fault(DataState.BARE)
                continue
            if b"\x00" in line:
                # RFC 5321 forbids NUL in text; a downstream MTA that strips it could
                # see an end of data we never saw (`\r\n\x00.\r\n`): smuggling.
                self._fault(DataState.NUL)
                continue
            if size > self.limit:
                self._fault(DataState.TOO_MUCH)
                continue
            if line.startswith(b"."):
                line = line[1:]
            if len(line) > self.max_line:
                self._fault(DataState.TOO_LONG)
                continue
            self.body.write(line)
