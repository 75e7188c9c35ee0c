"""`poste spam classify` without click: the batch path that must start in milliseconds.

Why a second parser: importing click (and what it pulls in: typing,
inspect, enum, ...) costs 20-30 ms, more than classifying a few hundred
mails; against spamoracle (an OCaml binary, a few ms to start) that
start-up decides who is faster on an mbox of a thousand mails.  So the
entry point (`poste.launch_cli`) hands `poste spam classify` here first.
This handles only the plain form of the command: `--db`, `-j`/`--jobs`,
`--ham-cutoff`, `--spam-cutoff` and PATHs.  For anything else, and for
anything wrong (an unknown option, a bad value, a missing file, a damaged
database), it returns None before writing a byte, and the click command in
`poste.spam.cli` runs instead, with its help and its one-line errors: the
command's meaning is defined there, once; this is only its fast lane.
"""

from __future__ import annotations

import gc
import sys

# not `from typing import TYPE_CHECKING`: typing costs a batch command ~5 ms of start-up
TYPE_CHECKING = False
if TYPE_CHECKING:
    from poste.spam.model import Classifier

_VALUED = {"--db": "db", "-j": "jobs", "--jobs": "jobs", "--ham-cutoff": "ham", "--spam-cutoff": "spam"}


def _parse(args: list[str]) -> tuple[dict[str, str], list[str]] | None:
    """(options, paths) of a plain `classify` command line, None for anything else."""
    opts: dict[str, str] = {}
    paths: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            paths.extend(args[i:])
            break
        if not a.startswith("-") or a == "-":
            paths.append(a)
            continue
        name, eq, value = a.partition("=")
        if not eq and a.startswith("-j") and len(a) > 2 and not a.startswith("--"):
            name, value, eq = "-j", a[2:], "="
        key = _VALUED.get(name)
        if key is None or key in opts:
            return None
        if not eq:
            if i >= len(args):
                return None
            value = args[i]
            i += 1
        opts[key] = value
    return (opts, paths) if paths else None


def classify(args: list[str]) -> int | None:
    """Run `poste spam classify ARGS`; None when the click command must handle it."""
    parsed = _parse(args)
    if parsed is None:
        return None
    # Nothing this command makes has reference cycles, and the collector's
    # passes over what the imports and the mails allocate cost ~2% of a run.
    gc.disable()
    try:
        return _classify(*parsed)
    finally:
        gc.enable()


def _classify(opts: dict[str, str], paths: list[str]) -> int | None:
    try:
        jobs = int(opts["jobs"]) if "jobs" in opts else None
        ham = float(opts.get("ham", "nan")) if "ham" in opts else None
        spam = float(opts.get("spam", "nan")) if "spam" in opts else None
    except ValueError:
        return None
    if jobs is not None and not 1 <= jobs <= 64:
        return None
    from poste.spam.model import Classifier, Params

    ham = Params.ham_cutoff if ham is None else ham
    spam = Params.spam_cutoff if spam is None else spam
    if not (0.0 <= ham <= spam <= 1.0):
        return None
    from poste.spam import default_db_file
    from poste.spam.batch import default_jobs
    from poste.spam.corpus import CorpusError
    from poste.spam.database import DatabaseError
    from poste.spam.weights_cache import load

    jobs = jobs or default_jobs()
    try:
        # the weight table from the user's cache when the file is unchanged
        db = load(opts.get("db") or default_db_file())
        clf = Classifier(db, Params(ham_cutoff=ham, spam_cutoff=spam))
        if jobs == 1:
            lines = _one_by_one(clf, paths)
        else:
            lines = _on_cores(clf, paths, jobs)
    except (DatabaseError, CorpusError):
        return None
    # one write: the output of an mbox of 10,000 mails is ~1 MB, fine to hold
    try:
        sys.stdout.write("".join(lines))
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (`| head`): nothing to say, no traceback
        return 1
    except OSError as exc:
        print(f"Error: cannot write the output: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def _one_by_one(clf: Classifier, paths: list[str]) -> list[str]:
    """The output lines, each mail judged as it is cut from its mbox and then dropped.

    Why not the list of all mails that the cores need: holding every mail
    at once makes as many fresh pages (and page faults) as the mbox has,
    where one mail at a time reuses the memory the previous one freed.
    """
    from poste.spam.corpus import iter_messages
    from poste.spam.tokenizer import tokenize

    clf.prepare()
    score, label, max_bytes = clf.score, clf.label, clf.params.max_bytes
    lines = []
    for path in paths:
        for name, raw in iter_messages(path):
            s = score(tokenize(raw, max_bytes))
            lines.append(f"{label(s)} {s:.4f} {name}\n")
    return lines


def _on_cores(clf: Classifier, paths: list[str], jobs: int) -> list[str]:
    """The output lines, the mails judged on `jobs` processes."""
    from poste.spam.batch import classify_many
    from poste.spam.corpus import iter_messages

    found = [m for path in paths for m in iter_messages(path)]
    names = [name for name, _ in found]
    mails = [raw for _, raw in found]
    del found
    return [
        f"{label} {score:.4f} {name}\n"
        for name, (score, label, _) in zip(
            names, classify_many(clf, mails, jobs), strict=True
        )
    ]
