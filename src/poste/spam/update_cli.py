"""`poste spam train --update`: an operator teaches the running filter's database more mail.

The mails are read and tokenized first, outside the lock (a big Maildir takes
a while, and learn mails arriving meanwhile must not wait for it); then the
database is locked, loaded as it is now on disk (with whatever the users'
learn mails taught it since), trained for `--epochs` passes over the new
mails only, and written atomically (`poste.spam.learn.update_into`).  The
spamfilter notices the new file before its next mail: no SIGHUP needed.
"""

from __future__ import annotations

import sys

import click

from poste.spam.batch import default_jobs, tokenize_many
from poste.spam.corpus import CorpusError, count_messages, iter_messages
from poste.spam.database import DatabaseError
from poste.spam.learn import update_into
from poste.spam.mime import DEFAULT_MAX_BYTES


def train_update(
    spam_paths: tuple[str, ...],
    ham_paths: tuple[str, ...],
    output: str,
    epochs: int,
    min_count: int,
    drop_prefixes: tuple[str, ...],
    sparse: bool,
    note: str | None,
    compress: bool | None,
    jobs: int | None,
) -> None:
    jobs = jobs or default_jobs()
    work = [(True, p) for p in spam_paths] + [(False, p) for p in ham_paths]
    mails: list[tuple[frozenset[str], bool]] = []
    try:
        total = sum(count_messages(p) for _, p in work)
        with click.progressbar(length=total, label="reading", file=sys.stderr,
                               hidden=not sys.stderr.isatty()) as bar:
            for is_spam, path in work:
                chunk: list[bytes] = []
                for _, raw in iter_messages(path):
                    chunk.append(raw)
                    if len(chunk) >= 4000:
                        mails += [(frozenset(t), is_spam)
                                  for t in tokenize_many(chunk, DEFAULT_MAX_BYTES, jobs)]
                        bar.update(len(chunk))
                        chunk = []
                mails += [(frozenset(t), is_spam)
                          for t in tokenize_many(chunk, DEFAULT_MAX_BYTES, jobs)]
                bar.update(len(chunk))
    except CorpusError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        db, dropped = update_into(output, mails, epochs, min_count=min_count,
                                  drop_prefixes=drop_prefixes, sparse=sparse, note=note,
                                  compress=compress)
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot update {output}: {exc.strerror or exc}") from None
    nspam = sum(1 for _, s in mails if s)
    click.echo(
        f"trained {nspam} spam and {len(mails) - nspam} ham; {output}: {db.nspam} spam, "
        f"{db.nham} ham, {len(db)} tokens, {len(db.weights())} weighted"
        + (f" ({dropped} tokens dropped)" if dropped else ""),
        err=True,
    )
