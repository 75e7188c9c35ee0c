"""Read mails from where people keep them: folders, Maildirs, mboxes, tarballs.

A PATH is one of:
- a Maildir (a folder with cur/ and new/): every file in cur/ and new/;
- any other folder: every regular file below it (recursively, sorted), one mail
  per file, except files named *.mbox, *.mbx or *.tar.gz/*.tgz, read as such;
- a file starting with "From ": an mbox (mboxrd: one ">" is removed from
  ">From " lines);
- a .tar.gz / .tgz: every regular member, one mail per member (members
  named *.mbox are read as mboxes); `ARCHIVE.tar.gz:FOLDER` reads only the
  members under FOLDER;
- any other file: one mail.
Hidden files (dot files) are skipped everywhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

# not `from typing import TYPE_CHECKING`: typing costs a batch command ~5 ms of start-up
TYPE_CHECKING = False

if TYPE_CHECKING:
    from io import BufferedIOBase
    from pathlib import Path

    Buffer = bytes | bytearray

_QUOTED_FROM = re.compile(rb"^>(>*From )", re.M)
_FROM_LINE = re.compile(rb"\nFrom ")
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_MBOX_SUFFIXES = (".mbox", ".mbx")


class CorpusError(Exception):
    """A PATH that is neither a mail, a folder of mails, an mbox nor an archive."""


def split_mbox(data: Buffer) -> Iterator[bytes]:
    """The messages of an mbox, From_ lines removed, ">From " unquoted once.

    The same messages as unquote_mbox over split_mbox_raw, but each is
    copied out of `data` once (its blank last line cut by offset), not
    sliced again to cut it: reading an mbox was a tenth of `poste spam
    classify`'s own time.
    """
    starts = _starts(data)
    starts.append(len(data))
    with memoryview(data) as view:
        yield from _cut(data, view, starts, len(starts) - 1)


_PIECE = 1 << 20  # what split_mbox_file reads at a time (its buffer grows for a longer mail)


def split_mbox_file(f: BufferedIOBase, piece: int = _PIECE) -> Iterator[bytes]:
    """split_mbox(f.read()), read piece by piece into one buffer that is used again.

    Why not f.read(): that copies the whole mbox into fresh memory (a page
    fault and a copy per 4 KB; 1,900 faults and 10 ms of `poste spam
    classify` on the 4 MB benchmark mbox) before each message is copied out
    of it once more.  Why not mmap, which avoided that until 2026-12-04: a
    file another program truncates while it is mapped (a mail client
    compacting the mbox) ends the process with SIGBUS, no error line, no
    output.  Here the buffer's pages fault once and each message is copied
    out once; a file that shrinks under the reader just ends early.
    Messages are cut exactly as split_mbox cuts them (tests compare both
    over pieces of every size).
    """
    buf = bytearray(piece)
    have = 0  # bytes of buf holding the file
    starts: list[int] = []  # where the messages not yet given begin in buf
    scan = 0  # "\nFrom " matches starting at or after this are still to be found
    first = True
    while True:
        if have == len(buf):  # one message fills the buffer: make it bigger
            buf.extend(bytes(len(buf)))
        with memoryview(buf) as view:
            n = f.readinto(view[have:])
        eof = not n
        have += n or 0
        if (first and have >= 5) or eof:
            if first and buf[:5] == b"From ":
                starts.append(0)
            first = False
        starts.extend([m.start() + 1 for m in _FROM_LINE.finditer(buf, scan, have)])
        scan = max(have - 5, 0)  # a match can begin in the last 5 bytes and end in the next piece
        done = len(starts) if eof else len(starts) - 1  # the last one may not be whole yet
        if done > 0:
            if eof:
                starts.append(have)
            with memoryview(buf) as view:
                yield from _cut(buf, view, starts, done)
            if eof:
                return
            keep = starts[done]  # the first message not whole yet moves to the front
            buf[: have - keep] = buf[keep:have]
            have -= keep
            scan = max(scan - keep, 0)
            starts = [0]
        elif eof:
            return
        elif not starts:  # text before the first From_ line: split_mbox drops it
            buf[: have - scan] = buf[scan:have]
            have -= scan
            scan = 0


def _cut(data: Buffer, view: memoryview, starts: list[int], count: int) -> Iterator[bytes]:
    """The first `count` messages of data at `starts` (starts[count] ends the last one).

    Each message is copied out once, through `view` (a bytearray's slice
    would be a copy, then bytes() a second).
    """
    find = data.find
    for k in range(count):
        s, end = starts[k], starts[k + 1]
        eol = find(b"\n", s, end)
        cut = end if eol < 0 else eol + 1
        if end - cut >= 4 and data[end - 4 : end] == b"\r\n\r\n":
            end -= 2
        elif end - cut >= 2 and data[end - 2 : end] == b"\n\n":
            end -= 1
        msg = bytes(view[cut:end])
        if b">From " in msg:
            msg = _QUOTED_FROM.sub(rb"\1", msg)
        yield msg


def _is_mbox_name(name: str) -> bool:
    return name.lower().endswith(_MBOX_SUFFIXES)


def _is_tar_name(name: str) -> bool:
    return name.lower().endswith(_TAR_SUFFIXES)


def iter_messages(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, raw bytes) of every mail at PATH; raises CorpusError if PATH is unusable."""
    if (
        not _is_tar_name(path)
        and path == os.path.normpath(path)
        and os.path.isfile(path)
        and path[-1:] != "/"
    ):
        # a plain file, named as pathlib would name it: read without pathlib,
        # whose import (urllib.parse, ipaddress) costs a batch command ~15 ms of start-up
        try:
            with open(path, "rb") as f:
                head = f.read(5)
                if head == b"From " or _is_mbox_name(os.path.basename(path)):
                    f.seek(0)
                    for i, msg in enumerate(split_mbox_file(f), 1):
                        yield f"{path}:{i}", msg
                    return
                data = head + f.read()
        except OSError as exc:
            raise CorpusError(f"cannot read {path}: {exc.strerror}") from None
        yield path, data
        return
    from pathlib import Path  # not at module level: `mark` only splits mboxes

    p = Path(path)
    if not p.exists():
        for suffix in (".tar.gz:", ".tgz:", ".tar:"):
            if suffix in path:
                archive, _, folder = path.partition(suffix)
                archive += suffix[:-1]
                if Path(archive).is_file():
                    yield from _iter_tar(archive, folder.strip("/"))
                    return
        raise CorpusError(f"no such file or folder: {path}")
    if p.is_dir():
        yield from _iter_dir(p)
    elif _is_tar_name(p.name):
        yield from _iter_tar(str(p), "")
    else:
        yield from _iter_file(p, top=True)


def _iter_file(p: Path, top: bool) -> Iterator[tuple[str, bytes]]:
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CorpusError(f"cannot read {p}: {exc.strerror}") from None
    if _is_mbox_name(p.name) or (top and data.startswith(b"From ")):
        for i, msg in enumerate(split_mbox(data), 1):
            yield f"{p}:{i}", msg
    else:
        yield str(p), data


def _iter_dir(p: Path) -> Iterator[tuple[str, bytes]]:
    from pathlib import Path

    if (p / "cur").is_dir() and (p / "new").is_dir():
        folders = [p / "cur", p / "new"]
        for folder in folders:
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.is_file() and not entry.name.startswith("."):
                    yield from _iter_file(Path(entry.path), top=False)
        return
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            full = Path(root) / name
            if _is_tar_name(name):
                yield from _iter_tar(str(full), "")
            elif full.is_file():
                yield from _iter_file(full, top=False)


def _iter_tar(archive: str, folder: str) -> Iterator[tuple[str, bytes]]:
    import tarfile  # costs start-up time; most runs read plain files

    prefix = folder + "/" if folder else ""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.isfile()
                and m.name.startswith(prefix)
                and not any(part.startswith(".") for part in m.name.split("/"))
            ]
            members.sort(key=lambda m: m.name)
            found = False
            for m in members:
                f = tar.extractfile(m)
                if f is None:
                    continue
                data = f.read()
                found = True
                name = f"{archive}:{m.name}"
                if _is_mbox_name(m.name):
                    for i, msg in enumerate(split_mbox(data), 1):
                        yield f"{name}:{i}", msg
                else:
                    yield name, data
            if folder and not found:
                raise CorpusError(f"no mail under {folder}/ in {archive}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CorpusError(f"cannot read archive {archive}: {exc}") from None


def _starts(data: Buffer) -> list[int]:
    """Where each message of an mbox begins: at each line starting with "From ".

    One regex scan: the regex engine skips to each newline by its literal
    prefix, faster here than bytes.find (whose two-way search is made for
    rarer needles), and nothing is copied to search it.
    """
    starts = [0] if data[:5] == b"From " else []
    starts.extend([m.start() + 1 for m in _FROM_LINE.finditer(data)])
    return starts


def split_mbox_raw(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(From_ line, message as stored) pairs, for rewriting an mbox as it was."""
    starts = _starts(data)
    for k, s in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(data)
        eol = data.find(b"\n", s, end)
        cut = end if eol < 0 else eol + 1
        yield data[s:cut], data[cut:end]


def unquote_mbox(msg: bytes) -> bytes:
    """A message as stored in an mbox back to the mail it was."""
    if msg.endswith(b"\r\n\r\n"):
        msg = msg[:-2]
    elif msg.endswith(b"\n\n"):
        msg = msg[:-1]
    if b">From " in msg:
        msg = _QUOTED_FROM.sub(rb"\1", msg)
    return msg


def count_messages(path: str) -> int:
    """A cheap estimate of how many mails PATH holds (for a progress bar)."""
    import tarfile
    from pathlib import Path

    p = Path(path)
    try:
        if p.is_dir():
            return sum(
                len([f for f in files if not f.startswith(".")]) for _, _, files in os.walk(p)
            )
        if _is_tar_name(p.name):
            with tarfile.open(p, "r:*") as tar:
                return sum(1 for m in tar.getmembers() if m.isfile())
        if p.is_file():
            with open(p, "rb") as f:
                head = f.read(5)
                if head != b"From " and not _is_mbox_name(p.name):
                    return 1
                f.seek(0)
                data = f.read()
            return data.count(b"\nFrom ") + data.startswith(b"From ")
    except (OSError, tarfile.TarError, EOFError):
        return 0
    return 0


def mail_time(raw: bytes) -> float | None:
    """When a mail arrived: the date of its first (topmost) Received: field, else its Date:.

    The topmost Received: is written by the receiving site itself, so it
    cannot be forged by the sender the way Date: (often nonsense in spam)
    can.  None when neither parses.  For ordering a corpus by time.
    """
    from email.utils import mktime_tz, parsedate_tz

    end = raw.find(b"\n\n")
    end2 = raw.find(b"\r\n\r\n")
    if end < 0 or 0 <= end2 < end:
        end = end2
    head = raw[: end if end >= 0 else min(len(raw), 65536)].decode("latin-1")
    # unfold, then look at the fields one per line
    lines = re.sub(r"\r?\n[ \t]+", " ", head).splitlines()
    dated = [
        ln.partition(":")[2].rpartition(";")[2]
        for ln in lines
        if ln[:9].lower() == "received:" and ";" in ln
    ]
    dated += [ln[5:] for ln in lines if ln[:5].lower() == "date:"]
    for value in dated:
        parsed = parsedate_tz(value.strip())
        if parsed is not None:
            try:
                return float(mktime_tz(parsed))
            except (OverflowError, ValueError):
                continue
    return None
