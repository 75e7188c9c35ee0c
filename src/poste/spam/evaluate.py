"""k-fold cross-validation: how well would a database trained on these mails do?

Each mail is tokenized once.  A database is trained on everything, then for
each fold the fold's mails are untrained, scored, and trained back: k
classifiers for the price of one training pass.  Used to choose cutoffs on
training data only, never on the mails a filter will be judged on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from poste.spam.database import Database
from poste.spam.model import HAM, SPAM, UNKNOWN, Classifier, Params


@dataclass
class Report:
    k: int
    # (truth, label) -> count; truth is "spam" or "ham"
    table: dict[tuple[str, str], int] = field(default_factory=dict)
    # (truth, score) of every mail, for cutoff sweeps
    scores: list[tuple[str, float]] = field(default_factory=list)

    def count(self, truth: str, label: str) -> int:
        return self.table.get((truth, label), 0)

    @property
    def nspam(self) -> int:
        return sum(v for (t, _), v in self.table.items() if t == "spam")

    @property
    def nham(self) -> int:
        return sum(v for (t, _), v in self.table.items() if t == "ham")

    def lines(self) -> list[str]:
        out = [
            f"{self.k}-fold cross-validation, {self.nspam} spam, {self.nham} ham",
            "",
            f"{'truth':<8}{'yes':>8}{'unknown':>9}{'no':>8}",
        ]
        for truth in ("spam", "ham"):
            out.append(
                f"{truth:<8}{self.count(truth, SPAM):>8}"
                f"{self.count(truth, UNKNOWN):>9}{self.count(truth, HAM):>8}"
            )
        fp = self.count("ham", SPAM)
        fn = self.count("spam", HAM)
        out += [
            "",
            f"false positives (ham labelled yes): {fp} ({_pct(fp, self.nham)})",
            f"false negatives (spam labelled no): {fn} ({_pct(fn, self.nspam)})",
            f"unknown: {self.count('spam', UNKNOWN) + self.count('ham', UNKNOWN)}",
        ]
        return out

    def sweep(self, cutoffs: list[float]) -> list[str]:
        """Spam caught and ham flagged for several spam cutoffs."""
        out = [f"{'spam-cutoff':>12}{'spam caught':>13}{'ham flagged':>13}"]
        for c in cutoffs:
            caught = sum(1 for t, s in self.scores if t == "spam" and s >= c)
            fp = sum(1 for t, s in self.scores if t == "ham" and s >= c)
            out.append(f"{c:>12.3f}{caught:>13}{fp:>13}")
        return out


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.2f}%" if total else "n/a"


def cross_validate(
    spam: list[set[str]], ham: list[set[str]], k: int, params: Params | None = None
) -> Report:
    if k < 2:
        raise ValueError("k must be at least 2")
    db = Database()
    for tokens in spam:
        db.train(tokens, True)
    for tokens in ham:
        db.train(tokens, False)
    clf = Classifier(db, params)
    report = Report(k)
    for fold in range(k):
        held = [(True, t) for i, t in enumerate(spam) if i % k == fold]
        held += [(False, t) for i, t in enumerate(ham) if i % k == fold]
        for is_spam, tokens in held:
            db.untrain(tokens, is_spam)
        for is_spam, tokens in held:
            r = clf.score_tokens(tokens)
            truth = "spam" if is_spam else "ham"
            report.table[(truth, r.label)] = report.table.get((truth, r.label), 0) + 1
            report.scores.append((truth, r.score))
        for is_spam, tokens in held:
            db.train(tokens, is_spam)
    return report
