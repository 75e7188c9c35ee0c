"""Watch a folder with Linux inotify (through libc), to wait on what another process does.

A negative assertion ("the relay did not retry by itself") needs the relay to
have had its chance first.  Sleeping "long enough" proves nothing on a loaded
machine; waiting until the relay has looked at its spool (it opens the folder
at each rescan) does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import time
from pathlib import Path

IN_ACCESS = 0x001
IN_OPEN = 0x020
IN_ISDIR = 0x40000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class Watch:
    """`with Watch(folder, IN_OPEN) as w: ... w.wait_for(lambda name, mask: ..., n)`."""

    def __init__(self, folder: Path, mask: int) -> None:
        self.fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(self.fd, os.fsencode(folder), mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {folder}")

    def events(self, timeout: float) -> list[tuple[str, int]]:
        """The (name, mask) events that came within `timeout` seconds ("" is the folder itself)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out = []
        pos = 0
        while pos < len(data):
            _, mask, _, length = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size
            name = data[pos : pos + length].rstrip(b"\0").decode(errors="replace")
            pos += length
            out.append((name, mask))
        return out

    def count(self, name: str, mask: int, n: int, timeout: float = 30.0) -> None:
        """Block until `n` events with this name and mask bits came; TimeoutError otherwise."""
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{seen} of {n} inotify events {name!r} {mask:#x}")
            seen += sum(1 for nm, m in self.events(left) if nm == name and m & mask == mask)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["IN_ACCESS", "IN_ISDIR", "IN_OPEN", "Watch"]
