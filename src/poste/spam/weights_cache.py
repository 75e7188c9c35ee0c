"""A database's weight table kept in the user's cache, for the next `poste spam classify`.

Why: `poste spam classify` is timed against spamoracle with its start-up
included.  Loading a database (the whole file read, 55k tokens decoded and
checked, the 6k weights computed from z and n in Python) is ~70 million
instructions, as much as tokenizing 50 mails, and gives the same table
every time until the file changes.  So the fast lane keeps that table in
`$XDG_CACHE_HOME/poste/` (`~/.cache/poste/`), stamped with the database
file's device, inode, size, mtime and ctime (the stamp the spamfilter
service reloads on), and reads it back in a fraction of that when the
stamp still matches.  The weights are stored as the same 64-bit floats, so
the scores are exactly those of a full load.  Nothing here is needed for
correctness: a missing, stale, foreign or damaged cache file is ignored
(and rewritten), and a cache folder that cannot be written is no error.

Cache file (little-endian): magic `POSTEWC2`; the stamp; the learning
settings, nspam, nham, K and the lengths below (`_HEAD`); the database's
absolute path; its note; the K tokens joined by `\\n`; K f64 weights; a
CRC-32 of all that.  The tokens are in the order of the number of
training mails they were seen in, most first (see _write).
"""

from __future__ import annotations

import array
import binascii
import os
import struct
import sys

from poste.spam.database import Database, DatabaseError, Learning, file_stamp

_MAGIC = b"POSTEWC2"  # 2: the tokens in most mails first
# magic, dev, ino, size, mtime_ns, ctime_ns, alpha, beta, l1, l2, ham_weight,
# length, nspam, nham, K, len(path), len(note), len(token blob)
_HEAD = struct.Struct("<8s3Q2q5d7q")

Stamp = tuple[int, int, int, int, int]


def cache_file(db_path: str) -> str | None:
    """Where the table of the database at (absolute) db_path is cached; None: no cache."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(base):  # unset or relative: the XDG default
        home = os.path.expanduser("~")
        if not os.path.isabs(home):
            return None
        base = os.path.join(home, ".cache")
    key = binascii.crc32(db_path.encode("utf-8", "surrogateescape"))
    return os.path.join(base, "poste", f"spam-weights-{key:08x}.bin")


def load(path: str) -> Database:
    """Database.load(path) for a classifier: its table from the cache when the file is unchanged.

    The database returned scores exactly as a fully loaded one; its token
    state (for training or saving) is read from the file on first use.
    """
    real = os.path.abspath(path)
    cache = cache_file(real)
    try:
        with open(path, "rb") as f:
            stamp = file_stamp(os.fstat(f.fileno()))
            if cache is not None:
                db = _read(cache, real, stamp)
                if db is not None:
                    return db
            data = f.read()
    except OSError as exc:
        raise DatabaseError(f"cannot read {path}: {exc.strerror}") from None
    db = Database.from_bytes(data)
    if cache is not None:
        _write(cache, real, stamp, db)
    return db


def _read(cache: str, real: str, stamp: Stamp) -> Database | None:
    try:
        with open(cache, "rb") as f:
            st = os.fstat(f.fileno())
            # another user's (or a world-writable) file could hold any weights
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return None
            data = f.read()
    except OSError:
        return None
    n = len(data)
    if n < _HEAD.size + 4 or binascii.crc32(memoryview(data)[:-4]) != int.from_bytes(
        data[-4:], "little"
    ):
        return None
    (magic, dev, ino, size, mtime, ctime, alpha, beta, l1, l2, hw, length, nspam, nham, k,
     plen, nlen, blen) = _HEAD.unpack_from(data)  # fmt: skip
    if magic != _MAGIC or (dev, ino, size, mtime, ctime) != stamp:
        return None
    pos = _HEAD.size
    if min(k, plen, nlen, blen) < 0 or pos + plen + nlen + blen + 8 * k + 4 != n:
        return None
    try:
        if data[pos : pos + plen].decode("utf-8", "surrogateescape") != real:
            return None
        pos += plen
        note = data[pos : pos + nlen].decode("utf-8")
        pos += nlen
        tokens = data[pos : pos + blen].decode("utf-8").split("\n") if k else []
    except UnicodeDecodeError:
        return None
    pos += blen
    if len(tokens) != k:
        return None
    weights = array.array("d")
    weights.frombytes(data[pos : pos + 8 * k])
    if sys.byteorder != "little":  # pragma: no cover
        weights.byteswap()
    db = Database(Learning(alpha, beta, l1, l2, length, hw))
    db.nspam, db.nham, db.note = nspam, nham, note
    db._from_table(dict(zip(tokens, weights.tolist(), strict=True)), real, stamp)
    return db


def _write(cache: str, real: str, stamp: Stamp, db: Database) -> None:
    # the tokens in most mails first: read back in this order, their keys,
    # weights and table entries lie side by side in memory, so the lookups
    # of a mail's common tokens share cache lines (scoring's dict lookups
    # are a tenth of `classify`'s time, nearly all cache misses; a cache
    # simulation gives 10% fewer misses there)
    seen = db.seen
    table = dict(sorted(db.weights().items(), key=lambda kv: -seen.get(kv[0], 0)))
    if any("\n" in t for t in table):  # pragma: no cover - a file's tokens never hold one
        return
    p = db.learning
    try:
        path_b = real.encode("utf-8", "surrogateescape")
        note_b = db.note.encode("utf-8")
        blob = "\n".join(table).encode("utf-8")
    except UnicodeEncodeError:  # pragma: no cover - a library caller's odd note: no cache
        return
    weights = array.array("d", table.values())
    if sys.byteorder != "little":  # pragma: no cover
        weights.byteswap()
    head = _HEAD.pack(_MAGIC, *stamp, p.alpha, p.beta, p.l1, p.l2, p.ham_weight, p.length,
                      db.nspam, db.nham, len(table), len(path_b), len(note_b), len(blob))  # fmt: skip
    body = b"".join([head, path_b, note_b, blob, weights.tobytes()])
    data = body + binascii.crc32(body).to_bytes(4, "little")
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(cache), mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # renamed into place: a reader sees the old file or the whole new one
        os.replace(tmp, cache)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
