"""Log lines for operators: plain text or one JSON object per line.

The SMTP core already writes one line per mail per service, starting with
the queue id (`<ID> <service> from=<a> to=<b> size=N: 250 ...`).  The JSON
formatter keeps that line as `msg` and lifts what a log pipeline filters on
into fields: `queue_id`, `service`, `from`, `to`, `size`, `code`, and any
other `key=value` pair of the line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from poste.smtp import listen

_QUEUE_ID = re.compile(r"^(?P<qid>[0-9A-F]{12,20})\b")
_SERVICES = ("verifier", "spamfilter", "relay", "submission", "signer", "forward")
_PAIR = re.compile(r"\b(?P<k>[a-z][a-z0-9_-]*)=(?P<v><[^>]*>(?:,<[^>]*>)*|\S+)")
_REPLY = re.compile(r":\s(?P<code>[245]\d\d)[ -]")

PLAIN_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x9b]")


def escape(text: str) -> str:
    """Control characters as \\xNN: what a peer sends must not drive an admin's terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class PlainFormatter(logging.Formatter):
    """The plain format, with the message escaped (a traceback keeps its own lines)."""

    _second = -1
    _stamp = ""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """logging's own stamp, its strftime made once a second (four lines per sent mail:
        1-2% of `poste up`'s CPU)."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"  # logging's default_msec_format


def _fields(message: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = _QUEUE_ID.match(message)
    if m:
        out["queue_id"] = m.group("qid")
        rest = message[m.end() :].split(None, 1)
        if rest and rest[0].rstrip(":") in _SERVICES:
            out["service"] = rest[0].rstrip(":")
    for pm in _PAIR.finditer(message):
        key, value = pm.group("k"), pm.group("v").rstrip(",;:")
        if key in out or key in ("queue_id", "msg"):
            continue
        if value.startswith("<"):
            addrs = [a.strip("<>") for a in value.split(",")]
            out[key] = addrs if key == "to" else addrs[0]
        elif value.isdigit():
            out[key] = int(value)
        else:
            out[key] = value
    r = _REPLY.search(message)
    if r:
        out["code"] = int(r.group("code"))
    return out


class JSONFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg and the fields of the line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        obj: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        for key, value in _fields(message).items():
            obj.setdefault(key, value)
        worker = getattr(record, "worker", None)
        if worker is not None:
            obj["worker"] = worker
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


class _Worker(logging.Filter):
    """The JSON lines of a worker carry `"worker": K`."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.k
        return True


def setup(log_format: str = "plain", verbose: int = 0) -> None:
    """Configure the root logger once (replacing handlers set before)."""
    level = logging.DEBUG if verbose > 1 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    found = listen.worker()
    worker = str(found[0]) if found else ""
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
        if worker.isdigit():
            handler.addFilter(_Worker(int(worker)))
    elif worker.isdigit():  # which worker process said it: `poste.relay[w1] INFO ...`
        handler.setFormatter(PlainFormatter(PLAIN_FORMAT.replace(
            "%(name)s", f"%(name)s[w{int(worker)}]")))
    else:
        handler.setFormatter(PlainFormatter(PLAIN_FORMAT))
    # The logging HOWTO's "Optimization": no format of ours names a source file, line,
    # function, thread or process, so no record looks them up (findCaller walks the
    # stack on every line: ~1% of `poste up`'s CPU at 5 KB, four lines per mail).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    if verbose < 2:
        # aiosmtpd's chatter, including a deprecation warning on every successful AUTH.
        logging.getLogger("mail.log").setLevel(logging.ERROR)
