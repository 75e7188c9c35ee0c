"""Tokenize or classify many mails on several cores, results in input order.

Tokenizing is pure Python and CPU-bound, so for a batch (an mbox to mark, a
corpus to train on) forked worker processes give a near-linear speed-up.
Nothing big crosses between processes: the children inherit the mails and
the classifier by fork and send back only the small results.
"""

from __future__ import annotations

import gc
import itertools
import os
from collections.abc import Callable, Iterator, Sequence

from poste.spam.model import Classifier
from poste.spam.tokenizer import tokenize

# typing only for the checker: its import costs a batch command ~5 ms of start-up
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")

Judgement = tuple[float, str, list[tuple[str, float]]]

_CLASSIFIER: Classifier | None = None
_CLUES = 0
_MAX_BYTES = 0


def default_jobs() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _judge(raw: bytes) -> Judgement:
    clf = _CLASSIFIER
    assert clf is not None
    if _CLUES:
        r = clf.classify(raw)
        return r.score, r.label, r.strongest(_CLUES)
    score = clf.score(tokenize(raw, clf.params.max_bytes))
    return score, clf.label(score), []


def _tokens(raw: bytes) -> set[str]:
    return tokenize(raw, _MAX_BYTES)


def _parallel(job: Callable[[bytes], T], mails: Sequence[bytes], jobs: int) -> Iterator[T]:
    """job(mail) for each mail, in order, on `jobs` processes (this one included).

    The mails are cut into `jobs` contiguous ranges; each forked child works
    on its range and pipes back the pickled results once done, while this
    process works on the first range (and its caller writes those out).
    Children inherit the mails and the classifier by fork: nothing big is
    copied or pickled.
    """
    # The tokenizer makes no reference cycles, so the cycle collector only
    # costs time here (it would rescan the whole database over and over).
    enabled = gc.isenabled()
    gc.freeze()
    gc.disable()
    try:
        yield from _spread(job, mails, jobs)
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def _spread(job: Callable[[bytes], T], mails: Sequence[bytes], jobs: int) -> Iterator[T]:
    n = len(mails)
    if jobs <= 1 or n < 4 * jobs or not hasattr(os, "fork"):
        yield from map(job, mails)
        return
    import pickle

    # the parent also writes the output, so it takes a slightly smaller share
    first = n * 9 // (10 * jobs)
    rest = n - first
    bounds = [0, first] + [first + rest * i // (jobs - 1) for i in range(1, jobs)]
    children: list[tuple[int, int]] = []
    for lo, hi in itertools.pairwise(bounds[1:]):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                os.close(rfd)
                data = pickle.dumps([job(m) for m in mails[lo:hi]], protocol=5)
                with os.fdopen(wfd, "wb") as f:
                    f.write(data)
                code = 0
            finally:
                os._exit(code)
        os.close(wfd)
        children.append((pid, rfd))
    try:
        yield from map(job, mails[: bounds[1]])
        while children:
            pid, rfd = children[0]
            with os.fdopen(rfd, "rb") as f:
                data = f.read()
            children.pop(0)
            _, status = os.waitpid(pid, 0)
            if status != 0 or not data:
                raise RuntimeError(f"worker process {pid} failed (status {status})")
            yield from pickle.loads(data)
    finally:
        for pid, rfd in children:  # on an early exit: stop and reap the rest
            try:
                os.close(rfd)
            except OSError:
                pass
            try:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            except OSError:
                pass


def classify_many(
    clf: Classifier, mails: Sequence[bytes], jobs: int = 1, clues: int = 0
) -> Iterator[Judgement]:
    """(score, label, the `clues` strongest clues) for each mail, in order."""
    global _CLASSIFIER, _CLUES
    _CLASSIFIER = clf
    _CLUES = clues
    clf.prepare()  # once, before the fork
    yield from _parallel(_judge, mails, jobs)


def tokenize_many(mails: Sequence[bytes], max_bytes: int, jobs: int = 1) -> Iterator[set[str]]:
    """The token set of each mail, in order."""
    global _MAX_BYTES
    _MAX_BYTES = max_bytes
    yield from _parallel(_tokens, mails, jobs)
