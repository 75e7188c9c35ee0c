"""poste's spam classifier (logistic regression learnt with FTRL), usable as a library.

from poste.spam import Classifier, load_db
clf = Classifier(load_db(None))          # the database shipped with poste
result = clf.classify(raw_bytes)         # .label "yes"|"no"|"unknown", .score
"""

from __future__ import annotations

import os

from poste.spam.database import Database, DatabaseError
from poste.spam.model import HAM, SPAM, UNKNOWN, Classifier, Params, Result
from poste.spam.tokenizer import tokenize

# not `from typing import TYPE_CHECKING`: typing costs a batch command ~5 ms of start-up
TYPE_CHECKING = False

DEFAULT_DB_NAME = "spam-default.db.gz"

__all__ = [
    "HAM",
    "SPAM",
    "UNKNOWN",
    "Classifier",
    "Database",
    "DatabaseError",
    "Params",
    "Result",
    "default_db_file",
    "default_db_path",
    "load_db",
    "tokenize",
]


if TYPE_CHECKING:
    from pathlib import Path


def default_db_file() -> str:
    """The database shipped inside the package, as a string path.

    (os.path, not pathlib: `poste spam mark` does not import pathlib at all.)
    """
    here = os.path.dirname(os.path.realpath(__file__))
    return os.path.join(os.path.dirname(here), "data", DEFAULT_DB_NAME)


def default_db_path() -> Path:
    """The database shipped inside the package (token counts only)."""
    from pathlib import Path

    return Path(default_db_file())


def load_db(path: str | None) -> Database:
    """The database at `path`, or the shipped default when path is None."""
    return Database.load(path if path is not None else default_db_file())
