"""A database of several members: trained in different seeded orders, one averaged table.

Format version 4 keeps every member's z and n, so a saved file goes on learning
(`--update`, learn mails) exactly as the one in memory; version 3 files load as one member.
"""

from __future__ import annotations

import json
import math
import random
import struct
import subprocess
from pathlib import Path

from poste.spam import Classifier, Database
from poste.spam.database import BIAS, MAGIC, MEMBERS, Learning
from poste.spam.learn import teach, update_into
from poste.spam.tokenizer import tokenize
from support.spamkit import corpus, spammy, write_folder


def mails(seed: int = 3, count: int = 20) -> list[tuple[frozenset[str], bool]]:
    spam, ham = corpus(seed=seed, count=count)
    return [(frozenset(tokenize(r)), True) for r in spam] + [
        (frozenset(tokenize(r)), False) for r in ham
    ]


def test_the_weight_is_the_mean_of_the_members() -> None:
    db = Database(members=3)
    db.fit(mails(), epochs=3)
    assert db.members == 3 == len(db.zs) == len(db.ns)
    assert db.zs[0] != db.zs[1]  # different orders, different states
    for t, w in list(db.weights().items())[:50]:
        each = [db._weight(z[t], n[t]) for z, n in zip(db.zs, db.ns, strict=True)]
        assert w == math.fsum(each) / 3
    # one member alone is that member: the weights of a database of one
    one = Database(members=1)
    one.fit(mails(), epochs=3)
    assert one.weights() == {
        t: x for t, z in one.z.items() if (x := one._weight(z, one.n[t])) != 0.0
    }


def test_same_mails_and_seed_give_the_same_file() -> None:
    a, b, c = Database(), Database(), Database()
    a.fit(mails(), seed=4)
    b.fit(mails(), seed=4)
    c.fit(mails(), seed=5)
    assert a.members == MEMBERS
    assert a.to_bytes() == b.to_bytes() != c.to_bytes()
    assert (a.nspam, a.nham) == (20, 20)  # counted once, not once per member or epoch


def test_every_member_round_trips_and_goes_on_learning(tmp_path: Path) -> None:
    db = Database(members=4)
    db.fit(mails())
    db.save(tmp_path / "m.db.gz")
    again = Database.load(tmp_path / "m.db.gz")
    assert again.members == 4
    assert again.weights() == db.weights()
    assert (again.zs, again.ns, again.seen) == (db.zs, db.ns, db.seen)
    more = mails(seed=9, count=5)
    for tokens, is_spam in more:
        db.train(tokens, is_spam)
        again.train(tokens, is_spam)
    assert again.to_bytes() == db.to_bytes()


def test_update_trains_every_member_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "u.db"
    first, second = mails(seed=1, count=10), mails(seed=2, count=10)
    update_into(path, first, 2, members=3)
    db, _ = update_into(path, second, 2, members=7)  # an existing file keeps its members
    assert db.members == 3 == Database.load(path).members
    want = Database(members=3)
    want.fit(first, 2)
    want.fit(second, 2)
    assert Database.load(path).to_bytes() == want.to_bytes()


def test_a_learn_mail_moves_every_member_and_each_bias_once() -> None:
    db = Database(Learning(alpha=0.3), members=3)  # a slow learner: several steps
    db.fit(mails())
    once = Database.from_bytes(db.to_bytes())
    tokens = tokenize(spammy(random.Random(99)))  # scored spam: the user says it is not
    once.train(tokens, False)
    got = teach(db, tokens, False)
    assert got.steps > 1 and got.before > 0.9 and got.after <= 0.01
    assert db.bias_state() == once.bias_state()
    assert Classifier(db).score(tokens) == got.after


def _as_version_3(data: bytes) -> bytes:
    """A one-member file as poste before format 4 wrote it (no "members" key, version 3)."""
    (hlen,) = struct.unpack_from("<I", data, 12)
    header = json.loads(data[16 : 16 + hlen])
    del header["members"]
    new = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<II", 3, len(new)) + new + data[16 + hlen :]


def test_a_version_3_file_loads_as_one_member(tmp_path: Path) -> None:
    db = Database(members=1)
    db.fit(mails())
    (tmp_path / "v3.db").write_bytes(_as_version_3(db.to_bytes()))
    old = Database.load(tmp_path / "v3.db")
    assert old.members == 1
    assert old.weights() == db.weights()
    assert (old.z, old.n, old.seen) == (db.z, db.n, db.seen)
    assert BIAS in old.weights()
    old.save(tmp_path / "v4.db")  # written back as version 4, one member
    assert struct.unpack_from("<I", (tmp_path / "v4.db").read_bytes(), 8)[0] == 4
    assert Database.load(tmp_path / "v4.db").weights() == db.weights()


def test_train_and_eval_inner_commands(tmp_path: Path, poste_bin: str) -> None:
    spam, ham = corpus(seed=21, count=24)
    write_folder(tmp_path / "spam", spam)
    write_folder(tmp_path / "ham", ham)
    common = ["--spam", str(tmp_path / "spam"), "--ham", str(tmp_path / "ham"), "-j1"]
    out = tmp_path / "t.db"
    r = subprocess.run(
        [poste_bin, "spam", "train", *common, "--members", "3", "--seed", "2", "-o", str(out)],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert Database.load(out).members == 3
    r = subprocess.run(
        [poste_bin, "spam", "eval", "--split", "--inner", "--sweep", "--members", "2", *common],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert "inner time split" in text and "random split" not in text
    lines = {line[:24].strip(): line[24:].split() for line in text.splitlines()}
    # 24 per folder: 18 train the outer split, of which the newest 4 (of 18) validate
    assert lines["train spam + ham"] == ["14", "+", "14"]
    assert "highest ham score" in text and "2 member(s), seed 0" in text
    r = subprocess.run(
        [poste_bin, "spam", "eval", "--inner", *common], capture_output=True, timeout=60
    )
    assert r.returncode != 0 and b"--inner goes with --split" in r.stderr
    assert b"Traceback" not in r.stderr


def test_merged_members_are_one_model_with_the_same_weights(tmp_path: Path) -> None:
    db = Database(members=4)
    db.fit(mails())
    want = db.weights().copy()
    spam, ham = corpus(seed=31, count=10)
    before = [Classifier(db).classify(r).score for r in spam + ham]
    db.save(tmp_path / "four.db")
    db.merge()
    assert db.members == 1
    got = db.weights()
    assert set(got) == set(want)
    assert all(abs(got[t] - w) <= 1e-12 * max(1.0, abs(w)) for t, w in want.items())
    after = [Classifier(db).classify(r).score for r in spam + ham]
    assert all(abs(a - b) < 1e-12 for a, b in zip(after, before, strict=True))
    db.save(tmp_path / "one.db")
    assert (tmp_path / "one.db").stat().st_size < (tmp_path / "four.db").stat().st_size / 2
    again = Database.load(tmp_path / "one.db")
    assert again.members == 1 and again.weights() == got
    again.train(tokenize(spam[0]), True)  # and it learns on as one model
