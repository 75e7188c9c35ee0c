"""Scoring: logistic regression over the tokens of a mail (see database for how it learns).

score = sigmoid(bias + the sum of the weights of the mail's tokens, scaled
down for a mail of many tokens), in [0, 1]: the model's probability that the mail is spam, learnt on its
training mail.  Near 1 the tokens that say spam outweigh those that say ham
by far, near 0 the reverse; in between the evidence is weak or points both
ways, which is what the `unknown` label is for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain

from poste.spam.database import BIAS, Database, _sigmoid, scale
from poste.spam.mime import DEFAULT_MAX_BYTES
from poste.spam.tokenizer import tokenize

SPAM = "yes"
HAM = "no"
UNKNOWN = "unknown"


class Params:
    """The cutoffs (chosen by time-split validation inside the training part) and limits.

    The class attributes are the defaults (`Params.spam_cutoff` for a flag's default).
    """

    # a plain class, not a dataclass: `import dataclasses` costs ~20 ms of a batch command's start-up
    ham_cutoff: float = 0.10  # score below: ham ("no")
    spam_cutoff: float = 0.97  # score at or above: spam ("yes"); between: "unknown"
    max_bytes: int = DEFAULT_MAX_BYTES  # text tokenized per message
    max_tokens: int = 150  # at most this many deciding tokens are listed in a detail

    def __init__(
        self,
        ham_cutoff: float = 0.10,
        spam_cutoff: float = 0.97,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_tokens: int = 150,
    ) -> None:
        self.ham_cutoff = ham_cutoff
        self.spam_cutoff = spam_cutoff
        self.max_bytes = max_bytes
        self.max_tokens = max_tokens

    def _key(self) -> tuple[float, float, int, int]:
        return (self.ham_cutoff, self.spam_cutoff, self.max_bytes, self.max_tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Params) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        h, s, b, t = self._key()
        return f"Params(ham_cutoff={h}, spam_cutoff={s}, max_bytes={b}, max_tokens={t})"


class Result:
    """A mail's score and label; the tokens that decided are found only when asked."""

    __slots__ = ("deciding", "label", "score")

    def __init__(self, score: float, label: str, deciding: _Lazy | None = None) -> None:
        self.score = score
        self.label = label
        self.deciding = deciding

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Result) and (self.score, self.label) == (other.score, other.label)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Result(score={self.score!r}, label={self.label!r})"

    @property
    def tokens(self) -> list[str]:
        return self.deciding.get() if self.deciding is not None else []

    @property
    def clues(self) -> list[tuple[str, float]]:
        """(token, sigmoid(weight)) of the deciding tokens: above 0.5 says spam."""
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


class Classifier:
    """Scores mails with a database's weights; the table is rebuilt when the database changes."""

    def __init__(self, db: Database, params: Params | None = None) -> None:
        self.db = db
        self.params = params or Params()
        self._weights: dict[str, float] = {}
        self._bias = 0.0
        self._length = 150
        self._generation = -1

    def prepare(self) -> None:
        """Build the weight table now (before a fork, or before the first mail)."""
        self._weights = self.db.weights()
        self._bias = self._weights.get(BIAS, 0.0)
        self._length = self.db.learning.length
        self._generation = self.db.generation

    def _table(self) -> dict[str, float]:
        if self._generation != self.db.generation:
            self.prepare()
        return self._weights

    def token_prob(self, token: str) -> float:
        """sigmoid(weight) of a token: 0.5 for one that counts for nothing."""
        return _sigmoid(self._table().get(token, 0.0))

    def deciding(self, tokens: Iterable[str]) -> list[str]:
        """The tokens of a mail that weigh in its score, heaviest first (ties by name)."""
        w = self._table()
        found = sorted((-abs(w[t]), t) for t in set(tokens) if t in w and t != BIAS)
        return [t for _, t in found[: self.params.max_tokens]]

    def score(self, tokens: Iterable[str]) -> float:
        """The score of a mail's tokens, in [0, 1]."""
        w = self._table()
        # fsum is exact, so the score does not depend on the (hash-seeded)
        # order of the set: the same mail scores the same in every process
        if not isinstance(tokens, (set, frozenset)):
            tokens = set(tokens)
        # chained, not a list with the bias appended: the same exact sum, one list fewer
        total = math.fsum(chain(filter(None, map(w.get, tokens)), (self._bias,)))
        return _sigmoid(scale(len(tokens) + 1, self._length) * total)

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
        """One online learning step on one raw message."""
        self.db.train(tokenize(raw, self.params.max_bytes), is_spam)
