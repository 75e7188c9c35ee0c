"""The token database: how many spam and ham messages each token appeared in.

File format, version 2 (all integers little-endian), optionally gzip-compressed
as a whole (detected by the gzip magic on load):

    offset  size  what
    0       8     magic b"POSTESPM"
    8       4     u32 format version (2)
    12      4     u32 length H of the header
    16      H     header, UTF-8 JSON object: {"nspam": int, "nham": int,
                  "tokens": N, "groups": G, "note": str}  (unknown keys are ignored)
    16+H    4     u32 length B of the token blob
    20+H    B     the N tokens, UTF-8, joined by "\n" (tokens never hold "\n"),
                  grouped by their pair of counts: all the tokens of group 0
                  (sorted), then those of group 1, ...
    ...     4G    u32 spam count of each group
    ...     4G    u32 ham count of each group
    ...     4G    u32 number of tokens in each group (they add up to N)

A group is one distinct (spam count, ham count) pair; groups are ordered by
spam + ham count, highest first, then by the pair.  Tens of thousands of
tokens share a thousand or so pairs, so a classifier computes f(w) once per
group and builds its token table with C-level zips, without making a
(spam, ham) tuple per token; and the tokens seen most often, the ones most
mails look up, come first in the file and so sit together in memory.

Version 1 (still read; `poste spam train` writes version 2) had the tokens
sorted, then N u32 spam counts and N u32 ham counts in token order, and no
"groups" key.

Writing goes to a temporary file in the same folder, is fsynced, then
renamed over the old file, so a reader never sees half a database.
"""

from __future__ import annotations

import array
import json
import os
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, repeat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

MAGIC = b"POSTESPM"
VERSION = 2
READABLE_VERSIONS = (1, 2)
_U32 = struct.Struct("<I")

# tokens, the (spam, ham) count pair of each group, the number of tokens in each group
Groups = tuple[list[str], list[tuple[int, int]], list[int]]


class DatabaseError(Exception):
    """The file is not a poste spam database, or is damaged."""


def _expand(values: Iterable[object], sizes: Iterable[int]) -> Iterator[object]:
    """Each value repeated as many times as its group has tokens (C-level)."""
    return chain.from_iterable(map(repeat, values, sizes))


class Database:
    """Token counts, trained and untrained one message at a time."""

    def __init__(self) -> None:
        self.nspam = 0
        self.nham = 0
        # token -> (spam messages, ham messages) it appeared in; built from
        # the file's groups (or version 1 columns) on first use: a classifier
        # alone never needs it
        self._counts: dict[str, tuple[int, int]] | None = {}
        self._groups: Groups | None = None
        self.note = ""
        # bumped on every change so classifiers know to rebuild their cache
        self.generation = 0

    @property
    def counts(self) -> dict[str, tuple[int, int]]:
        if self._counts is None:
            assert self._groups is not None
            tokens, pairs, sizes = self._groups
            self._counts = dict(zip(tokens, _expand(pairs, sizes), strict=True))  # type: ignore[arg-type]
            self._groups = None
        return self._counts

    @counts.setter
    def counts(self, value: dict[str, tuple[int, int]]) -> None:
        self._counts = value
        self._groups = None
        self.generation += 1

    def groups(self) -> Groups | None:
        """The tokens grouped by count pair as read from a file, None once changed."""
        return self._groups if self._counts is None else None

    def columns(self) -> tuple[Sequence[str], Sequence[int], Sequence[int]]:
        """Tokens, spam counts, ham counts as parallel sequences."""
        if self._counts is None and self._groups is not None:
            tokens, pairs, sizes = self._groups
            spam = [p[0] for p in pairs]
            ham = [p[1] for p in pairs]
            return tokens, list(_expand(spam, sizes)), list(_expand(ham, sizes))  # type: ignore[arg-type]
        counts = self.counts
        if not counts:
            return [], [], []
        spam_column, ham_column = zip(*counts.values(), strict=True)
        return list(counts), spam_column, ham_column

    def items(self) -> Iterator[tuple[str, int, int]]:
        """(token, spam count, ham count) of every token."""
        return zip(*self.columns(), strict=True)

    def __len__(self) -> int:
        if self._counts is None and self._groups is not None:
            return len(self._groups[0])
        return len(self.counts)

    def get(self, token: str) -> tuple[int, int]:
        return self.counts.get(token, (0, 0))

    # -- training -----------------------------------------------------------

    def train(self, tokens: Iterable[str], is_spam: bool) -> None:
        """Count one message: each distinct token once."""
        counts = self.counts
        zero = (0, 0)
        if is_spam:
            for t in set(tokens):
                sc, hc = counts.get(t, zero)
                counts[t] = (sc + 1, hc)
        else:
            for t in set(tokens):
                sc, hc = counts.get(t, zero)
                counts[t] = (sc, hc + 1)
        if is_spam:
            self.nspam += 1
        else:
            self.nham += 1
        self.generation += 1

    def untrain(self, tokens: Iterable[str], is_spam: bool) -> None:
        """Forget one message trained earlier with the same label (counts floor at 0)."""
        counts = self.counts
        for t in set(tokens):
            found = counts.get(t)
            if found is None:
                continue
            sc, hc = found
            if is_spam:
                sc = max(0, sc - 1)
            else:
                hc = max(0, hc - 1)
            if sc or hc:
                counts[t] = (sc, hc)
            else:
                del counts[t]
        if is_spam:
            self.nspam = max(0, self.nspam - 1)
        else:
            self.nham = max(0, self.nham - 1)
        self.generation += 1

    def prune(self, min_count: int) -> int:
        """Drop tokens seen in fewer than min_count messages in all; returns how many.

        Rare tokens are mostly names, ids and typos: they weigh little in
        scoring, make up most of the file, and are the ones that could say
        something about a particular message.
        """
        before = len(self.counts)
        self.counts = {t: c for t, c in self.counts.items() if c[0] + c[1] >= min_count}
        self.generation += 1
        return before - len(self.counts)

    def drop_prefixes(self, prefixes: Iterable[str]) -> int:
        """Drop tokens starting with any of the prefixes; returns how many.

        For a database meant for other sites: `received:`, `to:` tokens name
        the infrastructure and people of the site that trained it.
        """
        pre = tuple(prefixes)
        if not pre:
            return 0
        before = len(self.counts)
        self.counts = {t: c for t, c in self.counts.items() if not t.startswith(pre)}
        self.generation += 1
        return before - len(self.counts)

    # -- files ----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        by_pair: dict[tuple[int, int], list[str]] = {}
        for t, c in self.counts.items():
            # the tokenizer never makes such tokens; a library caller might
            if t and "\n" not in t:
                by_pair.setdefault(c, []).append(t)
        order = sorted(by_pair, key=lambda p: (-(p[0] + p[1]), p))
        tokens: list[str] = []
        for pair in order:
            tokens.extend(sorted(by_pair[pair]))
        header = json.dumps(
            {
                "nspam": self.nspam,
                "nham": self.nham,
                "tokens": len(tokens),
                "groups": len(order),
                "note": self.note,
            },
            sort_keys=True,
        ).encode()
        blob = "\n".join(tokens).encode("utf-8")
        spam = array.array("I", (p[0] for p in order))
        ham = array.array("I", (p[1] for p in order))
        sizes = array.array("I", (len(by_pair[p]) for p in order))
        if sys.byteorder != "little":  # pragma: no cover
            spam.byteswap()
            ham.byteswap()
            sizes.byteswap()
        return b"".join(
            [
                MAGIC,
                _U32.pack(VERSION),
                _U32.pack(len(header)),
                header,
                _U32.pack(len(blob)),
                blob,
                spam.tobytes(),
                ham.tobytes(),
                sizes.tobytes(),
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Database:
        if data[:2] == b"\x1f\x8b":
            import gzip

            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as exc:
                raise DatabaseError(f"damaged compressed database: {exc}") from None
        if data[:8] != MAGIC:
            raise DatabaseError("not a poste spam database (bad magic)")
        try:
            (version,) = _U32.unpack_from(data, 8)
            if version not in READABLE_VERSIONS:
                raise DatabaseError(f"unsupported database version {version}")
            (hlen,) = _U32.unpack_from(data, 12)
            header = json.loads(data[16 : 16 + hlen])
            pos = 16 + hlen
            (blen,) = _U32.unpack_from(data, pos)
            pos += 4
            blob = data[pos : pos + blen].decode("utf-8")
            pos += blen
            n = int(header["tokens"])
            tokens = blob.split("\n") if n else []
            # groups (version 2) or one column entry per token (version 1)
            g = int(header["groups"]) if version >= 2 else n
            if len(tokens) != n or len(data) != pos + (12 if version >= 2 else 8) * g:
                raise DatabaseError("damaged database (sizes do not match)")
            spam = array.array("I")
            spam.frombytes(data[pos : pos + 4 * g])
            ham = array.array("I")
            ham.frombytes(data[pos + 4 * g : pos + 8 * g])
            sizes = array.array("I")
            if version >= 2:
                sizes.frombytes(data[pos + 8 * g : pos + 12 * g])
        except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise DatabaseError(f"damaged database: {exc}") from None
        if sys.byteorder != "little":  # pragma: no cover
            spam.byteswap()
            ham.byteswap()
            sizes.byteswap()
        db = cls()
        db.nspam = int(header["nspam"])
        db.nham = int(header["nham"])
        db.note = str(header.get("note", ""))
        if version >= 2:
            if sum(sizes) != n:
                raise DatabaseError("damaged database (group sizes do not add up)")
            db._counts = None
            db._groups = (tokens, list(zip(spam, ham, strict=True)), sizes.tolist())
        else:
            db._counts = dict(zip(tokens, zip(spam, ham, strict=True), strict=True))
        return db

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Database:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise DatabaseError(f"cannot read {path}: {exc.strerror}") from None
        return cls.from_bytes(data)

    def save(self, path: str | os.PathLike[str], compress: bool | None = None) -> None:
        """Write atomically; compressed when asked or when the name ends in .gz."""
        from pathlib import Path

        target = Path(path)
        data = self.to_bytes()
        if compress or (compress is None and target.suffix == ".gz"):
            import gzip

            data = gzip.compress(data, compresslevel=9, mtime=0)
        atomic_write(target, data)


def atomic_write(target: Path, data: bytes) -> None:
    """tmp file in the same folder, fsync, rename over, fsync the folder."""
    import tempfile  # only writers need it; readers start faster without

    folder = target.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)
