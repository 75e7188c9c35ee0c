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

Costs per megabyte on this 2-core machine (issue 16, the separate processes pay them
on each of three hops): `count(b"\r\n")` ~2 ms, each one-byte `count` ~0.8 ms,
`split` of the lines ~4.7 ms, a search for a byte that is not there (`memchr`)
~0.01-0.1 ms.  So the line lengths are checked by `rfind` of the last LF in each
window of `max_line` bytes (one call per ~1000 bytes, not one object per line), and
a region without a `.` (base64, the bulk of a big mail) skips the end-of-data search
and the unstuffing.  `dotted` says whether any line lost a leading dot: a mail
without one is sent on as it is, without a scan (`Message.wire_clean`).
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
        self.dotted = False  # some line of the body lost its leading dot (was dot-stuffed)

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
        dot = data.find(b".", pos)  # memchr: no dot, no end of data (most of a base64 body)
        j = -1 if dot < 0 else data.find(b"\r\n.\r\n", max(pos, dot - 2))
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
            # CRLF included; a dot-stuffed line may be one longer (the slow path decides)
            clean = lines_fit(region, self.max_line)
        if not clean:
            self._slow(region, before)
            return
        if b"." not in region:  # memchr: nothing to unstuff
            self.body.write(region)
            return
        if region.startswith(b"."):
            region = region[1:]
            self.dotted = True
        out = region.replace(b"\r\n.", b"\r\n")
        if len(out) != len(region):
            self.dotted = True
        self.body.write(out)

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
                self.dotted = True
            if len(line) > self.max_line:
                self._fault(DataState.TOO_LONG)
                continue
            self.body.write(line)


def lines_fit(region: bytes, max_line: int) -> bool:
    """Every line of `region` (complete lines, LF-terminated) has at most `max_line` bytes,
    its line end included.

    The last LF of each window of `max_line` bytes from a line start ends the lines
    wholly inside the window, each no longer than it; no LF in the window: the line
    starting there is longer.  One `rfind` per window, not one object per line.
    """
    start, end = 0, len(region)
    while start < end:
        last = region.rfind(b"\n", start, start + max_line)
        if last < 0:
            return False
        start = last + 1
    return True
