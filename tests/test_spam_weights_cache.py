"""The classify fast lane's cached weight table scores exactly as the database file, and never lies.

Also: the one-copy mbox splitter gives the messages the stored-form splitter does.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poste.spam import weights_cache
from poste.spam.corpus import (
    iter_messages,
    split_mbox,
    split_mbox_file,
    split_mbox_raw,
    unquote_mbox,
)
from poste.spam.database import Database, DatabaseError
from poste.spam.model import Classifier
from support.spamkit import corpus, hammy, small_db, spammy, write_mbox


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


def _mails(seed: int = 3, count: int = 12) -> list[bytes]:
    rng = random.Random(seed)
    return [spammy(rng) if i % 2 else hammy(rng) for i in range(count)]


def test_cached_table_scores_as_the_file(tmp_path: Path, cache_home: Path) -> None:
    path = tmp_path / "spam.db"
    small_db().save(path)
    full = Database.load(path)
    first = weights_cache.load(str(path))  # a miss: loads the file, writes the cache
    (cached_file,) = (cache_home / "poste").iterdir()
    second = weights_cache.load(str(path))  # a hit
    assert second._source is not None and second._packed is None
    assert second.weights() == full.weights() == first.weights()
    # same floats; the cached table's tokens in the order of the mails they
    # were seen in, most first (the order of lookups' locality, not of scores)
    by_seen = sorted(full.weights(), key=lambda t: -full.seen.get(t, 0))
    assert list(second.weights()) == by_seen
    assert (second.nspam, second.nham, second.note, second.learning) == (
        full.nspam,
        full.nham,
        full.note,
        full.learning,
    )
    for raw in _mails():
        assert Classifier(second).classify(raw) == Classifier(full).classify(raw)
    # the token state is read from the file when asked for
    assert len(second) == len(full) and second.z == full.z and second.seen == full.seen
    assert os.stat(cached_file).st_mode & 0o777 == 0o600


def test_a_replaced_database_is_not_read_from_the_cache(tmp_path: Path, cache_home: Path) -> None:
    path = tmp_path / "spam.db"
    small_db(seed=1).save(path)
    weights_cache.load(str(path))
    small_db(seed=2, count=20).save(path)  # renamed into place: a new inode
    assert weights_cache.load(str(path)).weights() == Database.load(path).weights()


def test_token_state_of_a_file_changed_since_is_refused(tmp_path: Path, cache_home: Path) -> None:
    path = tmp_path / "spam.db"
    small_db(seed=1).save(path)
    weights_cache.load(str(path))
    db = weights_cache.load(str(path))
    small_db(seed=2, count=20).save(path)
    with pytest.raises(DatabaseError, match="changed since"):
        db.train(["word"], True)


def test_damaged_or_foreign_cache_files_are_ignored(tmp_path: Path, cache_home: Path) -> None:
    path = tmp_path / "spam.db"
    small_db().save(path)
    want = Database.load(path).weights()
    weights_cache.load(str(path))
    (cached,) = (cache_home / "poste").iterdir()
    good = cached.read_bytes()
    for bad in (good[:-1], good[:100], b"", good[:-5] + bytes([good[-5] ^ 1]) + good[-4:]):
        cached.write_bytes(bad)
        db = weights_cache.load(str(path))
        assert db.weights() == want and db._source is None  # read from the file
        assert cached.read_bytes() == good  # and the cache written again
    cached.chmod(0o666)  # writable by others: could hold anything
    assert weights_cache.load(str(path))._source is None


def test_a_cache_folder_that_cannot_be_written_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    path = tmp_path / "spam.db"
    small_db().save(path)
    assert weights_cache.load(str(path)).weights() == Database.load(path).weights()
    with pytest.raises(DatabaseError, match="cannot read"):
        weights_cache.load(str(tmp_path / "missing.db"))


def test_classify_prints_the_same_with_and_without_the_cache(
    tmp_path: Path, poste_bin: str
) -> None:
    db = tmp_path / "spam.db"
    small_db().save(db)
    mbox = write_mbox(tmp_path / "in.mbox", _mails(count=30))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cmd = [poste_bin, "spam", "classify", "-j1", "--db", str(db), str(mbox)]
    runs = [subprocess.run(cmd, capture_output=True, env=env, timeout=120) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0]
    assert runs[0].stdout == runs[1].stdout
    assert len(list((tmp_path / "cache" / "poste").iterdir())) == 1
    clf = Classifier(Database.load(db))
    want = [clf.classify(raw) for raw in _mails(count=30)]
    got = runs[1].stdout.decode().splitlines()
    assert [line.split()[:2] for line in got] == [[r.label, f"{r.score:.4f}"] for r in want]


_PIECES = [
    b"From a@b Mon Jan  1 10:00:00 2024\n",
    b"From ",
    b">From x\n",
    b">>From y",
    b">From",
    b"text\n",
    b"\n",
    b"\r\n",
    b"\n\n",
    b"\r\n\r\n",
    b" ",
    b"\nFrom ",
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=16))
def test_split_mbox_gives_the_stored_messages_unquoted(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert list(split_mbox(data)) == [unquote_mbox(m) for _, m in split_mbox_raw(data)]


def test_split_mbox_on_a_written_mbox(tmp_path: Path) -> None:
    spam, ham = corpus(count=10)
    quoted = [m + b"\r\nFrom the desk of\r\n>From here\r\n" for m in spam]
    data = write_mbox(tmp_path / "m.mbox", quoted + ham).read_bytes()
    assert list(split_mbox(data)) == [unquote_mbox(m) for _, m in split_mbox_raw(data)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=16))
def test_an_mbox_file_gives_the_messages_of_its_bytes(
    tmp_path_factory: pytest.TempPathFactory, pieces: list[bytes]
) -> None:
    """iter_messages reads a file piece by piece, and splits it as split_mbox splits its bytes."""
    data = b"From x\n" + b"".join(pieces)
    path = tmp_path_factory.mktemp("mbox") / "m"
    path.write_bytes(data)
    assert [m for _, m in iter_messages(str(path))] == list(split_mbox(data))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([*_PIECES, b"x" * 300, b"junk before any From_ line\n"]), max_size=24),
    st.integers(1, 64),
)
def test_split_mbox_file_cuts_as_split_mbox_for_any_piece_size(
    pieces: list[bytes], piece: int
) -> None:
    """A From_ line across two reads, a mail longer than the buffer, text before the first."""
    data = b"".join(pieces)
    assert list(split_mbox_file(io.BytesIO(data), piece)) == list(split_mbox(data))


def test_an_mbox_truncated_while_it_is_read_ends_early_not_with_sigbus(tmp_path: Path) -> None:
    """A mail client compacting the mbox under `poste spam classify`: the reader sees less mail.

    (Through mmap, reading the pages past the new end killed the process with SIGBUS.)
    """
    mails = [b"From a@b Mon Jan  1 10:00:00 2024\nSubject: %d\n\n" % i + b"y" * 5000 + b"\n"
             for i in range(400)]
    path = tmp_path / "m.mbox"
    path.write_bytes(b"".join(mails))
    got = []
    with open(path, "rb") as f:
        for i, msg in enumerate(split_mbox_file(f, 64 * 1024)):
            got.append(msg)
            if i == 10:
                os.truncate(path, 100_000)  # under the reader, mid-file
    assert 10 < len(got) < 400
    assert got[:10] == list(split_mbox(b"".join(mails[:11])))[:10]


def test_classify_output_that_cannot_be_written_is_one_error_line(
    tmp_path: Path, poste_bin: str
) -> None:
    """The fast lane ends without the interpreter's teardown: a failed write must still say so."""
    db = tmp_path / "spam.db"
    small_db().save(db)
    mbox = write_mbox(tmp_path / "m.mbox", _mails(count=4))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    with open("/dev/full", "wb") as full:
        r = subprocess.run(
            [poste_bin, "spam", "classify", "-j1", "--db", str(db), str(mbox)],
            stdout=full,
            stderr=subprocess.PIPE,
            env=env,
            timeout=120,
        )
    assert r.returncode == 1
    assert r.stderr.decode().splitlines() == [
        "Error: cannot write the output: No space left on device"
    ]
