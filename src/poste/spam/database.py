"""The model: logistic regression over a mail's tokens, learnt online with FTRL-Proximal.

A mail's score is sigmoid(bias + the sum of the weights of its tokens), each
token of a mail with more than `length` (150) distinct tokens counting
sqrt(length / count) instead of 1.  The
weights are learnt one mail at a time with FTRL-Proximal (McMahan et al.,
"Ad click prediction: a view from the trenches", KDD 2013; what Stalwart
uses for its spam filter): each token keeps two numbers, z (the sum of its
gradients, corrected for the learning rate) and n (the sum of its squared
gradients), and its weight is derived from them:

    w = 0                                            if |z| <= l1
    w = -(z - sign(z) l1) / ((beta + sqrt(n)) / alpha + l2)   otherwise

The L1 term sets the weight of most rare tokens to exactly zero, so the
classifier only holds the tokens that matter.  Because the state is z and n,
training can go on from a saved file (`poste spam train --update`) exactly
as if it had never stopped.  Why a discriminative model instead of the
Bayesian counts poste used before: measured on the time split of the
development corpus (train on older mail, test on newer), it catches far
more of the spam it has never seen at the same false positives; a naive
Bayes token is judged alone, so a word common in old spam keeps its weight
even when ham uses it too, where here weights are learnt together and a
token that other tokens already explain stays small.

File format, version 3 (all integers little-endian), optionally
gzip-compressed as a whole (detected by the gzip magic on load):

    offset  size  what
    0       8     magic b"POSTESPM"
    8       4     u32 format version (3)
    12      4     u32 length H of the header
    16      H     header, UTF-8 JSON object: {"model": "ftrl", "nspam": int,
                  "nham": int, "tokens": N, "weighted": K, "alpha": float,
                  "beta": float, "l1": float, "l2": float, "length": int,
                  "ham_weight": float, "note": str}
                  (unknown keys are ignored)
    16+H    4     u32 length B of the token blob
    20+H    B     the N tokens, UTF-8, joined by "\\n" (tokens never hold "\\n"):
                  first the K tokens whose weight is not zero, sorted, then
                  the others, sorted
    ...     8N    f64 z of each token, in token order
    ...     8N    f64 n of each token
    ...     4N    u32 number of mails each token appeared in

(64-bit floats, so a saved and reloaded database scores and goes on
learning exactly as the one in memory did.)

The bias is the token `*bias*` (the tokenizer never makes it: it strips
`*`).  A classifier needs only the first K tokens, their z and n; the rest
are kept so that further training continues from the same state (and
`--sparse` drops them for a database shipped to others).  The mail counts
serve `--min-count` pruning and nothing else.

Versions 1 and 2 (token counts for the Bayesian model of poste before this
change) are refused with a message to retrain: their counts cannot give
these weights.

Writing goes to a temporary file in the same folder, is fsynced, then
renamed over the old file, so a reader never sees half a database.
"""

from __future__ import annotations

import array
import math
import os
import struct
import sys
from collections.abc import Iterable, Sequence

# not `from typing import TYPE_CHECKING`: typing costs a batch command ~5 ms of start-up
TYPE_CHECKING = False

if TYPE_CHECKING:
    from pathlib import Path

MAGIC = b"POSTESPM"
VERSION = 3
_U32 = struct.Struct("<I")
BIAS = "*bias*"


class DatabaseError(Exception):
    """The file is not a poste spam database, or is damaged."""


class Learning:
    """FTRL-Proximal's knobs: chosen by time-split validation inside the training part.

    alpha: learning rate scale; beta: learning rate smoothing; l1: weights of
    tokens with |z| below this are zero; l2: shrinks every weight a little;
    length: a mail of more than this many distinct tokens has each scaled by
    sqrt(length / its count) (a long newsletter is not spam for having many
    mildly spammy words: "our", "please", "click"); ham_weight: a ham mail's
    gradient counts this many times a spam's (a false positive, a good mail
    labelled spam, costs far more than a miss).
    """

    # a plain class, not a dataclass: `import dataclasses` costs ~20 ms of a batch command's start-up
    __slots__ = ("alpha", "beta", "ham_weight", "l1", "l2", "length")

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 1.0,
        l1: float = 0.5,
        l2: float = 1.0,
        length: int = 150,
        ham_weight: float = 2.0,
    ) -> None:
        self.alpha = alpha
        self.beta = beta
        self.l1 = l1
        self.l2 = l2
        self.length = length
        self.ham_weight = ham_weight

    def _key(self) -> tuple[float, float, float, float, int, float]:
        return (self.alpha, self.beta, self.l1, self.l2, self.length, self.ham_weight)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Learning) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        a, b, l1, l2, n, h = self._key()
        return f"Learning(alpha={a}, beta={b}, l1={l1}, l2={l2}, length={n}, ham_weight={h})"


def scale(ntokens: int, length: int) -> float:
    """The value of each token of a mail with `ntokens` distinct tokens (the bias included)."""
    return 1.0 if ntokens <= length else math.sqrt(length / ntokens)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-min(x, 35.0)))
    e = math.exp(max(x, -35.0))
    return e / (1.0 + e)


def file_stamp(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What says a database file is the one a weight table was made from: device,
    inode, size and both times (the weights cache and the lazy load compare it)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Database:
    """FTRL state per token; trained one mail at a time, saved and loaded atomically."""

    def __init__(self, learning: Learning | None = None) -> None:
        self.learning = learning or Learning()
        self.nspam = 0
        self.nham = 0
        self._z: dict[str, float] = {}
        self._n: dict[str, float] = {}
        self._seen: dict[str, int] = {}  # mails each token appeared in
        # as read from a file: (token blob, z, n, seen, K); unpacked into the
        # dicts on first use for training, a classifier alone never needs them
        self._packed: (
            tuple[str, array.array[float], array.array[float], array.array[int], int] | None
        ) = None
        self.note = ""
        # bumped on every change so classifiers know to rebuild their table
        self.generation = 0
        self._weights: dict[str, float] | None = None
        self._weights_generation = -1
        # (path, stat stamp) of the file a scoring-only table came from
        # (poste.spam.weights_cache): the token state is read from it on first use
        self._source: tuple[str, tuple[int, int, int, int, int]] | None = None

    def _from_table(
        self, weights: dict[str, float], path: str, stamp: tuple[int, int, int, int, int]
    ) -> None:
        """Hold a ready weight table; the rest of the file's state is loaded when asked for."""
        self._weights = weights
        self._weights_generation = self.generation
        self._source = (path, stamp)

    def _unpack(self) -> None:
        if self._source is not None:
            path, stamp = self._source
            self._source = None
            with open(path, "rb") as f:
                if file_stamp(os.fstat(f.fileno())) != stamp:
                    raise DatabaseError(f"{path} changed since its weights were loaded")
                self._packed = Database.from_bytes(f.read())._packed
        if self._packed is not None:
            blob, z, n, seen, _ = self._packed
            tokens = blob.split("\n") if len(z) else []
            self._z = dict(zip(tokens, z.tolist(), strict=True))
            self._n = dict(zip(tokens, n.tolist(), strict=True))
            self._seen = dict(zip(tokens, seen.tolist(), strict=True))
            self._packed = None

    @property
    def z(self) -> dict[str, float]:
        self._unpack()
        return self._z

    @property
    def n(self) -> dict[str, float]:
        self._unpack()
        return self._n

    @property
    def seen(self) -> dict[str, int]:
        self._unpack()
        return self._seen

    @seen.setter
    def seen(self, value: dict[str, int]) -> None:
        self._unpack()
        self._seen = value

    def __len__(self) -> int:
        if self._source is not None:
            self._unpack()
        if self._packed is not None:
            return len(self._packed[1])
        return len(self._z)

    def weight(self, token: str) -> float:
        z = self.z.get(token)
        if z is None:
            return 0.0
        return self._weight(z, self.n[token])

    def _weight(self, z: float, n: float) -> float:
        p = self.learning
        if abs(z) <= p.l1:
            return 0.0
        return -(z - math.copysign(p.l1, z)) / ((p.beta + math.sqrt(n)) / p.alpha + p.l2)

    def weights(self) -> dict[str, float]:
        """Every token whose weight is not zero (the bias included), with its weight."""
        if self._weights is None or self._weights_generation != self.generation:
            w = self._weight
            if self._packed is not None:  # the weighted tokens come first in a file
                # only the first K tokens of the blob are split off
                blob, z, n, _, k = self._packed
                tokens = blob.split("\n", k)[:k] if k else []
                self._weights = dict(
                    zip(tokens, map(w, z[:k].tolist(), n[:k].tolist()), strict=True)
                )
            else:
                self._weights = {t: x for t, z in self._z.items() if (x := w(z, self._n[t])) != 0.0}
            self._weights_generation = self.generation
        return self._weights

    # -- training -----------------------------------------------------------

    def train(self, tokens: Iterable[str], is_spam: bool) -> None:
        """One FTRL-Proximal step on one mail (each distinct token counts once)."""
        feats = set(tokens)
        feats.add(BIAS)
        p = self.learning
        zs, ns, seen = self.z, self.n, self.seen
        l1, l2, alpha, beta = p.l1, p.l2, p.alpha, p.beta
        ws: dict[str, float] = {}
        for t in feats:
            z = zs.get(t)
            if z is not None and abs(z) > l1:
                ws[t] = -(z - math.copysign(l1, z)) / ((beta + math.sqrt(ns[t])) / alpha + l2)
        x = scale(len(feats), p.length)
        # fsum: exact, so the step does not depend on the set's (hash-seeded) order
        g = (_sigmoid(x * math.fsum(ws.values())) - (1.0 if is_spam else 0.0)) * x
        g_bias = g
        if not is_spam:
            # the tokens of a ham learn ham_weight times as hard; the bias
            # does not, so the prior stays what the mails say and a mail
            # with no known token stays near the middle (unknown)
            g *= p.ham_weight
        g2 = g * g
        for t in feats:
            if t == BIAS and g is not g_bias:
                self._step(t, g_bias, ws.get(t, 0.0))
                seen[t] = seen.get(t, 0) + 1
                continue
            n = ns.get(t, 0.0)
            sigma = (math.sqrt(n + g2) - math.sqrt(n)) / alpha
            zs[t] = zs.get(t, 0.0) + g - sigma * ws.get(t, 0.0)
            ns[t] = n + g2
            seen[t] = seen.get(t, 0) + 1
        seen[BIAS] -= 1  # the bias is in every mail: its count says nothing
        if is_spam:
            self.nspam += 1
        else:
            self.nham += 1
        self.generation += 1

    def _step(self, t: str, g: float, w: float) -> None:
        """The FTRL update of one token for gradient g."""
        n = self.n.get(t, 0.0)
        g2 = g * g
        sigma = (math.sqrt(n + g2) - math.sqrt(n)) / self.learning.alpha
        self.z[t] = self.z.get(t, 0.0) + g - sigma * w
        self.n[t] = n + g2

    def fit(
        self, mails: Sequence[tuple[Iterable[str], bool]], epochs: int = 5, seed: int = 0
    ) -> None:
        """Train on (tokens, is_spam) pairs `epochs` times, each time in a new shuffled order.

        Shuffling mixes spam and ham, as mail arrives: an online learner fed
        all the spam and then all the ham ends up remembering mostly the ham.
        The order comes from `seed`, so the same mails give the same file.
        Only the first pass counts the mails (nspam, nham, seen).
        """
        import random  # only training shuffles; `mark` and the service start without it

        rng = random.Random(seed)
        order = list(range(len(mails)))
        for epoch in range(epochs):
            rng.shuffle(order)
            counts = (self.nspam, self.nham, dict(self.seen) if epoch else None)
            for i in order:
                tokens, is_spam = mails[i]
                self.train(tokens, is_spam)
            if epoch:
                self.nspam, self.nham, seen = counts
                assert seen is not None
                self.seen = seen

    def prune(self, min_count: int) -> int:
        """Drop tokens seen in fewer than min_count mails; returns how many.

        Rare tokens are mostly names, ids and typos: they make up most of
        the file, and are the ones that could say something about a
        particular mail.
        """
        return self._drop([t for t, c in self.seen.items() if c < min_count and t != BIAS])

    def sparse(self) -> int:
        """Drop tokens whose weight is zero (they do not change any score); returns how many.

        Makes a small file to ship; training on from it starts those tokens from zero.
        """
        w = self._weight
        return self._drop([t for t, z in self.z.items() if w(z, self.n[t]) == 0.0])

    def drop_prefixes(self, prefixes: Iterable[str]) -> int:
        """Drop tokens starting with any of the prefixes; returns how many.

        For a database meant for other sites: `received:`, `to:` tokens name
        the infrastructure and people of the site that trained it.
        """
        pre = tuple(prefixes)
        if not pre:
            return 0
        return self._drop([t for t in self.z if t.startswith(pre)])

    def _drop(self, tokens: list[str]) -> int:
        for t in tokens:
            del self.z[t], self.n[t]
            self.seen.pop(t, None)
        self.generation += 1
        return len(tokens)

    # -- files ----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        w = self._weight
        # the tokenizer never makes tokens with "\n"; a library caller might
        usable = [t for t in self.z if t and "\n" not in t]
        weighted = sorted(t for t in usable if w(self.z[t], self.n[t]) != 0.0)
        rest = sorted(t for t in usable if w(self.z[t], self.n[t]) == 0.0)
        tokens = weighted + rest
        import json  # not at module level: a cached classifier table needs none

        p = self.learning
        header = json.dumps(
            {
                "model": "ftrl",
                "nspam": self.nspam,
                "nham": self.nham,
                "tokens": len(tokens),
                "weighted": len(weighted),
                "alpha": p.alpha,
                "beta": p.beta,
                "l1": p.l1,
                "l2": p.l2,
                "length": p.length,
                "ham_weight": p.ham_weight,
                "note": self.note,
            },
            sort_keys=True,
        ).encode()
        blob = "\n".join(tokens).encode("utf-8")
        z = array.array("d", (self.z[t] for t in tokens))
        n = array.array("d", (self.n[t] for t in tokens))
        seen = array.array("I", (self.seen.get(t, 0) for t in tokens))
        if sys.byteorder != "little":  # pragma: no cover
            z.byteswap()
            n.byteswap()
            seen.byteswap()
        return b"".join(
            [
                MAGIC,
                _U32.pack(VERSION),
                _U32.pack(len(header)),
                header,
                _U32.pack(len(blob)),
                blob,
                z.tobytes(),
                n.tobytes(),
                seen.tobytes(),
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
            if version in (1, 2):
                raise DatabaseError(
                    f"database format version {version} holds token counts for the Bayesian "
                    "model of an older poste; retrain it with 'poste spam train'"
                )
            if version != VERSION:
                raise DatabaseError(f"unsupported database version {version}")
            (hlen,) = _U32.unpack_from(data, 12)
            import json

            header = json.loads(data[16 : 16 + hlen])
            pos = 16 + hlen
            (blen,) = _U32.unpack_from(data, pos)
            pos += 4
            blob = data[pos : pos + blen].decode("utf-8")
            pos += blen
            n = int(header["tokens"])
            k = int(header["weighted"])
            ntokens = blob.count("\n") + 1 if n else 0
            if ntokens != n or not 0 <= k <= n or len(data) != pos + 20 * n:
                raise DatabaseError("damaged database (sizes do not match)")
            learning = Learning(
                float(header["alpha"]),
                float(header["beta"]),
                float(header["l1"]),
                float(header["l2"]),
                int(header["length"]),
                # absent from files written before it existed: they learnt with 1
                float(header.get("ham_weight", 1.0)),
            )
            z = array.array("d")
            z.frombytes(data[pos : pos + 8 * n])
            nn = array.array("d")
            nn.frombytes(data[pos + 8 * n : pos + 16 * n])
            seen = array.array("I")
            seen.frombytes(data[pos + 16 * n : pos + 20 * n])
        except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise DatabaseError(f"damaged database: {exc}") from None
        if sys.byteorder != "little":  # pragma: no cover
            z.byteswap()
            nn.byteswap()
            seen.byteswap()
        db = cls(learning)
        db.nspam = int(header["nspam"])
        db.nham = int(header["nham"])
        db.note = str(header.get("note", ""))
        # sums (C loops): a NaN or an infinity anywhere makes them not finite
        if n and not (math.isfinite(sum(z)) and math.isfinite(sum(nn)) and min(nn) >= 0.0):
            raise DatabaseError("damaged database (a weight that is not a number)")
        db._packed = (blob, z, nn, seen, k)
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
