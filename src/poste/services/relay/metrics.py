"""The spool as metrics: poste_spool_messages and poste_spool_oldest_age_seconds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from poste.services.relay.audit import OVERDUE_SLACK, is_overdue
from poste.services.relay.spool import Spool, SpoolError

log = logging.getLogger("poste")
_lock = threading.Lock()


class SpoolCollector(Collector):
    """Queue size and age of the oldest message, read from the spool folders per scrape.

    One collector per process: the registry refuses two with the same series.
    A process runs one relay, so there is one folder; a process that builds
    several (tests) gets their sum, and a folder that is gone counts nothing.
    """

    def __init__(self, *spool_dirs: str | Path) -> None:
        self.spool_dirs: list[Path] = [Path(d) for d in spool_dirs]

    def collect(self) -> Iterator[GaugeMetricFamily]:

        size = GaugeMetricFamily(
            "poste_spool_messages", "Messages in the relay's spool (read at scrape time)."
        )
        age = GaugeMetricFamily(
            "poste_spool_oldest_age_seconds",
            "Age of the oldest message in the relay's spool (0 when empty).",
        )
        late = GaugeMetricFamily(
            "poste_spool_overdue_messages",
            f"Messages whose next attempt is more than {OVERDUE_SLACK:.0f} s past: "
            "acknowledged mail the scheduler is not moving ('poste queue check').",
        )
        count, oldest, stalled = 0, 0.0, 0
        now = time.time()
        for folder in list(self.spool_dirs):
            try:
                spool = Spool(folder, create=False)
                for entry in spool.entries():
                    count += 1
                    oldest = max(oldest, now - entry.created)
                    if is_overdue(entry, now):
                        stalled += 1
            except (OSError, SpoolError, ValueError):
                log.debug("spool %s unreadable for metrics", folder, exc_info=True)
        size.add_metric([], count)
        age.add_metric([], oldest)
        late.add_metric([], stalled)
        yield size
        yield age
        yield late


_collector: SpoolCollector | None = None


def watch_spool(spool_dir: str | Path) -> None:
    """Serve the queue gauges of this spool (idempotent per process and folder)."""
    global _collector
    folder = Path(spool_dir).resolve()
    with _lock:
        if _collector is None:
            _collector = SpoolCollector()
            REGISTRY.register(_collector)
        if folder not in _collector.spool_dirs:
            _collector.spool_dirs.append(folder)
