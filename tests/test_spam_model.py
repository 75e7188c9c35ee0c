"""The model labels what it was taught, and the database file keeps it exactly."""

from __future__ import annotations

import gzip
import json
import random
import struct
from pathlib import Path

import pytest

from poste.spam import Classifier, Database, DatabaseError, Params, load_db
from poste.spam.database import BIAS, MAGIC, VERSION
from poste.spam.tokenizer import tokenize
from support.spamkit import corpus, hammy, mail, small_db, spammy


def test_trained_model_labels_spam_yes_and_ham_no() -> None:
    clf = Classifier(small_db())
    rng = random.Random(99)  # mails never seen in training
    for _ in range(10):
        assert clf.classify(spammy(rng)).label == "yes"
        assert clf.classify(hammy(rng)).label == "no"


def test_mail_with_no_known_token_is_unknown() -> None:
    clf = Classifier(small_db())
    r = clf.classify(b"Subject: zzqx\r\n\r\nqwertyuiop asdfghjkl")
    assert r.label == "unknown"
    # none of its words is known; only the content type every training mail
    # had can weigh (ham's tokens learn ham_weight times as hard)
    assert [t for t in r.tokens if not t.startswith("ct:")] == []


def test_an_empty_database_says_one_half() -> None:
    r = Classifier(Database()).classify(spammy(random.Random(1)))
    assert (r.score, r.label) == (0.5, "unknown")


def test_cutoffs_are_configurable() -> None:
    db = small_db()
    raw = mail("hello", "meeting money")
    score = Classifier(db).classify(raw).score
    assert Classifier(db, Params(ham_cutoff=0.0, spam_cutoff=0.0)).classify(raw).label == "yes"
    assert Classifier(db, Params(ham_cutoff=1.0, spam_cutoff=1.0)).classify(raw).label == "no"
    mid = Classifier(db, Params(ham_cutoff=score / 2, spam_cutoff=(1 + score) / 2))
    assert mid.classify(raw).label == "unknown"


def test_detail_names_the_heaviest_tokens() -> None:
    clf = Classifier(small_db())
    r = clf.classify(spammy(random.Random(3)))
    line = r.detail()
    assert line.startswith("score=")
    assert "spam: " in line
    top = r.strongest(3)
    assert abs(top[0][1] - 0.5) >= abs(top[-1][1] - 0.5)
    spammy_words = {"viagra", "lottery", "casino", "winner", "money"}
    assert spammy_words & {t for t, p in r.strongest(10) if p > 0.5}


def test_save_and_load_give_identical_scores(tmp_path: Path) -> None:
    db = small_db()
    spam, ham = corpus(seed=11, count=15)
    before = [Classifier(db).classify(raw).score for raw in spam + ham]
    for name in ("plain.db", "packed.db.gz"):
        db.save(tmp_path / name)
        again = Database.load(tmp_path / name)
        assert again.weights() == db.weights()
        assert (again.nspam, again.nham) == (db.nspam, db.nham)
        after = [Classifier(again).classify(raw).score for raw in spam + ham]
        assert after == before
    assert gzip.decompress((tmp_path / "packed.db.gz").read_bytes())[:8] == MAGIC
    # no temporary file is left behind by the atomic write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed.db.gz", "plain.db"]


def test_training_goes_on_from_a_saved_file_exactly(tmp_path: Path) -> None:
    """Learning 20 mails, or 10, a save and a load, then 10 more: the same file."""
    spam, ham = corpus(seed=13, count=10)
    mails = [(tokenize(r), True) for r in spam] + [(tokenize(r), False) for r in ham]
    random.Random(0).shuffle(mails)
    whole = Database()
    for tokens, is_spam in mails:
        whole.train(tokens, is_spam)
    part = Database()
    for tokens, is_spam in mails[:10]:
        part.train(tokens, is_spam)
    part.save(tmp_path / "part.db")
    resumed = Database.load(tmp_path / "part.db")
    for tokens, is_spam in mails[10:]:
        resumed.train(tokens, is_spam)
    assert resumed.to_bytes() == whole.to_bytes()


def test_one_more_spam_raises_its_score() -> None:
    db = small_db()
    extra = mail("quarterly figures", "zanzibar quokka figures attached")
    clf = Classifier(db)
    base = clf.classify(extra).score
    nspam = db.nspam
    for _ in range(3):
        clf.train(extra, True)
    assert db.nspam == nspam + 3
    assert clf.classify(extra).score > base


def test_file_format_header(tmp_path: Path) -> None:
    db = small_db()
    db.note = "synthetic"
    db.save(tmp_path / "x.db")
    data = (tmp_path / "x.db").read_bytes()
    assert data[:8] == b"POSTESPM"
    assert struct.unpack_from("<I", data, 8)[0] == VERSION == 4
    (hlen,) = struct.unpack_from("<I", data, 12)
    header = json.loads(data[16 : 16 + hlen])
    assert header["model"] == "ftrl" and header["members"] == db.members
    assert header["weighted"] == len(db.weights()) < header["tokens"] == len(db)
    assert Database.load(tmp_path / "x.db").note == "synthetic"


def test_weighted_tokens_come_first(tmp_path: Path) -> None:
    db = small_db()
    db.save(tmp_path / "x.db")
    data = (tmp_path / "x.db").read_bytes()
    (hlen,) = struct.unpack_from("<I", data, 12)
    header = json.loads(data[16 : 16 + hlen])
    (blen,) = struct.unpack_from("<I", data, 16 + hlen)
    tokens = data[20 + hlen : 20 + hlen + blen].decode().split("\n")
    k = header["weighted"]
    assert set(tokens[:k]) == set(db.weights())
    assert tokens[:k] == sorted(tokens[:k]) and tokens[k:] == sorted(tokens[k:])


@pytest.mark.parametrize("version", [1, 2])
def test_count_databases_of_the_old_model_ask_for_a_retrain(tmp_path: Path, version: int) -> None:
    header = json.dumps({"nspam": 1, "nham": 1, "tokens": 0, "groups": 0}).encode()
    (tmp_path / "old.db").write_bytes(
        MAGIC + struct.pack("<II", version, len(header)) + header + struct.pack("<I", 0)
    )
    with pytest.raises(DatabaseError, match="retrain it with 'poste spam train'"):
        Database.load(tmp_path / "old.db")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a database",
        MAGIC + b"\x04\x00\x00\x00",
        MAGIC + b"\x03\x00\x00\x00\xff\xff",
        MAGIC + b"\x03\x00\x00\x00\x02\x00\x00\x00{}",
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


def test_a_weight_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    db = Database()
    db.train({"word"}, True)
    db.z["word"] = float("nan")
    db.save(tmp_path / "nan.db")
    with pytest.raises(DatabaseError, match="not a number"):
        Database.load(tmp_path / "nan.db")


def test_hundred_thousand_token_database_round_trips(tmp_path: Path) -> None:
    db = Database()
    rng = random.Random(0)
    for i in range(100_000):
        t = f"tok{i}:{rng.random():.6f}"
        db.z[t] = rng.uniform(-3, 3)
        db.n[t] = rng.uniform(0, 50)
        db.seen[t] = rng.randrange(1, 50)
    db.nspam, db.nham = 500, 2500
    db.save(tmp_path / "big.db")
    again = Database.load(tmp_path / "big.db")
    assert len(again) == 100_000
    assert again.weights() == db.weights()
    assert (again.z, again.n, again.seen) == (db.z, db.n, db.seen)


def test_prune_sparse_and_drop_prefixes() -> None:
    db = Database()
    db.train({"common", "rare", "received:host.example"}, True)
    db.train({"common", "received:host.example"}, False)
    assert db.prune(2) == 1
    assert "rare" not in db.z
    assert db.drop_prefixes(["received:"]) == 1
    assert set(db.z) == {"common", BIAS}


def test_sparse_drops_only_tokens_that_weigh_nothing() -> None:
    db = small_db()
    spam, ham = corpus(seed=17, count=10)
    before = [Classifier(db).classify(r).score for r in spam + ham]
    weighted = set(db.weights()) - {BIAS}
    total = len(db)
    assert db.sparse() > 0
    assert set(db.z) - {BIAS} == weighted
    assert len(db) < total
    assert [Classifier(db).classify(r).score for r in spam + ham] == before


def test_shipped_default_database_labels_without_training() -> None:
    db = load_db(None)
    assert db.nspam > 100 and db.nham > 100
    assert not any(t.startswith(("received:", "from:addr:")) for t in db.z)
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
    assert set(db.z) == tokenize(raw) | {BIAS}


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
