"""The plain log format: the same stamp as logging's own, though made once a second."""

from __future__ import annotations

import logging

from poste.runtime.logs import PLAIN_FORMAT, PlainFormatter


def test_plain_stamp_is_loggings_own_across_seconds() -> None:
    ours, theirs = PlainFormatter(PLAIN_FORMAT), logging.Formatter(PLAIN_FORMAT)
    for created in (1796292159.001, 1796292159.999, 1796292160.0, 1796292160.5, 1796292159.2):
        record = logging.LogRecord("poste.x", logging.INFO, "p", 1, "a \x1b line", (), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == theirs.format(record).replace("\x1b", "\\x1b")
