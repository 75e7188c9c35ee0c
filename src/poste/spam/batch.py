"""Tokenize or classify many mails on several cores, results in input order.

Tokenizing is pure Python and CPU-bound, so for a batch (an mbox to mark, a
corpus to train on) forked worker processes give a near-linear speed-up.
The classifier is handed to the workers by fork, not pickled: the parent
sets the module global before the pool starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from poste.spam.model import Classifier
from poste.spam.tokenizer import tokenize

if TYPE_CHECKING:
    import multiprocessing.pool

_CLASSIFIER: Classifier | None = None
_MAX_BYTES = 0

Judgement = tuple[float, str, list[tuple[str, float]]]


def default_jobs() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


_CLUES = 0


def _judge(raw: bytes) -> Judgement:
    assert _CLASSIFIER is not None
    r = _CLASSIFIER.classify(raw)
    return r.score, r.label, r.strongest(_CLUES) if _CLUES else []


def _tokens(raw: bytes) -> set[str]:
    return tokenize(raw, _MAX_BYTES)


def _pool(jobs: int) -> multiprocessing.pool.Pool | None:
    if jobs <= 1:
        return None
    import multiprocessing  # not imported for one-process runs: it costs start-up time

    if "fork" not in multiprocessing.get_all_start_methods():
        return None
    return multiprocessing.get_context("fork").Pool(jobs)


def classify_many(
    clf: Classifier, mails: Iterable[bytes], jobs: int = 1, clues: int = 0
) -> Iterator[Judgement]:
    """(score, label, the `clues` strongest clues) for each mail, in order."""
    global _CLASSIFIER, _CLUES
    _CLASSIFIER = clf
    _CLUES = clues
    clf.probs()  # build the f(w) table once, before forking
    pool = _pool(jobs)
    if pool is None:
        yield from map(_judge, mails)
        return
    with pool:
        yield from pool.imap(_judge, mails, chunksize=16)


def tokenize_many(mails: Iterable[bytes], max_bytes: int, jobs: int = 1) -> Iterator[set[str]]:
    """The token set of each mail, in order."""
    global _MAX_BYTES
    _MAX_BYTES = max_bytes
    pool = _pool(jobs)
    if pool is None:
        yield from map(_tokens, mails)
        return
    with pool:
        yield from pool.imap(_tokens, mails, chunksize=16)
