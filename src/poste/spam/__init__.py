"""poste's Bayesian spam classifier, usable as a library.

from poste.spam import Classifier, load_db
clf = Classifier(load_db(None))          # the database shipped with poste
result = clf.classify(raw_bytes)         # .label "yes"|"no"|"unknown", .score
"""

from __future__ import annotations

from pathlib import Path

from poste.spam.database import Database, DatabaseError
from poste.spam.model import HAM, SPAM, UNKNOWN, Classifier, Params, Result
from poste.spam.tokenizer import tokenize

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
    "default_db_path",
    "load_db",
    "tokenize",
]


def default_db_path() -> Path:
    """The database shipped inside the package (token counts only)."""
    return Path(__file__).resolve().parent.parent / "data" / DEFAULT_DB_NAME


def load_db(path: str | None) -> Database:
    """The database at `path`, or the shipped default when path is None."""
    return Database.load(path if path is not None else default_db_path())
