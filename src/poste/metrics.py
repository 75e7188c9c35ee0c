"""Prometheus metrics shared by every service (one registry per process).

Counters are labelled by service (the stage name), so `poste up` and the
separate services expose the same series.
"""

from __future__ import annotations

from typing import Any

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


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def labelled(metric: Counter, *values: str) -> Any:
    """`metric.labels(*values)`, looked up once: prometheus_client checks and locks on
    every `labels` call, several per mail (issue 16: 1-2% of `poste up`'s CPU).  For
    module-level metrics with few label values (services, outcomes) only."""
    key = (id(metric), values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def outcome(code: int) -> str:
    if 200 <= code < 300:
        return "accepted"
    if 400 <= code < 500:
        return "deferred"
    return "rejected"


# --- Added for operations (poste.stack): results the services can count ----------
# The verifier and relay increment these (or `poste up` does it for
# them from the outside); see docs/deploy.md for the series and their labels.
AUTH_RESULTS = Counter(
    "poste_auth_results",
    "SPF, DKIM, ARC and DMARC results at the verifier (method: spf, dkim, arc, dmarc).",
    ["method", "result"],
)
DELIVERIES = Counter(
    "poste_deliveries",
    "Relay delivery attempts per recipient (delivered, deferred, bounced).",
    ["result"],
)
QUEUED = Counter(
    "poste_queued",
    "Messages written to the relay's spool.",
)
FORWARD_PLANS = Counter(
    "poste_forward_plans",
    "The relay's plan for each forwarded mail (plan: unchanged, rewrite; reason: why, "
    "e.g. aligned-dkim, no-aligned-dkim, policy-none; services/relay/from_rewrite.py).",
    ["plan", "reason"],
)
