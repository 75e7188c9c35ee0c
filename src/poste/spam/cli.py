"""`poste spam train|classify|mark|eval`: the classifier from the command line."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import click

from poste.spam import default_db_file
from poste.spam.batch import classify_many, default_jobs, tokenize_many
from poste.spam.corpus import (
    CorpusError,
    count_messages,
    iter_messages,
    split_mbox_raw,
    unquote_mbox,
)
from poste.spam.database import MEMBERS, Database, DatabaseError, Learning
from poste.spam.mime import DEFAULT_MAX_BYTES
from poste.spam.model import Classifier, Params

DEFAULT_HEADER = "X-Spamtacus"

db_option = click.option(
    "--db",
    "db_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Token database (default: the one shipped with poste).",
)
cutoff_options = [
    click.option(
        "--ham-cutoff",
        type=click.FloatRange(0, 1),
        default=Params.ham_cutoff,
        show_default=True,
        help="Scores below this are labelled 'no'.",
    ),
    click.option(
        "--spam-cutoff",
        type=click.FloatRange(0, 1),
        default=Params.spam_cutoff,
        show_default=True,
        help="Scores at or above this are labelled 'yes'.",
    ),
]
jobs_option = click.option(
    "-j",
    "--jobs",
    type=click.IntRange(1, 64),
    default=None,
    help="Worker processes for batches (default: one per core, up to 8).",
)


members_option = click.option(
    "--members",
    type=click.IntRange(1, 64),
    default=MEMBERS,
    show_default=True,
    help="Models trained in different seeded orders, their weights averaged "
    "(with --update: only for a new file; an existing one keeps its own).",
)
seed_option = click.option(
    "--seed",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Seed of the training orders (the same mails and seed give the same file).",
)


def _cutoffs(f: click.decorators.FC) -> click.decorators.FC:
    for opt in reversed(cutoff_options):
        f = opt(f)
    return f


def _params(ham_cutoff: float, spam_cutoff: float) -> Params:
    if ham_cutoff > spam_cutoff:
        raise click.UsageError("--ham-cutoff must not be above --spam-cutoff")
    return Params(ham_cutoff=ham_cutoff, spam_cutoff=spam_cutoff)


def _load(db_path: str | None) -> Database:
    try:
        return Database.load(db_path if db_path is not None else default_db_file())
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from None


def _messages(paths: tuple[str, ...]) -> Iterator[tuple[str, bytes]]:
    for path in paths:
        try:
            yield from iter_messages(path)
        except CorpusError as exc:
            raise click.ClickException(str(exc)) from None


def _chunks(mails: Iterator[bytes], size: int = 4000) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for raw in mails:
        chunk.append(raw)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train, run and evaluate the spam classifier.

    A PATH of mails is a folder of one-mail files, a Maildir, an mbox, or a
    .tar.gz of those (ARCHIVE.tar.gz:FOLDER for one folder inside it).
    """


def _learning(
    ham_weight: float | None = None, l2: float | None = None, weight_bias: bool | None = None
) -> Learning:
    """The learner's settings: the defaults, but for the options given (None: not given)."""
    learning = Learning()
    if ham_weight is not None:
        learning.ham_weight = ham_weight
    if l2 is not None:
        learning.l2 = l2
    if weight_bias is not None:
        learning.weight_bias = weight_bias
    return learning


@main.command()
@click.option("--spam", "spam_paths", multiple=True, metavar="PATH", help="Mails that are spam.")
@click.option("--ham", "ham_paths", multiple=True, metavar="PATH", help="Mails that are not.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Database to write (atomically).",
)
@click.option(
    "--update",
    is_flag=True,
    help="Go on learning from the database already at --output instead of an empty one.",
)
@click.option(
    "--epochs",
    type=click.IntRange(1, 100),
    default=5,
    show_default=True,
    help="Passes over the mails (each in a new shuffled order).",
)
@click.option(
    "--min-count",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Drop tokens seen in fewer mails than this (2 drops one-off tokens).",
)
@click.option(
    "--drop",
    "drop_prefixes",
    multiple=True,
    metavar="PREFIX",
    help="Drop tokens starting with PREFIX (e.g. received: for a database shipped to other sites).",
)
@click.option(
    "--sparse",
    is_flag=True,
    help="Keep only tokens whose weight is not zero (a small file to ship; same scores).",
)
@click.option(
    "--merge",
    is_flag=True,
    help="Save the members as one model with the same weights (a small file to ship; "
    "--update from it learns as one model).",
)
@click.option(
    "--weight-bias/--no-weight-bias",
    "weight_bias",
    default=None,
    help="A new database's bias learns ham's gradient times the ham weight too, as every "
    "token does (default: yes; --no-weight-bias for the databases before it). "
    "--update keeps the file's own.",
)
@click.option("--note", default=None, help="A line saying what the database was trained on.")
@click.option(
    "--compress/--no-compress",
    default=None,
    help="gzip the file (default: when the name ends in .gz).",
)
@members_option
@seed_option
@jobs_option
def train(
    spam_paths: tuple[str, ...],
    ham_paths: tuple[str, ...],
    output: str,
    update: bool,
    epochs: int,
    min_count: int,
    drop_prefixes: tuple[str, ...],
    sparse: bool,
    merge: bool,
    weight_bias: bool | None,
    note: str | None,
    compress: bool | None,
    members: int,
    seed: int,
    jobs: int | None,
) -> None:
    """Learn token weights from spam and ham mails into a database."""
    if not spam_paths and not ham_paths:
        raise click.UsageError("give at least one --spam or --ham PATH")
    jobs = jobs or default_jobs()
    work = [(True, p) for p in spam_paths] + [(False, p) for p in ham_paths]
    total = sum(count_messages(p) for _, p in work)
    mails: list[tuple[frozenset[str], bool]] = []
    show = sys.stderr.isatty()
    # read and tokenized before any lock is taken (a big Maildir takes a while, and the
    # users' learn mails must not wait for it); in chunks, so a big Maildir's raw mails
    # are never all in memory
    with click.progressbar(length=total, label="reading", file=sys.stderr, hidden=not show) as bar:
        for is_spam, path in work:
            for chunk in _chunks(raw for _, raw in _messages((path,))):
                for tokens in tokenize_many(chunk, DEFAULT_MAX_BYTES, jobs):
                    mails.append((frozenset(tokens), is_spam))
                    bar.update(1)
    nspam = sum(1 for _, s in mails if s)
    from poste.spam.learn import train_into, update_into

    pre = tuple(drop_prefixes)
    learning = _learning(weight_bias=weight_bias)
    try:
        if update:
            # the learn mails' read-modify-write: locked, loaded as it is now on disk, saved
            # atomically, so an operator's batch and the users' learn mails never undo each
            # other; the spamfilter sees the new file before its next mail
            db, dropped = update_into(output, mails, epochs, min_count=min_count,
                                      drop_prefixes=pre, sparse=sparse, note=note,
                                      compress=compress, members=members, seed=seed,
                                      merge=merge, learning=learning)
        else:
            db = Database(learning, members=members)
            dropped = train_into(db, mails, epochs, min_count=min_count, drop_prefixes=pre,
                                 sparse=sparse, note=note, seed=seed, merge=merge)
            db.save(output, compress=compress)
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
    click.echo(
        f"trained {nspam} spam and {len(mails) - nspam} ham; {output}: {db.nspam} spam, "
        f"{db.nham} ham, {len(db)} tokens, {len(db.weights())} weighted"
        + (f" ({dropped} tokens dropped)" if dropped else ""),
        err=True,
    )


@main.command()
@db_option
@_cutoffs
@click.option("--detail", is_flag=True, help="Also print the strongest tokens.")
@jobs_option
@click.argument("files", nargs=-1, required=True, metavar="PATH...")
def classify(
    db_path: str | None,
    ham_cutoff: float,
    spam_cutoff: float,
    detail: bool,
    jobs: int | None,
    files: tuple[str, ...],
) -> None:
    """Print `yes|no|unknown SCORE NAME` for each mail at each PATH."""
    clf = Classifier(_load(db_path), _params(ham_cutoff, spam_cutoff))
    found = list(_messages(files))
    names = [name for name, _ in found]
    mails = [raw for _, raw in found]
    del found
    out = sys.stdout
    for i, (score, label, clues) in enumerate(
        classify_many(clf, mails, jobs or default_jobs(), 10 if detail else 0)
    ):
        line = f"{label} {score:.4f} {names[i]}"
        if detail:
            line += " " + " ".join(f"{t}:{p:.2f}" for t, p in clues[:10])
        out.write(line + "\n")


@main.command()
@db_option
@_cutoffs
@click.option(
    "--header-name", default=DEFAULT_HEADER, show_default=True, help="Name of the field added."
)
@click.option(
    "--detail",
    is_flag=True,
    help="Also add HEADER-NAME-Detail: with the score and strongest tokens.",
)
@jobs_option
@click.argument("mboxes", nargs=-1, type=click.Path(exists=True, dir_okay=False))
def mark(
    db_path: str | None,
    ham_cutoff: float,
    spam_cutoff: float,
    header_name: str,
    detail: bool,
    jobs: int | None,
    mboxes: tuple[str, ...],
) -> None:
    """Add the label field to a mail on stdin, or to every mail of MBOX... (to stdout).

    The field is put on top of the header; the rest of each mail is written
    byte for byte as it came.
    """
    _check_field_name(header_name)
    clf = Classifier(_load(db_path), _params(ham_cutoff, spam_cutoff))
    out = sys.stdout.buffer
    if not mboxes:
        raw = sys.stdin.buffer.read()
        from_line = b""
        if raw.startswith(b"From "):  # keep an mbox From_ line first
            cut = raw.find(b"\n") + 1 or len(raw)
            from_line, raw = raw[:cut], raw[cut:]
        r = clf.classify(raw)
        clues = r.strongest(40) if detail else []
        out.write(from_line + _fields(header_name, detail, r.label, r.score, clues, raw) + raw)
        out.flush()
        return
    stored: list[tuple[bytes, bytes]] = []
    for path in mboxes:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None
        if not data.startswith(b"From "):
            raise click.ClickException(f"{path}: not an mbox (no From_ line at the start)")
        stored.extend(split_mbox_raw(data))
    # the classifier does not care about the blank line that ends an mbox
    # entry, so only mails with quoted From_ lines are copied
    mails = [unquote_mbox(msg) if b">From " in msg else msg for _, msg in stored]
    judged = classify_many(clf, mails, jobs or default_jobs(), 40 if detail else 0)
    for (from_line, msg), (score, label, clues) in zip(stored, judged, strict=True):
        out.writelines((from_line, _fields(header_name, detail, label, score, clues, msg), msg))
    out.flush()


def _check_field_name(name: str) -> None:
    if not name or not all(33 <= ord(c) <= 126 and c != ":" for c in name):
        raise click.BadParameter(f"not a header field name: {name!r}", param_hint="--header-name")


def _fields(
    name: str, detail: bool, label: str, score: float, clues: list[tuple[str, float]], raw: bytes
) -> bytes:
    from poste.spam.model import detail_line

    eol = b"\r\n" if raw[: raw.find(b"\n") + 1].endswith(b"\r\n") else b"\n"
    text = f"{name}: {label}".encode() + eol
    if detail:
        line = detail_line(score, clues)
        text += f"{name}-Detail: {line}".encode() + eol
    return text


@main.command(name="eval")
@click.option("--spam", "spam_paths", multiple=True, required=True, metavar="PATH")
@click.option("--ham", "ham_paths", multiple=True, required=True, metavar="PATH")
@click.option("-k", "--folds", type=click.IntRange(2, 100), default=5, show_default=True)
@_cutoffs
@click.option("--sweep", is_flag=True, help="Also show caught/flagged for a range of spam cutoffs.")
@click.option(
    "--split",
    is_flag=True,
    help="Instead of k folds: train on part of each PATH and label the rest, for a random "
    "split and a time split (the newest mails by arrival) side by side.",
)
@click.option(
    "--test-fraction",
    type=click.FloatRange(0.05, 0.95),
    default=0.25,
    show_default=True,
    help="With --split: the part of each PATH that is test mail.",
)
@click.option(
    "--inner",
    is_flag=True,
    help="With --split: only the inner time split, the time split of the time split's "
    "training part (its newest part as validation; the test part is never used). "
    "The one to tune on.",
)
@click.option(
    "--time-folds",
    "time_folds",
    type=click.IntRange(2, 20),
    default=None,
    help="With --split: rolling-origin time cross-validation inside the training part "
    "(N+1 parts by arrival; fold k trains on the older k parts, labels the next). "
    "The test part is never used.",
)
@click.option(
    "--unseen-senders",
    is_flag=True,
    help="With --time-folds: each fold also trains without the older mails of the senders "
    "(From: organisational domain) it labels, so every labelled mail is from a new sender.",
)
@click.option(
    "--min-count",
    type=click.IntRange(0),
    default=0,
    help="With --time-folds: leave out tokens seen in fewer training mails (as train).",
)
@click.option(
    "--drop", "drop", multiple=True, metavar="PREFIX",
    help="With --time-folds: leave out a kind of token (as train).",
)
@click.option(
    "--ham-weight", type=click.FloatRange(0.0), default=None,
    help="With --time-folds: the learner's ham weight (default 4).",
)
@click.option(
    "--l2", type=click.FloatRange(0.0), default=None,
    help="With --time-folds: the learner's L2 (default 1).",
)
@click.option(
    "--weight-bias/--no-weight-bias", "weight_bias", default=None,
    help="With --time-folds: the bias learns ham's gradient times the ham weight too "
    "(default: as train).",
)
@click.option(
    "--shrink",
    type=click.FloatRange(0.0),
    default=0.0,
    help="With --time-folds: each weight times c/(c+SHRINK), c the mails it was seen in.",
)
@click.option(
    "--epochs",
    type=click.IntRange(1, 100),
    default=5,
    show_default=True,
    help="Passes over the training mails.",
)
@members_option
@seed_option
@jobs_option
def evaluate(
    spam_paths: tuple[str, ...],
    ham_paths: tuple[str, ...],
    folds: int,
    ham_cutoff: float,
    spam_cutoff: float,
    sweep: bool,
    split: bool,
    test_fraction: float,
    inner: bool,
    time_folds: int | None,
    unseen_senders: bool,
    min_count: int,
    drop: tuple[str, ...],
    shrink: float,
    ham_weight: float | None,
    l2: float | None,
    weight_bias: bool | None,
    epochs: int,
    members: int,
    seed: int,
    jobs: int | None,
) -> None:
    """k-fold cross-validation, or (--split) held-out random and time splits.

    k folds: confusion table, false-positive and false-negative rates.
    --split: spam caught, ham labelled spam, unknown and mails/s on the test
    part of each split.
    """
    from poste.spam.evaluate import cross_validate

    params = _params(ham_cutoff, spam_cutoff)
    j = jobs or default_jobs()
    if inner and not split:
        raise click.UsageError("--inner goes with --split")
    if time_folds and not split:
        raise click.UsageError("--time-folds goes with --split")
    if time_folds and inner:
        raise click.UsageError("--time-folds and --inner are two different splits: one of them")
    if unseen_senders and not time_folds:
        raise click.UsageError("--unseen-senders goes with --time-folds")
    if split:
        _holdout(spam_paths, ham_paths, test_fraction, params, j,
                 inner=inner, sweep=sweep, epochs=epochs, members=members, seed=seed,
                 time_folds=time_folds, min_count=min_count, drop=drop, shrink=shrink,
                 ham_weight=ham_weight, l2=l2, weight_bias=weight_bias,
                 unseen_senders=unseen_senders)
        return
    spam = list(tokenize_many([raw for _, raw in _messages(spam_paths)], params.max_bytes, j))
    ham = list(tokenize_many([raw for _, raw in _messages(ham_paths)], params.max_bytes, j))
    if len(spam) < folds or len(ham) < folds:
        raise click.ClickException(f"need at least {folds} spam and {folds} ham mails")
    report = cross_validate(spam, ham, folds, params, epochs, members=members, seed=seed)
    click.echo("\n".join(report.lines()))
    if sweep:
        click.echo("")
        cuts = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]
        click.echo("\n".join(report.sweep(cuts)))


def _holdout(
    spam_paths: tuple[str, ...],
    ham_paths: tuple[str, ...],
    fraction: float,
    params: Params,
    jobs: int,
    *,
    inner: bool,
    sweep: bool,
    epochs: int,
    members: int,
    seed: int,
    time_folds: int | None = None,
    min_count: int = 0,
    drop: tuple[str, ...] = (),
    shrink: float = 0.0,
    ham_weight: float | None = None,
    l2: float | None = None,
    weight_bias: bool | None = None,
    unseen_senders: bool = False,
) -> None:
    from poste.spam.corpus import mail_time
    from poste.spam.evaluate import (
        Folder,
        holdout,
        holdout_lines,
        rolling,
        rolling_lines,
        sweep_lines,
    )

    folders = []
    for is_spam, path in [(True, p) for p in spam_paths] + [(False, p) for p in ham_paths]:
        raws = [raw for _, raw in _messages((path,))]
        if len(raws) < 2:
            raise click.ClickException(f"{path}: need at least 2 mails to split")
        name = path.rstrip("/").rpartition(":")[2].rpartition("/")[2] or path
        tokens = list(tokenize_many(raws, params.max_bytes, jobs))
        folders.append(Folder(name, is_spam, raws, tokens, [mail_time(r) for r in raws]))
    if time_folds:
        learning = _learning(ham_weight=ham_weight, l2=l2, weight_bias=weight_bias)
        folds = rolling(
            folders, fraction, time_folds, params, epochs, members=members, seed=seed,
            min_count=min_count, drop=drop, shrink=shrink, learning=learning,
            unseen_senders=unseen_senders,
        )
        lines = [
            f"rolling time folds inside the training part ({1 - fraction:.0%} of each PATH, "
            f"cut by arrival into {time_folds + 1}); {members} member(s), seed {seed}, "
            f"{epochs} epochs, min-count {min_count}, drop {' '.join(drop) or '-'}, "
            f"shrink {shrink:g}, ham weight {learning.ham_weight:g}, l2 {learning.l2:g}, "
            f"bias {'weighted' if learning.weight_bias else 'unweighted'}"
            + ("; each fold without the older mail of the senders it labels" if unseen_senders
               else ""),
            "",
            *rolling_lines(folds),
        ]
        if sweep:
            lines += ["", *sweep_lines(folds[-1], params.ham_cutoff)]
        click.echo("\n".join(lines))
        return
    reports = holdout(
        folders, fraction, params, epochs, inner=inner, members=members, seed=seed
    )
    lines = holdout_lines(reports, fraction)
    lines[0] += f"; {members} member(s), seed {seed}, {epochs} epochs"
    if sweep:
        for r in reports:
            lines += ["", *sweep_lines(r, params.ham_cutoff)]
    click.echo("\n".join(lines))
