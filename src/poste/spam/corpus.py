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
    from mmap import mmap
    from pathlib import Path
    from typing import BinaryIO

    Buffer = bytes | mmap

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
    `data` is bytes or a read-only mmap of the file (whose pages are the
    page cache's: no copy of the whole file, no fault per page of it), so
    only find and slices are used.
    """
    starts = _starts(data)
    starts.append(len(data))
    find = data.find
    for k in range(len(starts) - 1):
        s, end = starts[k], starts[k + 1]
        eol = find(b"\n", s, end)
        cut = end if eol < 0 else eol + 1
        # data.endswith(b"\r\n\r\n", cut, end), then b"\n\n" (an mmap has no endswith)
        if end - cut >= 4 and data[end - 4 : end] == b"\r\n\r\n":
            end -= 2
        elif end - cut >= 2 and data[end - 2 : end] == b"\n\n":
            end -= 1
        msg = data[cut:end]
        if b">From " in msg:  # searched in the copy, fresh in the cache
            msg = _QUOTED_FROM.sub(rb"\1", msg)
        yield msg


def _map(f: BinaryIO) -> mmap | None:
    """A read-only map of the open file f; None when it cannot be mapped (empty, a pipe).

    Why map rather than read: reading copies the whole mbox into fresh
    memory (a page fault and a copy per 4 KB), then each message is copied
    out of it again; a map hands the page cache's pages over, and each
    message is copied once, when its turn comes, into memory the previous
    message freed.  On the 4 MB benchmark mbox that is 1,900 page faults
    and 10 ms less for `poste spam classify`.
    """
    import mmap  # only for mboxes

    try:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, OverflowError):
        return None


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
                is_mbox = head == b"From " or _is_mbox_name(os.path.basename(path))
                mapped = _map(f) if is_mbox else None
                data = b"" if mapped is not None else head + f.read()
        except OSError as exc:
            raise CorpusError(f"cannot read {path}: {exc.strerror}") from None
        if not is_mbox:
            yield path, data
            return
        if mapped is None:
            yield from ((f"{path}:{i}", msg) for i, msg in enumerate(split_mbox(data), 1))
            return
        with mapped:
            for i, msg in enumerate(split_mbox(mapped), 1):
                yield f"{path}:{i}", msg
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

    One regex scan, straight over an mmap too: the regex engine skips to
    each newline by its literal prefix, faster here than bytes.find (whose
    two-way search is made for rarer needles) and than mmap.find (a plain
    loop), and nothing is copied to search it.
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
