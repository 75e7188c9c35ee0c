"""Scoring: Robinson's f(w) per token, Fisher's chi-square to combine them.

This is the SpamBayes / bogofilter method.  Each token gets a spam
probability smoothed toward 0.5 when it was seen rarely (Robinson's f(w));
the strongest tokens are combined twice with Fisher's method, once to test
"this is spam" and once "this is ham".  The score is in [0, 1]: near 1 both
tests agree on spam, near 0 on ham, and near 0.5 either the evidence is weak
or it points both ways at once -- which is what the `unknown` label is for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat

from poste.spam.database import Database
from poste.spam.mime import DEFAULT_MAX_BYTES
from poste.spam.tokenizer import tokenize

SPAM = "yes"
HAM = "no"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Params:
    """The knobs, with SpamBayes' defaults where it has them."""

    unknown_strength: float = 0.45  # Robinson's s: weight of the prior
    unknown_prob: float = 0.5  # Robinson's x: the prior
    min_strength: float = 0.1  # tokens with |f - 0.5| below this are ignored
    max_tokens: int = 150  # at most this many of the strongest tokens are combined
    ham_cutoff: float = 0.20  # score below: ham ("no")
    spam_cutoff: float = 0.99  # score at or above: spam ("yes"); between: "unknown"
    max_bytes: int = DEFAULT_MAX_BYTES  # text tokenized per message


@dataclass
class Result:
    score: float
    label: str
    # the tokens that decided (found only when asked: most callers want the label)
    deciding: _Lazy | None = field(default=None, repr=False, compare=False)

    @property
    def tokens(self) -> list[str]:
        return self.deciding.get() if self.deciding is not None else []

    @property
    def clues(self) -> list[tuple[str, float]]:
        """(token, f(w)) of the deciding tokens."""
        if self.deciding is None:
            return []
        f = self.deciding.clf.token_prob
        return [(t, f(t)) for t in self.tokens]

    def strongest(self, count: int) -> list[tuple[str, float]]:
        """The `count` strongest clues, strongest first (ties by name)."""
        return sorted(self.clues, key=lambda c: (-abs(c[1] - 0.5), c[0]))[:count]

    def detail(self, count: int = 5) -> str:
        """The score and the strongest tokens, for the optional detail field."""
        return detail_line(self.score, self.strongest(len(self.tokens)), count)


def detail_line(score: float, ranked: list[tuple[str, float]], count: int = 5) -> str:
    """`score=0.9987; spam: tok:0.99 ...; ham: tok:0.02 ...` from clues strongest first."""
    spammy = [c for c in ranked if c[1] > 0.5][:count]
    hammy = [c for c in ranked if c[1] < 0.5][:count]
    parts = [f"score={score:.4f}"]
    if spammy:
        parts.append("spam: " + " ".join(f"{_safe(t)}:{p:.2f}" for t, p in spammy))
    if hammy:
        parts.append("ham: " + " ".join(f"{_safe(t)}:{p:.2f}" for t, p in hammy))
    return "; ".join(parts)


class _Lazy:
    """The deciding tokens of one mail, worked out on first use."""

    def __init__(self, clf: Classifier, tokens: Iterable[str]) -> None:
        self.clf = clf
        self.all = tokens
        self.found: list[str] | None = None

    def get(self) -> list[str]:
        if self.found is None:
            self.found = self.clf.deciding(self.all)
        return self.found


def _safe(token: str) -> str:
    """A token as printable ASCII, short, fit for a header field."""
    text = token.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c for c in text if 32 < ord(c) < 127 and c not in ";")
    return text[:40]


def chi2q(x2: float, v: int) -> float:
    """P(chisq >= x2) with v (even) degrees of freedom.

    The series sum_{i<v/2} e^-m m^i / i! (m = x2/2) is cut short when what is
    left cannot matter: past its peak (i > m) once a term is negligible, and
    not at all when even the largest term is below 1e-30.
    """
    m = x2 / 2.0
    k = v // 2
    if m > k + 50 and -m + (k - 1) * math.log(m) - math.lgamma(k) < -69.0:  # largest term < 1e-30
        return 0.0
    term = math.exp(-m)
    total = term
    for i in range(1, k):
        term *= m / i
        total += term
        if i > m and term < total * 1e-17:
            break
    return min(total, 1.0)


class Classifier:
    """A database and the parameters to judge with.

    `prepare()` (run on first use, and again whenever the database changes)
    turns the counts into one dict, token -> strength code: 0 for a token too
    weak to count, else the rank of its f(w) among the distinct values, 1 the
    strongest.  f(w) and its two logarithms are computed once per distinct
    pair of counts (a thousand or so, against tens of thousands of tokens),
    and the dict is built by C-level zips, so a 100k-token database is ready
    in milliseconds.  Scoring a mail is then one dict lookup per token, an
    integer sort only when more than `max_tokens` count, and two exact sums
    of precomputed logarithms: no per-token objects, no floats made.
    """

    def __init__(self, db: Database, params: Params | None = None) -> None:
        self.db = db
        self.params = params or Params()
        self._codes: dict[str, int] = {}
        # by code: f(w), ln f(w), ln(1 - f(w)); index 0 unused (too weak to count)
        self._fval: list[float] = [0.5]
        self._ln_f: list[float] = [0.0]
        self._ln_1f: list[float] = [0.0]
        self._complete = False
        self._generation = db.generation
        p = self.params
        self._lo, self._hi = 0.5 - p.min_strength, 0.5 + p.min_strength

    def prepare(self) -> None:
        """Build the code table now (a service does, before its first mail)."""
        if self._complete and self._generation == self.db.generation:
            return
        self._generation = self.db.generation
        groups = self.db.groups()
        tokens: Sequence[str]
        codes: Iterable[int]
        if groups is not None:  # as read from a file: one pair per group of tokens
            tokens, pairs, sizes = groups
            distinct: Iterable[tuple[int, int]] = pairs
        else:
            tokens, spam, ham = self.db.columns()
            distinct = set(zip(spam, ham, strict=True))
        strong: dict[float, list[tuple[int, int]]] = {}
        for counts in distinct:
            f = self._f(*counts)
            if not self._lo < f < self._hi:
                strong.setdefault(f, []).append(counts)
        # strongest first; ties (same distance from 0.5) broken by f, so the
        # cut at max_tokens is deterministic
        ranked = sorted(strong, key=lambda f: (-abs(f - 0.5), f))
        code_of: dict[tuple[int, int], int] = dict.fromkeys(distinct, 0)
        for code, f in enumerate(ranked, 1):
            for counts in strong[f]:
                code_of[counts] = code
        self._fval = [0.5, *ranked]
        self._ln_f = [0.0, *map(math.log, ranked)]
        self._ln_1f = [0.0, *(math.log1p(-f) for f in ranked)]
        if groups is not None:
            codes = chain.from_iterable(map(repeat, map(code_of.__getitem__, pairs), sizes))
        else:
            codes = map(code_of.__getitem__, zip(spam, ham, strict=True))
        self._codes = dict(zip(tokens, codes, strict=True))
        self._complete = True

    def _f(self, sc: int, hc: int) -> float:
        """Robinson: f = (s*x + n*p) / (s + n), p = spam ratio / (spam ratio + ham ratio)."""
        p = self.params
        nspam = self.db.nspam or 1
        nham = self.db.nham or 1
        s = p.unknown_strength
        sr = sc * nham
        n = sc + hc
        if n == 0:  # (0, 0): only a hand-made file has it; no evidence either way
            return p.unknown_prob
        return (s * p.unknown_prob + n * sr / (sr + hc * nspam)) / (s + n)

    def _table(self) -> dict[str, int]:
        if not self._complete or self._generation != self.db.generation:
            self.prepare()
        return self._codes

    def token_prob(self, token: str) -> float:
        """f(w) of a token (the prior for a token never seen in training)."""
        code = self._table().get(token)
        if code:
            return self._fval[code]
        counts = self.db.counts.get(token)
        return self.params.unknown_prob if counts is None else self._f(*counts)

    def deciding(self, tokens: Iterable[str]) -> list[str]:
        """The tokens of a mail that take part in its score, strongest first."""
        codes = self._table()
        ranked = sorted((c, t) for t in tokens if (c := codes.get(t, 0)))
        return [t for _, t in ranked[: self.params.max_tokens]]

    def score(self, tokens: Iterable[str]) -> float:
        """The score of a mail's tokens, in [0, 1]."""
        found = list(filter(None, map(self._table().get, tokens)))
        n = len(found)
        if n == 0:
            return 0.5
        top = self.params.max_tokens
        if n > top:
            found.sort()
            del found[top:]
            n = top
        # Fisher: -2 ln(prod f) is chi-square with 2n degrees of freedom.
        # fsum is exact, so the score does not depend on the (hash-seeded)
        # order of the set: the same mail scores the same in every process.
        ln_f = math.fsum(map(self._ln_f.__getitem__, found))
        ln_1f = math.fsum(map(self._ln_1f.__getitem__, found))
        spamminess = 1.0 - chi2q(-2.0 * ln_1f, 2 * n)
        hamminess = 1.0 - chi2q(-2.0 * ln_f, 2 * n)
        return (spamminess - hamminess + 1.0) / 2.0

    def score_tokens(self, tokens: Iterable[str]) -> Result:
        score = self.score(tokens)
        return Result(score, self.label(score), _Lazy(self, tokens))

    def label(self, score: float) -> str:
        if score >= self.params.spam_cutoff:
            return SPAM
        if score < self.params.ham_cutoff:
            return HAM
        return UNKNOWN

    def classify(self, raw: bytes) -> Result:
        """Judge one raw message.  Never raises on any input."""
        return self.score_tokens(tokenize(raw, self.params.max_bytes))

    def train(self, raw: bytes, is_spam: bool) -> None:
        self.db.train(tokenize(raw, self.params.max_bytes), is_spam)

    def untrain(self, raw: bytes, is_spam: bool) -> None:
        self.db.untrain(tokenize(raw, self.params.max_bytes), is_spam)
