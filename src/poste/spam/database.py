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

Averaged members.  A database holds M (`members`, 8 by default) such
models, each with its own z and n per token, trained on the same mails in
M different seeded orders; a token's weight is the mean of its M weights,
so the classifier still holds one table and scores a mail at the same
cost.  Why: on the inner time split (see evaluate) the training order
alone moves one model's spam caught by about 4 of 94 and decides whether
a newsletter crosses the spam cutoff; the mean of several orders keeps
what they agree on (bagging over orders), which let a larger alpha (more
confident scores) be chosen.  Every later step (`--update`, a learn mail)
trains every member, so the file goes on learning exactly as the one in
memory would.  `merge` turns the members into one model with the same
weights, for a small file to ship.

File format, version 4 (all integers little-endian), optionally
gzip-compressed as a whole (detected by the gzip magic on load):

    offset  size  what
    0       8     magic b"POSTESPM"
    8       4     u32 format version (4)
    12      4     u32 length H of the header
    16      H     header, UTF-8 JSON object: {"model": "ftrl", "members": M,
                  "nspam": int, "nham": int, "tokens": N, "weighted": K,
                  "alpha": float, "beta": float, "l1": float, "l2": float,
                  "length": int, "ham_weight": float, "weight_bias": bool,
                  "note": str}
                  (unknown keys are ignored)
    16+H    4     u32 length B of the token blob
    20+H    B     the N tokens, UTF-8, joined by "\\n" (tokens never hold "\\n"):
                  first the K tokens whose (mean) weight is not zero,
                  sorted, then the others, sorted
    ...     8NM   f64 z of each token, in token order, member after member
    ...     8NM   f64 n of each token, member after member
    ...     4N    u32 number of mails each token appeared in

(64-bit floats, so a saved and reloaded database scores and goes on
learning exactly as the one in memory did.)  Version 3 is the same layout
without "members": it loads as one member.

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
VERSION = 4
# members of a new database: chosen on the inner time split (docs/spamfilter.md)
MEMBERS = 8
_U32 = struct.Struct("<I")
BIAS = "*bias*"
# whether a new database's bias learns ham's gradient times ham_weight (Learning.weight_bias):
# chosen on the rolling time folds, with ham_weight 4 (docs/spamfilter.md)
WEIGHT_BIAS = True


_Packed = tuple[str, list["array.array[float]"], list["array.array[float]"], "array.array[int]", int]


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
    labelled spam, costs far more than a miss); weight_bias: the bias learns a
    ham's gradient times ham_weight too, as every other token does (a weighted
    log loss; without it the tokens of every ham learn ham_weight times as hard
    as the bias, the tokens in nearly every mail go to the ham side and the
    bias to the spam side, +6 in the database shipped before it, so that a mail
    with no known token scored 0.998: see docs/spamfilter.md).
    """

    # a plain class, not a dataclass: `import dataclasses` costs ~20 ms of a batch command's start-up
    __slots__ = ("alpha", "beta", "ham_weight", "l1", "l2", "length", "weight_bias")

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        l1: float = 0.5,
        l2: float = 1.0,
        length: int = 150,
        ham_weight: float = 4.0,
        weight_bias: bool = WEIGHT_BIAS,
    ) -> None:
        self.alpha = alpha
        self.beta = beta
        self.l1 = l1
        self.l2 = l2
        self.length = length
        self.ham_weight = ham_weight
        self.weight_bias = weight_bias

    def _key(self) -> tuple[float, float, float, float, int, float, bool]:
        return (self.alpha, self.beta, self.l1, self.l2, self.length, self.ham_weight,
                self.weight_bias)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Learning) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        a, b, l1, l2, n, h, wb = self._key()
        return (f"Learning(alpha={a}, beta={b}, l1={l1}, l2={l2}, length={n}, ham_weight={h}, "
                f"weight_bias={wb})")


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
    """FTRL state per token, for each of `members` models; trained one mail at a time,
    saved and loaded atomically."""

    def __init__(self, learning: Learning | None = None, members: int = MEMBERS) -> None:
        if members < 1:
            raise ValueError("a database needs at least one member")
        self.learning = learning or Learning()
        self.members = members
        self.nspam = 0
        self.nham = 0
        # z and n of each member (all members hold the same tokens: they learn the same mails)
        self._zs: list[dict[str, float]] = [{} for _ in range(members)]
        self._ns: list[dict[str, float]] = [{} for _ in range(members)]
        self._seen: dict[str, int] = {}  # mails each token appeared in
        # as read from a file: (token blob, z of each member, n of each member, seen, K);
        # unpacked into the dicts on first use for training, a classifier alone never needs them
        self._packed: _Packed | None = None
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
                loaded = Database.from_bytes(f.read())
            self._packed = loaded._packed
            self.members = loaded.members
            self.learning = loaded.learning  # the cached table's header holds not every knob
        if self._packed is not None:
            blob, zs, ns, seen, _ = self._packed
            tokens = blob.split("\n") if len(seen) else []
            self._zs = [dict(zip(tokens, z.tolist(), strict=True)) for z in zs]
            self._ns = [dict(zip(tokens, n.tolist(), strict=True)) for n in ns]
            self._seen = dict(zip(tokens, seen.tolist(), strict=True))
            self._packed = None

    @property
    def z(self) -> dict[str, float]:
        """z of the first member (all of them: `zs`)."""
        self._unpack()
        return self._zs[0]

    @property
    def n(self) -> dict[str, float]:
        """n of the first member (all of them: `ns`)."""
        self._unpack()
        return self._ns[0]

    @property
    def zs(self) -> list[dict[str, float]]:
        self._unpack()
        return self._zs

    @property
    def ns(self) -> list[dict[str, float]]:
        self._unpack()
        return self._ns

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
            return len(self._packed[3])
        return len(self._tokens())

    def _tokens(self) -> dict[str, None]:
        """Every token of any member, in first-seen order (members normally share them)."""
        found = dict.fromkeys(self._zs[0])
        for z in self._zs[1:]:
            if len(z) != len(found) or z.keys() != found.keys():
                found.update(dict.fromkeys(z))
        return found

    def weight(self, token: str) -> float:
        """The token's weight: the mean of the members' weights (0 where a member lacks it)."""
        self._unpack()
        w = self._weight
        found = [w(z[token], n[token]) for z, n in zip(self._zs, self._ns, strict=True) if token in z]
        if not found:
            return 0.0
        return math.fsum(found) / self.members if self.members > 1 else found[0]

    def _weight(self, z: float, n: float) -> float:
        p = self.learning
        if abs(z) <= p.l1:
            return 0.0
        return -(z - math.copysign(p.l1, z)) / ((p.beta + math.sqrt(n)) / p.alpha + p.l2)

    def weights(self) -> dict[str, float]:
        """Every token whose weight is not zero (the bias included), with its weight."""
        if self._weights is None or self._weights_generation != self.generation:
            w = self._weight
            m = self.members
            if self._packed is not None:  # the weighted tokens come first in a file
                # only the first K tokens of the blob are split off
                blob, zs, ns, _, k = self._packed
                tokens = blob.split("\n", k)[:k] if k else []
                cols = [map(w, z[:k].tolist(), n[:k].tolist()) for z, n in zip(zs, ns, strict=True)]
                if m == 1:
                    self._weights = dict(zip(tokens, cols[0], strict=True))
                else:
                    means = (math.fsum(c) / m for c in zip(*cols, strict=True))
                    self._weights = dict(zip(tokens, means, strict=True))
            elif m == 1:
                z0, n0 = self._zs[0], self._ns[0]
                self._weights = {t: x for t, z in z0.items() if (x := w(z, n0[t])) != 0.0}
            else:
                out: dict[str, float] = {}
                for t in self._tokens():
                    found = [w(z[t], n[t]) for z, n in zip(self._zs, self._ns, strict=True) if t in z]
                    x = math.fsum(found) / m
                    if x != 0.0:
                        out[t] = x
                self._weights = out
            self._weights_generation = self.generation
        return self._weights

    # -- training -----------------------------------------------------------

    def train(self, tokens: Iterable[str], is_spam: bool) -> None:
        """One FTRL-Proximal step of every member on one mail (each distinct token counts once)."""
        feats = set(tokens)
        feats.add(BIAS)
        self._unpack()
        for m in range(self.members):
            self._step_mail(m, feats, is_spam)
        self._count(feats, is_spam)

    def _count(self, feats: Iterable[str], is_spam: bool) -> None:
        """Count one mail (with the bias among its tokens): nspam or nham, its tokens' mails."""
        seen = self._seen
        for t in feats:
            seen[t] = seen.get(t, 0) + 1
        seen[BIAS] -= 1  # the bias is in every mail: its count says nothing
        if is_spam:
            self.nspam += 1
        else:
            self.nham += 1
        self.generation += 1

    def _step_mail(self, m: int, feats: set[str] | frozenset[str], is_spam: bool) -> None:
        """One FTRL-Proximal step of member m on one mail's tokens (the bias among them)."""
        p = self.learning
        zs, ns = self._zs[m], self._ns[m]
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
            # the tokens of a ham learn ham_weight times as hard; with
            # weight_bias the bias too (a weighted log loss), without it
            # (databases before it) the bias learns the plain gradient
            g *= p.ham_weight
            if p.weight_bias:
                g_bias = g
        for t in feats:
            gt = g_bias if t == BIAS else g
            n = ns.get(t, 0.0)
            g2 = gt * gt
            sigma = (math.sqrt(n + g2) - math.sqrt(n)) / alpha
            zs[t] = zs.get(t, 0.0) + gt - sigma * ws.get(t, 0.0)
            ns[t] = n + g2

    def bias_state(self) -> list[tuple[float, float]]:
        """(z, n) of the bias in each member (a learn mail puts it back after its first step)."""
        return [(z.get(BIAS, 0.0), n.get(BIAS, 0.0)) for z, n in zip(self.zs, self.ns, strict=True)]

    def set_bias_state(self, state: list[tuple[float, float]]) -> None:
        for (bz, bn), z, n in zip(state, self.zs, self.ns, strict=True):
            z[BIAS], n[BIAS] = bz, bn
        self.generation += 1

    def fit(
        self, mails: Sequence[tuple[Iterable[str], bool]], epochs: int = 5, seed: int = 0
    ) -> None:
        """Train on (tokens, is_spam) pairs `epochs` times, each time in a new shuffled order.

        Shuffling mixes spam and ham, as mail arrives: an online learner fed
        all the spam and then all the ham ends up remembering mostly the ham.
        Each member has its own orders, from `seed` (member 0: Random(seed),
        member i: Random(f"{seed}:{i}")), so the same mails give the same file.
        The mails are counted once (nspam, nham, seen).
        """
        import random  # only training shuffles; `mark` and the service start without it

        self._unpack()
        feats = [(frozenset(tokens) | {BIAS}, is_spam) for tokens, is_spam in mails]
        for m in range(self.members):
            rng = random.Random(seed if m == 0 else f"{seed}:{m}")
            order = list(range(len(feats)))
            step = self._step_mail
            for _ in range(epochs):
                rng.shuffle(order)
                for i in order:
                    f, is_spam = feats[i]
                    step(m, f, is_spam)
        for f, is_spam in feats:
            self._count(f, is_spam)

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
        weighted = self.weights()
        return self._drop([t for t in self._tokens() if t not in weighted])

    def merge(self) -> None:
        """Replace the members by one model with the same weights (to within a rounding).

        For a file to ship: 8 members' z and n make it 8 times the size and
        its load 8 times the work; `--update` and learn mails then go on
        from it as one model (with each token's mean n as its learning rate state).
        """
        self._unpack()
        if self.members == 1:
            return
        table = self.weights()
        p = self.learning
        m = self.members
        z1: dict[str, float] = {}
        n1: dict[str, float] = {}
        for t in self._tokens():
            n = math.fsum(ns.get(t, 0.0) for ns in self._ns) / m
            x = table.get(t, 0.0)
            if x == 0.0:
                z = math.fsum(zs.get(t, 0.0) for zs in self._zs) / m
                z = z if abs(z) <= p.l1 else 0.0
            else:  # the z whose weight at this n is x
                z = -x * ((p.beta + math.sqrt(n)) / p.alpha + p.l2) - math.copysign(p.l1, x)
            z1[t], n1[t] = z, n
        self.members, self._zs, self._ns = 1, [z1], [n1]
        self.generation += 1

    def drop_prefixes(self, prefixes: Iterable[str]) -> int:
        """Drop tokens starting with any of the prefixes; returns how many.

        For a database meant for other sites: `received:`, `to:` tokens name
        the infrastructure and people of the site that trained it.
        """
        pre = tuple(prefixes)
        if not pre:
            return 0
        self._unpack()
        return self._drop([t for t in self._tokens() if t.startswith(pre)])

    def _drop(self, tokens: list[str]) -> int:
        self._unpack()
        for t in tokens:
            for z, n in zip(self._zs, self._ns, strict=True):
                z.pop(t, None)
                n.pop(t, None)
            self._seen.pop(t, None)
        self.generation += 1
        return len(tokens)

    # -- files ----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        self._unpack()
        table = self.weights()
        # the tokenizer never makes tokens with "\n"; a library caller might
        usable = [t for t in self._tokens() if t and "\n" not in t]
        weighted = sorted(t for t in usable if t in table)
        rest = sorted(t for t in usable if t not in table)
        tokens = weighted + rest
        import json  # not at module level: a cached classifier table needs none

        p = self.learning
        header = json.dumps(
            {
                "model": "ftrl",
                "members": self.members,
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
                "weight_bias": p.weight_bias,
                "note": self.note,
            },
            sort_keys=True,
        ).encode()
        blob = "\n".join(tokens).encode("utf-8")
        zs = [array.array("d", (z.get(t, 0.0) for t in tokens)) for z in self._zs]
        ns = [array.array("d", (n.get(t, 0.0) for t in tokens)) for n in self._ns]
        seen = array.array("I", (self._seen.get(t, 0) for t in tokens))
        if sys.byteorder != "little":  # pragma: no cover
            for a in (*zs, *ns):
                a.byteswap()
            seen.byteswap()
        return b"".join(
            [
                MAGIC,
                _U32.pack(VERSION),
                _U32.pack(len(header)),
                header,
                _U32.pack(len(blob)),
                blob,
                *(z.tobytes() for z in zs),
                *(n.tobytes() for n in ns),
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
            if version not in (3, VERSION):
                raise DatabaseError(f"unsupported database version {version}")
            (hlen,) = _U32.unpack_from(data, 12)
            import json

            header = json.loads(data[16 : 16 + hlen])
            # version 3: one model, the same layout
            members = 1 if version == 3 else int(header["members"])
            pos = 16 + hlen
            (blen,) = _U32.unpack_from(data, pos)
            pos += 4
            blob = data[pos : pos + blen].decode("utf-8")
            pos += blen
            n = int(header["tokens"])
            k = int(header["weighted"])
            ntokens = blob.count("\n") + 1 if n else 0
            if (
                not 1 <= members <= 1000
                or ntokens != n
                or not 0 <= k <= n
                or len(data) != pos + (16 * members + 4) * n
            ):
                raise DatabaseError("damaged database (sizes do not match)")
            learning = Learning(
                float(header["alpha"]),
                float(header["beta"]),
                float(header["l1"]),
                float(header["l2"]),
                int(header["length"]),
                # absent from files written before it existed: they learnt with 1
                float(header.get("ham_weight", 1.0)),
                # absent from files written before it existed: their bias learnt unweighted
                bool(header.get("weight_bias", False)),
            )
            arrays: list[array.array[float]] = []
            for i in range(2 * members):
                a = array.array("d")
                a.frombytes(data[pos + 8 * n * i : pos + 8 * n * (i + 1)])
                arrays.append(a)
            pos += 16 * n * members
            seen = array.array("I")
            seen.frombytes(data[pos : pos + 4 * n])
        except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise DatabaseError(f"damaged database: {exc}") from None
        if sys.byteorder != "little":  # pragma: no cover
            for a in arrays:
                a.byteswap()
            seen.byteswap()
        zs, ns = arrays[:members], arrays[members:]
        db = cls(learning, members)
        db.nspam = int(header["nspam"])
        db.nham = int(header["nham"])
        db.note = str(header.get("note", ""))
        # sums (C loops): a NaN or an infinity anywhere makes them not finite
        if n and not all(
            math.isfinite(sum(z)) and math.isfinite(sum(nn)) and min(nn) >= 0.0
            for z, nn in zip(zs, ns, strict=True)
        ):
            raise DatabaseError("damaged database (a weight that is not a number)")
        db._packed = (blob, zs, ns, seen, k)
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
