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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

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
    # f(w) of (at least) those tokens; shared with the classifier, not copied
    probs: Mapping[str, float] = field(default_factory=dict, repr=False, compare=False)

    @property
    def tokens(self) -> list[str]:
        return self.deciding.get() if self.deciding is not None else []

    @property
    def clues(self) -> list[tuple[str, float]]:
        """(token, f(w)) of the deciding tokens."""
        return [(t, self.probs[t]) for t in self.tokens]

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
    """P(chisq >= x2) with v (even) degrees of freedom."""
    m = x2 / 2.0
    term = math.exp(-m)
    total = term
    for i in range(1, v // 2):
        term *= m / i
        total += term
    return min(total, 1.0)


class Classifier:
    """A database and the parameters to judge with; the f(w) table is cached."""

    def __init__(self, db: Database, params: Params | None = None) -> None:
        self.db = db
        self.params = params or Params()
        self._probs: dict[str, float] = {}
        self._vals: dict[str, tuple[float, float, float]] = {}
        self._generation = -1

    def probs(self) -> dict[str, float]:
        """f(w) of every token strong enough to count (rebuilt after training)."""
        if self._generation != self.db.generation:
            self._build()
            self._generation = self.db.generation
        return self._probs

    def _build(self) -> None:
        p = self.params
        db = self.db
        nspam = max(db.nspam, 1)
        nham = max(db.nham, 1)
        s, x, floor = p.unknown_strength, p.unknown_prob, p.min_strength
        sx = s * x
        lo, hi = 0.5 - floor, 0.5 + floor
        tokens: list[str] = []
        fs: list[float] = []
        for t, (sc, hc) in db.counts.items():
            # Robinson: f = (s*x + n*p) / (s + n), p = spam ratio / (spam + ham ratios)
            sr = sc * nham
            n = sc + hc
            f = (sx + n * sr / (sr + hc * nspam)) / (s + n)
            if f >= hi or f <= lo:
                tokens.append(t)
                fs.append(f)
        log = math.log
        self._probs = dict(zip(tokens, fs, strict=True))
        # One dict lookup per token gives all scoring needs: (rank, ln f, ln(1-f)),
        # rank = -|f - 0.5| so that sorting the tuples puts the strongest first.
        # (The lookups are memory-bound: three dicts cost three cache misses.)
        self._vals = dict(
            zip(tokens, [(-abs(f - 0.5), log(f), log(1.0 - f)) for f in fs], strict=True)
        )

    def token_prob(self, token: str) -> float:
        return self.probs().get(token, self.params.unknown_prob)

    def deciding(self, tokens: Iterable[str]) -> list[str]:
        """The tokens of a mail that take part in its score."""
        probs = self.probs()
        keys = [t for t in tokens if t in probs]
        if len(keys) > self.params.max_tokens:
            keys.sort(key=lambda t: (self._vals[t][0], t))
            del keys[self.params.max_tokens :]
        return keys

    def score_tokens(self, tokens: Iterable[str]) -> Result:
        p = self.params
        probs = self.probs()
        vals = [v for v in map(self._vals.get, tokens) if v is not None]
        n = len(vals)
        if n > p.max_tokens:
            # equal ranks mean equal f(w): which of them is cut does not change the score
            vals.sort()
            del vals[p.max_tokens :]
            n = p.max_tokens
        if n == 0:
            return Result(0.5, self.label(0.5))
        _, ln_f, ln_1f = zip(*vals, strict=True)
        # Fisher: -2 ln(prod f) is chi-square with 2n degrees of freedom.
        # fsum is exact, so the score does not depend on the (hash-seeded)
        # order of the set: the same mail scores the same in every process.
        spamminess = 1.0 - chi2q(-2.0 * math.fsum(ln_1f), 2 * n)
        hamminess = 1.0 - chi2q(-2.0 * math.fsum(ln_f), 2 * n)
        score = (spamminess - hamminess + 1.0) / 2.0
        return Result(score, self.label(score), _Lazy(self, tokens), probs)

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
