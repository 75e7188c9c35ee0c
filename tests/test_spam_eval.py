"""Held-out evaluation: the random and time splits of `poste spam eval --split`."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

from poste.spam.corpus import mail_time
from poste.spam.evaluate import interleaved_split, time_split
from support.spamkit import hammy, spammy, write_folder


def dated(raw: bytes, day: int) -> bytes:
    """The mail as received on 2024-01-<day> (a Received: field on top; its Date: says 2001)."""
    top = f"Received: from a.example by mx.example.net; {day} Jan 2024 10:00:00 +0000\r\n"
    return top.encode() + raw.replace(b"Mon, 1 Jan 2024", b"Mon, 1 Jan 2001")


def fold_rows(text: str) -> dict[str, list[str]]:
    """The rows of `eval --time-folds`' table: "fold1" or "3folds" -> the cells after the name."""
    return {
        ln.split()[0] + ln.split()[1]: ln.split()[2:]
        for ln in text.splitlines()
        if ln.startswith(("fold", "3 folds"))
    }


def refused(poste_bin: str, *args: str) -> bytes:
    """`poste spam eval ARGS` on two paths that do not exist: its stderr, once it failed in a line."""
    r = subprocess.run(
        [poste_bin, "spam", "eval", *args, "--spam", "x", "--ham", "y"],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode != 0 and b"Traceback" not in r.stderr
    return r.stderr


def test_mail_time_prefers_the_first_received_over_date() -> None:
    raw = dated(hammy(random.Random(1)), 9)
    assert mail_time(raw) == 1704794400.0  # 2024-01-09 10:00 UTC
    # no Received: then the Date:
    assert mail_time(hammy(random.Random(1))) == 1704103200.0
    assert mail_time(b"Subject: no dates\r\n\r\nbody") is None
    assert mail_time(b"Received: by x; garbage\r\nDate: also garbage\r\n\r\n") is None


def test_splits_pick_the_newest_or_every_nth() -> None:
    assert interleaved_split(8, 0.25) == [False, False, False, True] * 2
    assert interleaved_split(6, 1 / 3) == [False, False, True] * 2
    # newest quarter; an undated mail counts as the oldest
    assert time_split([5.0, None, 1.0, 9.0, 7.0, 3.0, 8.0, 2.0], 0.25) == [
        False,
        False,
        False,
        True,
        False,
        False,
        True,
        False,
    ]


def test_eval_split_reports_both_splits(tmp_path: Path, poste_bin: str) -> None:
    rng = random.Random(5)
    # written in name order, received in that order: the time split tests on
    # the last 5 of each folder, the random split on every 4th
    spam = [dated(spammy(rng), d) for d in range(1, 21)]
    ham = [dated(hammy(rng), d) for d in range(1, 21)]
    write_folder(tmp_path / "spam", spam)
    write_folder(tmp_path / "ham", ham)
    r = subprocess.run(
        [
            poste_bin,
            "spam",
            "eval",
            "--split",
            "--spam",
            str(tmp_path / "spam"),
            "--ham",
            str(tmp_path / "ham"),
            "-j1",
        ],
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    lines = {line[:24].strip(): line[24:].split() for line in text.splitlines()}
    assert lines["train spam + ham"] == ["15", "+", "15", "15", "+", "15"]
    assert lines["spam caught (yes)"] == ["5/5", "(100.00%)", "5/5", "(100.00%)"]
    assert lines["ham labelled yes"] == ["0/5", "0/5"]
    assert "time split, labels per folder" in text
    assert float(lines["mails/s (one core)"][0]) > 0


def test_eval_split_needs_two_mails(tmp_path: Path, poste_bin: str) -> None:
    write_folder(tmp_path / "one", [spammy(random.Random(1))])
    r = subprocess.run(
        [
            poste_bin,
            "spam",
            "eval",
            "--split",
            "--spam",
            str(tmp_path / "one"),
            "--ham",
            str(tmp_path / "one"),
        ],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert b"need at least 2 mails to split" in r.stderr
    assert b"Traceback" not in r.stderr


def test_rolling_folds_train_on_older_parts_only(tmp_path: Path, poste_bin: str) -> None:
    from poste.spam.evaluate import _chunks

    # 4 parts by arrival, the undated mail the oldest
    assert _chunks([5.0, None, 1.0, 9.0, 7.0, 3.0, 8.0, 2.0], 4) == [2, 0, 0, 3, 2, 1, 3, 1]
    rng = random.Random(7)
    spam = [dated(spammy(rng), d) for d in range(1, 21)]
    ham = [dated(hammy(rng), d) for d in range(1, 21)]
    write_folder(tmp_path / "spam", spam)
    write_folder(tmp_path / "ham", ham)
    args = [poste_bin, "spam", "eval", "--split", "--time-folds", "3", "-j1"]
    args += ["--spam", str(tmp_path / "spam"), "--ham", str(tmp_path / "ham")]
    r = subprocess.run(args, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = fold_rows(r.stdout.decode())
    # 15 training mails a folder (the newest 5 are the test part, never read), in 4 parts
    # of 4, 4, 4, 3: fold 1 trains on the oldest part, labels the next
    assert rows["fold1"][0] == "4+4"
    assert rows["fold3"][0] == "12+12"
    assert rows["3folds"][1] == "11/11"  # every newer spam caught, summed over the folds
    assert rows["3folds"][2] == "0/11"
    refused(poste_bin, "--time-folds", "3")


def test_unseen_senders_folds_train_without_the_senders_they_label(
    tmp_path: Path, poste_bin: str
) -> None:
    from poste.spam.evaluate import sender_key

    assert sender_key(b"From: A <a@lists.example.co.uk>\r\n\r\nx") == "example.co.uk"
    assert sender_key(b"From: b@Mail.Example.ORG\r\n\r\nx") == "example.org"
    # no usable From: a sender of its own, never equal to another mail's
    assert sender_key(b"Subject: x\r\n\r\n").startswith("#")
    rng = random.Random(7)
    # every spam from a sender of its own, every ham from the same one
    spam = [
        dated(spammy(rng).replace(b"deals@bulk-offers.example", f"d@s{d}.example".encode()), d)
        for d in range(1, 21)
    ]
    ham = [dated(hammy(rng), d) for d in range(1, 21)]
    write_folder(tmp_path / "spam", spam)
    write_folder(tmp_path / "ham", ham)
    args = [poste_bin, "spam", "eval", "--split", "--time-folds", "3", "--unseen-senders"]
    args += ["-j1", "--spam", str(tmp_path / "spam"), "--ham", str(tmp_path / "ham")]
    r = subprocess.run(args, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert "without the older mail of the senders it labels" in text
    rows = fold_rows(text)
    # the older spam stay (new senders each), the older ham go (their sender is labelled)
    assert rows["fold1"][0] == "4+0"
    assert rows["fold3"][0] == "12+0"
    assert b"--unseen-senders goes with --time-folds" in refused(
        poste_bin, "--split", "--unseen-senders"
    )
