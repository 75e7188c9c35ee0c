"""Prometheus metrics shared by every service (one registry per process).

Counters are labelled by service (the stage name), so `poste up` and the
separate services expose the same series.
"""

from __future__ import annotations

from prometheus_client import Counter

MAILS = Counter(
    "poste_mails",
    "Mails by service and outcome at end of DATA (accepted, rejected, deferred).",
    ["service", "result"],
)
RECIPIENTS = Counter(
    "poste_recipients",
    "Recipients by service and outcome at RCPT (accepted, rejected, deferred).",
    ["service", "result"],
)


def outcome(code: int) -> str:
    if 200 <= code < 300:
        return "accepted"
    if 400 <= code < 500:
        return "deferred"
    return "rejected"
