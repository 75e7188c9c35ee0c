"""`poste spamfilter`: label every mail `X-Spamtacus: yes|no|unknown` and pass it on.

It labels; it never drops and never refuses.  Classification of a big mail
runs in a worker thread so the event loop keeps serving other sessions
meanwhile (a small one is judged on the loop: cheaper than the hand-off), and its work is bounded (see poste.spam.mime).  A mail the
classifier cannot make sense of is labelled from its raw words (or, if the
classifier itself fails, `unknown`) and passed on byte-identical below the
prepended fields.  A new --db file (written by the relay for a learn mail, or
by `poste spam train --update`) is noticed before the next mail and swapped
in; SIGHUP reloads it too.  So a filter is retrained without a restart.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter

from poste.runtime.hostport import parse_hostport
from poste.runtime.run import Job, Parts
from poste.runtime.settings import ConfigError, Values
from poste.runtime.tls import tls_files
from poste.smtp.client import HOP_KEEP, SMTPHop
from poste.smtp.message import Message
from poste.smtp.server import SMTPService
from poste.smtp.stage import Envelope, Stage, Verdict
from poste.spam import UNKNOWN, default_db_file
from poste.spam.database import Database, DatabaseError
from poste.spam.learn import stamp
from poste.spam.model import Classifier, Params

log = logging.getLogger("poste.spamfilter")

SCAN_BYTES = 1024 * 1024  # how much of a mail the classifier reads
# A mail up to this size is judged on the event loop: a few hundred microseconds of
# tokens cost less than the trip to a thread and back (issue 16: the hand-offs were
# 11% of `poste up`'s CPU at 5 KB), and under the GIL the thread would not have run
# beside the loop anyway.  A bigger one still goes to a thread, so the loop is never
# held for long.
INLINE_BYTES = 32 * 1024

LABELS = Counter("poste_spam_labels", "Mails labelled by the spamfilter.", ["label"])

DEFAULT_HEADER = "X-Spamtacus"


def check_field_name(name: str) -> str:
    if not name or not all(33 <= ord(c) <= 126 and c != ":" for c in name):
        raise ConfigError("header-name", f"not a header field name: {name!r}")
    return name


class SpamfilterStage(Stage):
    """Accepts everything; at the end of DATA prepends the label (and the detail)."""

    name = "spamfilter"

    def __init__(
        self,
        classifier: Classifier,
        header_name: str = DEFAULT_HEADER,
        detail: bool = False,
        db_path: str | None = None,
    ) -> None:
        self.classifier = classifier
        self.header_name = header_name
        self.detail = detail
        self.db_path = db_path
        # the file as last loaded: a new one (learn mail, `spam train --update`) is
        # loaded before the next mail (follow)
        self._stamp = stamp(db_path) if db_path is not None else None
        self._following = asyncio.Lock()
        # build the f(w) table now, not on the first mail
        classifier.prepare()

    def judge(self, data: bytes) -> tuple[str, float, str]:
        """(label, score, detail line); runs in a worker thread; never raises."""
        clf = self.classifier
        try:
            result = clf.classify(data)
        except Exception:  # a classifier bug must not cost the mail
            log.exception("classifier failed; labelling unknown")
            return UNKNOWN, 0.5, "score=0.5000; classifier error"
        return result.label, result.score, result.detail() if self.detail else ""

    def fields(self, label: str, detail: str) -> bytes:
        text = f"{self.header_name}: {label}\r\n"
        if self.detail and detail:
            # fold at the "; " between score, spam clues and ham clues
            text += f"{self.header_name}-Detail: " + ";\r\n\t".join(detail.split("; ")) + "\r\n"
        return text.encode("ascii", "replace")

    async def on_data(self, env: Envelope, message: Message) -> Verdict:
        # The first SCAN_BYTES decide: what a spammer puts past a megabyte no one reads
        # either, and a 24 MB attachment is not worth 24 MB of tokens (spamc stops at 500 KB).
        head = message.head(SCAN_BYTES)
        await self.follow()
        if len(head) <= INLINE_BYTES:
            label, score, detail = self.judge(head)
        else:
            label, score, detail = await asyncio.to_thread(self.judge, head)
        LABELS.labels(label).inc()
        # the label goes into the core's one line for this mail (smtp/chain.py)
        return Verdict(prepend=self.fields(label, detail), note=f"spam={label} score={score:.4f}")

    async def follow(self) -> None:
        """Swap in a new --db before this mail is judged, if the file was replaced.

        One stat per mail (microseconds, on the loop); the load runs in a thread
        while other mails are judged by the old model, and the swap is one
        assignment between two mails.  The relay writes the file atomically
        (rename) and answers a learn mail only after that, so the next mail
        after its 250 is judged by what it learnt.
        """
        if self.db_path is None or stamp(self.db_path) == self._stamp:
            return
        async with self._following:  # one load for the mails arriving meanwhile
            if stamp(self.db_path) != self._stamp:
                await self.reload()

    async def reload(self) -> None:
        """Load --db again (after retraining); a bad file keeps the old database."""
        path = self.db_path
        if path is None:
            return
        # taken before the load: a file replaced during it is loaded again next time,
        # a damaged one is not tried again for every mail
        self._stamp = stamp(path)
        try:
            db = await asyncio.to_thread(Database.load, path)
            clf = Classifier(db, self.classifier.params)
            await asyncio.to_thread(clf.prepare)
        except DatabaseError as exc:
            log.error("reload of %s failed, keeping the old database: %s", path, exc)
            return
        self.classifier = clf
        log.info("reloaded %s: %d spam, %d ham, %d tokens", path, db.nspam, db.nham, len(db))


def build_stage(
    db: str | None,
    header_name: str = DEFAULT_HEADER,
    detail: bool = False,
    ham_cutoff: float = Params.ham_cutoff,
    spam_cutoff: float = Params.spam_cutoff,
) -> SpamfilterStage:
    """Check the settings and build the stage, for `poste spamfilter` and `poste up` alike.

    Bad input raises a ConfigError naming the setting.  The database is loaded and its table built here, so
    a damaged file stops the start, not the first mail.
    """
    check_field_name(header_name)
    for value, key in ((ham_cutoff, "ham-cutoff"), (spam_cutoff, "spam-cutoff")):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(key, f"{value} is not between 0 and 1")
    if ham_cutoff > spam_cutoff:
        raise ConfigError("ham-cutoff", f"{ham_cutoff} must not be above the spam cutoff {spam_cutoff}")
    try:
        database = Database.load(db if db is not None else default_db_file())
    except DatabaseError as exc:
        raise ConfigError("db", str(exc)) from None
    classifier = Classifier(database, Params(ham_cutoff=ham_cutoff, spam_cutoff=spam_cutoff))
    return SpamfilterStage(classifier, header_name, detail, db)


def stage(values: Values) -> SpamfilterStage:
    return build_stage(
        values["db"], values["header-name"], bool(values["detail"]),
        float(values["ham-cutoff"]), float(values["spam-cutoff"]),
    )


def build(values: Values) -> Parts:
    """`poste spamfilter`: the stage before the next hop; SIGHUP reloads --db (and the
    certificate)."""
    host, port = parse_hostport(values["listen"], 25, "listen")
    dest_host, dest_port = parse_hostport(values["destination"], 25, "destination")
    tls = tls_files(values)
    st = stage(values)
    service = SMTPService(
        st, SMTPHop(dest_host, dest_port, helo=values["hostname"], keep=HOP_KEEP),
        host=host, port=port,
        hostname=values["hostname"], tls_context=tls.ctx if tls else None,
    )
    reloads: list[tuple[str, Job]] = [("spam database", st.reload)]
    reloads += [("certificate", tls.reload)] if tls else []
    return Parts([service], reloads=reloads)
