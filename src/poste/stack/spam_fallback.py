"""A spamfilter stage for `poste up` in a tree without `poste.services.spamfilter`.

It does what design.md asks of the spamfilter: classify off the event loop
and prepend `X-Spamtacus: yes|no|unknown`.  `poste up` uses the spamfilter
service's own stage whenever that module is there (see build.py).
"""

from __future__ import annotations

import asyncio
import logging

from poste.smtp.stage import Envelope, Stage, Verdict

log = logging.getLogger("poste.spamfilter")


class FallbackSpamStage(Stage):
    name = "spamfilter"

    def __init__(
        self,
        db_path: str | None,
        header: str = "X-Spamtacus",
        detail: bool = False,
        ham_cutoff: float | None = None,
        spam_cutoff: float | None = None,
    ) -> None:
        from poste.spam import Classifier, Database, Params, default_db_path, load_db

        params = Params()
        if ham_cutoff is not None or spam_cutoff is not None:
            params = Params(
                ham_cutoff=params.ham_cutoff if ham_cutoff is None else ham_cutoff,
                spam_cutoff=params.spam_cutoff if spam_cutoff is None else spam_cutoff,
            )
        if db_path is None and not default_db_path().exists():
            log.warning("no spam database: every mail is labelled unknown")
            db = Database()
        else:
            db = load_db(db_path)
        self.db_path = db_path
        self.classifier = Classifier(db, params)
        self.header = header
        self.detail = detail

    async def on_data(self, env: Envelope, data: bytes) -> Verdict:
        result = await asyncio.to_thread(self.classifier.classify, data)
        log.info("%s spam=%s score=%.4f", env.queue_id, result.label, result.score)
        fields = f"{self.header}: {result.label}\r\n"
        if self.detail:
            fields += f"{self.header}-Detail: {result.detail()}\r\n"
        return Verdict(prepend=fields.encode("ascii", "replace"))
