"""One fsync of the spool folder for every mail that arrived meanwhile (group commit).

A mail is on disk once its message and envelope files are fsynced and
renamed into the spool, and the folder is fsynced after the renames (the
names are the folder's data).  The file fsyncs are each mail's own; the
folder's need not be: one fsync of a folder makes durable every rename done
in it before that fsync began.  So concurrent arrivals share it: a caller
that finds no folder fsync running starts one, covering every caller that
asked before it began; a caller that finds one running waits for it to end
and then, since that one may have begun before its renames, for the next,
which one of the waiting callers starts for all of them.

`sync()` returns only once an fsync that began after the call was made has
completed (so after the caller's own renames): the relay's "250 only once
it is on disk" is unchanged, a mail just waits less for the others.  An
fsync that fails raises in the caller that ran it; the callers it would
have covered try again with one of their own.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderSync:
    """Group-committed fsyncs of one folder, for the threads of one process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._asked = 0  # requests numbered 1, 2, ... in the order they were made
        self._covered = 0  # every request up to this one is durable
        self._running = False
        self.syncs = 0  # fsyncs done: fewer than `asked` when arrivals overlapped

    @property
    def asked(self) -> int:
        return self._asked

    def sync(self) -> None:
        """Return once every rename this thread did in the folder is durable."""
        with self._cond:
            self._asked += 1
            mine = self._asked
            while self._covered < mine:
                if self._running:
                    self._cond.wait()
                    continue
                # No fsync running: this thread runs one for every request made so far
                # (each was made after its renames, so this fsync covers them all).
                self._running = True
                upto = self._asked
                self._cond.release()
                try:
                    fsync_dir(self.path)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self.syncs += 1
                self._covered = max(self._covered, upto)
