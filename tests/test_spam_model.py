"""The model labels what it was taught, and the database file keeps it exactly."""

from __future__ import annotations

import gzip
import json
import random
import struct
from pathlib import Path

import pytest

from poste.spam import Classifier, Database, DatabaseError, Params, load_db
from poste.spam.database import MAGIC, VERSION
from poste.spam.model import chi2q
from poste.spam.tokenizer import tokenize
from support.spamkit import corpus, hammy, mail, small_db, spammy


def test_trained_model_labels_spam_yes_and_ham_no() -> None:
    clf = Classifier(small_db())
    rng = random.Random(99)  # mails never seen in training
    for _ in range(10):
        assert clf.classify(spammy(rng)).label == "yes"
        assert clf.classify(hammy(rng)).label == "no"


def test_mail_with_no_known_token_is_unknown_at_one_half() -> None:
    r = Classifier(small_db()).classify(b"Subject: zzqx\r\n\r\nqwertyuiop asdfghjkl")
    assert r.score == 0.5
    assert r.label == "unknown"


def test_mixed_evidence_lands_in_the_unknown_band() -> None:
    rng = random.Random(5)
    clf = Classifier(small_db())
    spam_body = spammy(rng).split(b"\r\n\r\n", 1)[1]
    ham_body = hammy(rng).split(b"\r\n\r\n", 1)[1]
    r = clf.classify(b"Subject: hello\r\n\r\n" + spam_body + b" " + ham_body)
    assert 0.2 < r.score < 0.99
    assert r.label == "unknown"


def test_cutoffs_are_configurable() -> None:
    db = small_db()
    raw = mail("hello", "meeting money")
    score = Classifier(db).classify(raw).score
    assert Classifier(db, Params(ham_cutoff=0.0, spam_cutoff=0.0)).classify(raw).label == "yes"
    assert Classifier(db, Params(ham_cutoff=1.0, spam_cutoff=1.0)).classify(raw).label == "no"
    mid = Classifier(db, Params(ham_cutoff=score / 2, spam_cutoff=(1 + score) / 2))
    assert mid.classify(raw).label == "unknown"


def test_detail_names_the_strongest_tokens() -> None:
    r = Classifier(small_db()).classify(spammy(random.Random(3)))
    line = r.detail()
    assert line.startswith("score=")
    assert "spam: " in line
    top = r.strongest(3)
    assert top[0][1] >= top[-1][1] or abs(top[0][1] - 0.5) >= abs(top[-1][1] - 0.5)


def test_chi2q_bounds() -> None:
    assert chi2q(0.0, 10) == pytest.approx(1.0)
    assert chi2q(1000.0, 10) < 1e-100
    assert 0.0 <= chi2q(20.0, 20) <= 1.0


def test_save_and_load_give_identical_scores(tmp_path: Path) -> None:
    db = small_db()
    spam, ham = corpus(seed=11, count=15)
    before = [Classifier(db).classify(raw).score for raw in spam + ham]
    for name in ("plain.db", "packed.db.gz"):
        db.save(tmp_path / name)
        again = Database.load(tmp_path / name)
        assert again.counts == db.counts
        assert (again.nspam, again.nham) == (db.nspam, db.nham)
        after = [Classifier(again).classify(raw).score for raw in spam + ham]
        assert after == before
    assert gzip.decompress((tmp_path / "packed.db.gz").read_bytes())[:8] == MAGIC
    # no temporary file is left behind by the atomic write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed.db.gz", "plain.db"]


def test_incremental_train_and_untrain_are_exact() -> None:
    db = small_db()
    snapshot = dict(db.counts), db.nspam, db.nham
    extra = spammy(random.Random(42))
    clf = Classifier(db)
    base = clf.classify(extra).score
    clf.train(extra, True)
    assert db.nspam == snapshot[1] + 1
    assert clf.classify(extra).score >= base
    clf.untrain(extra, True)
    assert (db.counts, db.nspam, db.nham) == snapshot
    assert clf.classify(extra).score == base


def test_file_format_header(tmp_path: Path) -> None:
    db = small_db()
    db.note = "synthetic"
    db.save(tmp_path / "x.db")
    data = (tmp_path / "x.db").read_bytes()
    assert data[:8] == b"POSTESPM"
    assert struct.unpack_from("<I", data, 8)[0] == VERSION == 2
    assert Database.load(tmp_path / "x.db").note == "synthetic"


def _version1_bytes(db: Database) -> bytes:
    """The same counts in the version 1 layout (sorted tokens, two count columns)."""
    tokens = sorted(db.counts)
    header = json.dumps(
        {"nspam": db.nspam, "nham": db.nham, "tokens": len(tokens), "note": db.note}
    ).encode()
    blob = "\n".join(tokens).encode()
    return b"".join(
        [
            MAGIC,
            struct.pack("<II", 1, len(header)),
            header,
            struct.pack("<I", len(blob)),
            blob,
            struct.pack(f"<{len(tokens)}I", *(db.counts[t][0] for t in tokens)),
            struct.pack(f"<{len(tokens)}I", *(db.counts[t][1] for t in tokens)),
        ]
    )


def test_version_1_files_still_load_with_the_same_scores(tmp_path: Path) -> None:
    db = small_db()
    db.note = "old"
    (tmp_path / "v1.db").write_bytes(_version1_bytes(db))
    old = Database.load(tmp_path / "v1.db")
    assert old.counts == db.counts
    assert (old.nspam, old.nham, old.note) == (db.nspam, db.nham, "old")
    spam, ham = corpus(seed=12, count=10)
    assert [Classifier(old).classify(r).score for r in spam + ham] == [
        Classifier(db).classify(r).score for r in spam + ham
    ]
    # rewritten, it becomes version 2 with the same counts
    old.save(tmp_path / "v2.db")
    assert struct.unpack_from("<I", (tmp_path / "v2.db").read_bytes(), 8)[0] == 2
    assert Database.load(tmp_path / "v2.db").counts == db.counts


def test_tokens_are_grouped_by_counts_most_seen_first(tmp_path: Path) -> None:
    db = Database()
    db.counts = {"rare": (1, 0), "common": (5, 7), "other": (0, 1), "twin": (5, 7)}
    db.save(tmp_path / "x.db")
    again = Database.load(tmp_path / "x.db")
    groups = again.groups()
    assert groups is not None
    tokens, pairs, sizes = groups
    assert tokens == ["common", "twin", "other", "rare"]
    assert pairs == [(5, 7), (0, 1), (1, 0)]
    assert sizes == [2, 1, 1]
    assert again.counts == db.counts
    assert again.groups() is None  # counts built: changes go there from now on


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a database",
        MAGIC + b"\x03\x00\x00\x00",
        MAGIC + b"\x01\x00\x00\x00\xff\xff",
        MAGIC + b"\x02\x00\x00\x00\xff\xff",
        b"\x1f\x8b garbage",
    ],
)
def test_damaged_files_raise_database_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.db"
    path.write_bytes(content)
    with pytest.raises(DatabaseError):
        Database.load(path)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    small_db().save(tmp_path / "x.db")
    data = (tmp_path / "x.db").read_bytes()
    (tmp_path / "x.db").write_bytes(data[:-3])
    with pytest.raises(DatabaseError):
        Database.load(tmp_path / "x.db")


def test_hundred_thousand_token_database_round_trips(tmp_path: Path) -> None:
    db = Database()
    rng = random.Random(0)
    db.counts = {
        f"tok{i}:{rng.random():.6f}": (rng.randrange(50), rng.randrange(1, 50))
        for i in range(100_000)
    }
    db.nspam, db.nham = 500, 2500
    db.save(tmp_path / "big.db")
    again = Database.load(tmp_path / "big.db")
    assert len(again) == 100_000
    assert again.counts == db.counts


def test_prune_and_drop_prefixes() -> None:
    db = Database()
    db.train({"common", "rare", "received:host.example"}, True)
    db.train({"common", "received:host.example"}, False)
    assert db.prune(2) == 1
    assert "rare" not in db.counts
    assert db.drop_prefixes(["received:"]) == 1
    assert set(db.counts) == {"common"}


def test_shipped_default_database_labels_without_training() -> None:
    db = load_db(None)
    assert db.nspam > 100 and db.nham > 100
    assert not any(t.startswith(("received:", "from:addr:")) for t in db.counts)
    clf = Classifier(db)
    spam = mail(
        "Make MONEY fast!!! Limited offer",
        "Dear friend, you have been selected to receive a FREE offer. Earn $5000 per week "
        "from home! Click here http://www.make-money-fast.biz/offer to claim your prize now. "
        "To be removed from our mailing list reply with REMOVE in the subject.\n",
        sender="Best Offers <offers@cheap-deals.biz>",
        extra="Content-Type: text/html; charset=iso-8859-1",
    )
    ham = mail(
        "Re: patch for the build failure",
        "Hi Bob, I looked at the patch you sent yesterday. The build on Debian unstable still "
        "fails in the test suite, see the log below. I think the problem is in the configure "
        "script; could you check whether the kernel headers are installed? Thanks, Alice\n",
    )
    assert clf.classify(spam).label == "yes"
    assert clf.classify(ham).label == "no"


def test_tokens_of_training_are_what_classify_sees() -> None:
    raw = spammy(random.Random(8))
    db = Database()
    Classifier(db).train(raw, True)
    assert set(db.counts) == tokenize(raw)


def test_scores_do_not_depend_on_the_hash_seed(tmp_path: Path) -> None:
    """Two processes with different string-hash seeds give bit-identical scores."""
    import os
    import subprocess
    import sys

    db = small_db()
    db.save(tmp_path / "x.db")
    spam, ham = corpus(seed=21, count=5)
    for i, raw in enumerate(spam + ham):
        (tmp_path / f"{i}.eml").write_bytes(raw)
    script = (
        "import sys; from pathlib import Path\n"
        "from poste.spam import Classifier, Database\n"
        "c = Classifier(Database.load(sys.argv[1]))\n"
        "for i in range(10): print(repr(c.classify(Path(sys.argv[2], f'{i}.eml').read_bytes())"
        ".score))\n"
    )
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "x.db"), str(tmp_path)],
            capture_output=True,
            env=env,
            check=True,
            timeout=60,
        )
        outs.append(r.stdout)
    assert outs[0] == outs[1]
    assert len(outs[0].splitlines()) == 10


def test_a_token_with_zero_counts_in_a_file_counts_for_nothing(tmp_path: Path) -> None:
    db = small_db()
    raw = spammy(random.Random(21))
    token = sorted(tokenize(raw))[0]
    db.counts = {**db.counts, token: (0, 0)}
    db.save(tmp_path / "zero.db")
    clf = Classifier(Database.load(tmp_path / "zero.db"))
    assert clf.token_prob(token) == 0.5
    without = Database()
    without.nspam, without.nham = db.nspam, db.nham
    without.counts = {t: c for t, c in db.counts.items() if t != token}
    assert clf.classify(raw).score == Classifier(without).classify(raw).score
