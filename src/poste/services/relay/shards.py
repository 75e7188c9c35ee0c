"""The spool's shards: one folder per relay worker, each owned by one process.

With `--workers N` every worker runs a relay of its own.  Rather than N
processes writing and scheduling one folder (each would deliver the others'
mail, or need a shared scheduler), worker 0 keeps the spool folder itself
and worker K > 0 keeps `SPOOL/worker-K`, a spool of the same format under
its own `lock`: one owner per folder, the same commit protocol, the same
scheduler.  What is not mail stays shared in SPOOL (the SRS secret and
database, the TLS cache and reports, the quarantine: their writers never
rewrite one another's files).

A shard whose owner no longer exists (a run with fewer workers; K >= N) is
adopted by worker 0 at start, one mail at a time, in an order that loses or
doubles nothing whenever it is cut: the message file is hard-linked into
SPOOL, the envelope (the commit record) renamed there, both folders fsynced,
and only then the old message name unlinked.  Cut after the link: SPOOL has
a message without envelope (removed as an interrupted write) and the shard
still has both.  Cut after the rename: the shard has a message without
envelope (removed as well) and SPOOL has both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

from poste.services.relay.folder_sync import fsync_dir
from poste.services.relay.spool import Spool, SpoolError, SpoolLocked

log = logging.getLogger("poste.relay")

_SHARD = re.compile(r"^worker-(\d+)$")


def shard_path(root: str | os.PathLike[str], k: int) -> Path:
    """Worker k's spool folder: the spool itself for worker 0."""
    return Path(root) if k == 0 else Path(root) / f"worker-{k}"


def shards(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(K, folder) of every shard found under `root`, worker 0 (root itself) first."""
    base = Path(root)
    found = [(0, base)]
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for p in base.iterdir():
            m = _SHARD.match(p.name)
            if m and int(m.group(1)) > 0 and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def spools(root: str | os.PathLike[str]) -> list[Spool]:
    """The spool and its shards, for `poste queue` (which must see every one)."""
    out = [Spool(root, create=False)]
    for _, path in shards(root)[1:]:
        try:
            out.append(Spool(path, create=False))
        except SpoolError as exc:
            log.warning("spool shard %s skipped: %s", path, exc)
    return out


def adopt(spool: Spool, workers: int) -> int:
    """Move the mail of every unowned shard (K >= workers, lock free) into `spool`.

    Blocking; run by worker 0 before its scheduler reads its folder.  A shard
    still locked (its process runs on) is left alone.  Returns the mails moved.
    """
    moved = 0
    for k, path in shards(spool.path)[1:]:
        if k < workers:
            continue
        try:
            old = Spool(path, create=False)
            old.lock()
        except SpoolLocked:
            log.warning("spool shard %s: still owned by a running relay; left alone", path)
            continue
        except (OSError, SpoolError) as exc:
            log.warning("spool shard %s: cannot adopt: %s", path, exc)
            continue
        try:
            old.recover()  # what its owner was writing when it stopped
            n = 0
            for qid in old.ids():
                if _move(old, spool, qid):
                    n += 1
            moved += n
            if n:
                log.info("spool shard %s: %d message(s) adopted into %s", path, n, spool.path)
            _remove_if_empty(old)
        finally:
            old.unlock()
    return moved


def _move(old: Spool, new: Spool, qid: str) -> bool:
    """One mail from `old` to `new`: link message, rename envelope, fsync, unlink."""
    src_eml, src_json = old.message_path(qid), old.envelope_path(qid)
    dst_eml, dst_json = new.message_path(qid), new.envelope_path(qid)
    try:
        with old.message_lock(qid):  # as `poste queue` changes it: never half-way through
            if not src_json.exists():
                return False
            try:
                os.link(src_eml, dst_eml)
            except FileExistsError:
                if not os.path.samefile(src_eml, dst_eml):
                    # a different mail under the same id: never overwrite one
                    log.error("spool shard %s: %s is also in %s; left in place",
                              old.path, qid, new.path)
                    return False
            os.rename(src_json, dst_json)
            fsync_dir(new.path)
            fsync_dir(old.path)
            src_eml.unlink()
            fsync_dir(old.path)
    except SpoolError:  # the message file is gone: an envelope alone is not a mail
        return False
    return True


def _remove_if_empty(old: Spool) -> None:
    """A shard with nothing left goes (its lock file last, while held)."""
    names = {p.name for p in old.path.iterdir()}
    if names - {"VERSION", "lock"}:
        return
    with contextlib.suppress(OSError):
        (old.path / "VERSION").unlink()
        (old.path / "lock").unlink()
        old.path.rmdir()
