"""Learning.weight_bias: the bias learns a ham's gradient times ham_weight, as every token does."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from poste.spam import Classifier, Database
from poste.spam.database import BIAS, Learning
from poste.spam.tokenizer import tokenize
from support.spamkit import corpus


def _fit(weight_bias: bool, nham: int = 40) -> Database:
    spam, ham = corpus(7, nham)
    db = Database(Learning(weight_bias=weight_bias), members=2)
    db.fit([(tokenize(raw), True) for raw in spam[:10]] + [(tokenize(raw), False) for raw in ham])
    return db


def test_one_ham_step_moves_the_bias_ham_weight_times_as_hard() -> None:
    feats = {"alpha", "beta"}
    steps = {}
    for wb in (False, True):
        db = Database(Learning(ham_weight=3.0, weight_bias=wb), members=1)
        db.train(feats, False)
        steps[wb] = (db.z[BIAS], db.z["alpha"])
    # from zero the score is 0.5 and g = 0.5: the tokens take 3 * 0.5 either way
    assert steps[False] == (0.5, 1.5)
    assert steps[True] == (1.5, 1.5)
    # a spam's step is the same with and without
    spam = [Database(Learning(weight_bias=wb), members=1) for wb in (False, True)]
    for db in spam:
        db.train(feats, True)
    assert spam[0].z == spam[1].z


def test_a_new_database_weights_the_bias_with_ham_weight_4() -> None:
    assert Learning().weight_bias is True and Learning().ham_weight == 4.0


def test_with_it_a_mail_of_unknown_tokens_stays_in_the_middle() -> None:
    """Without it the tokens in every ham go to the ham side and the bias to the spam side."""
    unweighted, weighted = _fit(False), _fit(True)
    # (small here: the synthetic ham shares a sender; +6 in the database shipped before it)
    assert unweighted.weight(BIAS) > 0.0 > weighted.weight(BIAS)
    nothing: set[str] = set()
    assert Classifier(weighted).score(nothing) < 0.5 < Classifier(unweighted).score(nothing)


def test_the_file_keeps_it_and_older_files_load_without_it(tmp_path: Path) -> None:
    db = _fit(True)
    db.save(tmp_path / "w.db")
    data = (tmp_path / "w.db").read_bytes()
    (hlen,) = struct.unpack_from("<I", data, 12)
    header = json.loads(data[16 : 16 + hlen])
    assert header["weight_bias"] is True
    back = Database.load(tmp_path / "w.db")
    assert back.learning == db.learning and back.learning.weight_bias
    assert back.weights() == db.weights()
    # a file written before the key existed learnt with the plain bias gradient
    del header["weight_bias"]
    new = json.dumps(header, sort_keys=True).encode()
    old = data[:12] + struct.pack("<I", len(new)) + new + data[16 + hlen :]
    assert Database.from_bytes(old).learning.weight_bias is False


def test_update_of_a_file_goes_on_with_its_own_setting(tmp_path: Path) -> None:
    from poste.spam.learn import update_into

    spam, _ = corpus(8, 3)
    for wb in (False, True):
        path = tmp_path / f"{wb}.db"
        _fit(wb).save(path)
        db, _ = update_into(str(path), [(frozenset(tokenize(spam[0])), True)], 1, members=2)
        assert db.learning.weight_bias is wb
        assert Database.load(path).learning.weight_bias is wb


def test_a_cached_table_of_an_unweighted_file_trains_on_unweighted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weight cache's header does not hold the setting: training reads it from the file."""
    from poste.spam import weights_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "old.db"
    _fit(False).save(path)
    weights_cache.load(str(path))  # a miss: writes the cache
    hit = weights_cache.load(str(path))
    assert hit._source is not None
    direct = Database.load(path)
    for db in (hit, direct):
        db.train({"alpha", "beta"}, False)
    assert hit.learning.weight_bias is False
    assert hit.zs == direct.zs
