"""`poste spamfilter` end to end: client -> spamfilter -> `poste srv`, on loopback.

A spammy mail arrives labelled `yes`, a clean one `no`, and a malformed one
arrives byte-identical below the prepended fields, labelled.  And the event
loop is never held by the classifier: while a 20 MB mail is being judged
(held in the worker thread by a gate the test controls), another session
goes through from start to end.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import threading
from pathlib import Path

import aiosmtplib
import pytest

from poste.runtime.settings import ConfigError
from poste.services.spamfilter.service import SpamfilterStage, build_stage
from poste.spam import Classifier, Database, tokenize
from poste.tools.srv import Mailbox, MailboxHop
from support.cli import run_poste
from support.dkimkit import srv_mailbox, wait_file
from support.service import started
from support.smtp import running
from support.spamkit import big_attachment, corpus, hammy, small_db, spammy


def split_fields(stored: bytes) -> tuple[list[bytes], bytes]:
    """The fields the hops prepended (unfolded, top first) and the rest of the mail.

    Prepended fields are Received: and X-Spamtacus*: everything from the
    first other field on is the original mail.
    """
    fields: list[bytes] = []
    pos = 0
    while True:
        end = stored.index(b"\r\n", pos)
        line = stored[pos:end]
        name = line.split(b":", 1)[0].lower()
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b" " + line.strip()
        elif name == b"received" or name.startswith(b"x-spamtacus"):
            fields.append(line)
        else:
            return fields, stored[pos:]
        pos = end + 2


def send(poste_bin: str, raw: bytes, port: int) -> None:
    r = subprocess.run(
        [poste_bin, "send", "-", f"127.0.0.1:{port}", "-s", "a@example.org", "-r", "b@example.net"],
        input=raw,
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


MALFORMED = (
    b"Subject: \xff\xfe broken \xc3 8-bit\r\n"
    b"From: <\r\n"
    b'Content-Type: multipart/mixed; boundary="nope\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"X-\xff\xff: \x01\x02junk\r\n"
    b"\r\n"
    b"--nope\r\nContent-Type: text/html\r\n\r\n<p>unclosed <b>html &bogus;\r\n"
    b"=?utf-8?B?####?= not base64 at all !!!\r\n"
)


def test_spam_ham_and_malformed_mail_are_labelled(tmp_path: Path, poste_bin: str) -> None:
    db = tmp_path / "small.db"
    small_db().save(db)
    box = tmp_path / "box"
    rng = random.Random(2024)
    spam, ham = spammy(rng), hammy(rng)
    with (
        srv_mailbox(poste_bin, box, tmp_path / "srv.log") as srv_port,
        started(
            [
                poste_bin,
                "spamfilter",
                "--listen",
                "127.0.0.1:0",
                "--destination",
                f"127.0.0.1:{srv_port}",
                "--db",
                str(db),
                "--detail",
                "--hostname",
                "spamfilter.test",
            ],
            tmp_path / "spamfilter.log",
        ) as (_, [port]),
    ):
        for i, raw in enumerate((spam, ham, MALFORMED), 1):
            send(poste_bin, raw, port)
            stored = wait_file(box / f"{i}.eml")
            fields, rest = split_fields(stored)
            labels = [f for f in fields if f.startswith(b"X-Spamtacus:")]
            details = [f for f in fields if f.startswith(b"X-Spamtacus-Detail:")]
            expected = {1: b"yes", 2: b"no", 3: None}[i]
            assert len(labels) == 1, fields
            word = labels[0].split(b":", 1)[1].strip()
            if expected is None:
                assert word in (b"yes", b"no", b"unknown")
            else:
                assert word == expected
            assert len(details) == 1 and details[0].startswith(b"X-Spamtacus-Detail: score=")
            # spamfilter's own Received: is below its fields, srv's is above
            names = [f.split(b":", 1)[0] for f in fields]
            assert names[-1] == b"Received" and b"by spamfilter.test" in fields[-1]
            assert names.index(b"X-Spamtacus") < len(names) - 1
            original = {1: spam, 2: ham, 3: MALFORMED}[i]
            assert rest == original


def test_header_name_is_configurable_and_default_db_is_used(tmp_path: Path, poste_bin: str) -> None:
    box = tmp_path / "box"
    with (
        srv_mailbox(poste_bin, box, tmp_path / "srv.log") as srv_port,
        started(
            [
                poste_bin,
                "spamfilter",
                "--listen",
                "127.0.0.1:0",
                "--destination",
                f"127.0.0.1:{srv_port}",
                "--header-name",
                "X-Spam-Label",
            ],
            tmp_path / "spamfilter.log",
        ) as (_, [port]),
    ):
        send(poste_bin, hammy(random.Random(1)), port)
        stored = wait_file(box / "1.eml")
    assert b"\r\nX-Spam-Label: " in stored
    assert b"X-Spamtacus" not in stored


@pytest.mark.parametrize(
    "args, message",
    [
        (["--db", "/nonexistent.db"], "cannot read /nonexistent.db"),
        (["--header-name", "a b"], "not a header field name"),
        (["--ham-cutoff", "0.9", "--spam-cutoff", "0.1"], "must not be above"),
    ],
)
def test_bad_flags_are_one_line_errors(args: list[str], message: str) -> None:
    r = run_poste(  # poste.cli.main in this process
        ["spamfilter", "--listen", "127.0.0.1:0", "--destination", "127.0.0.1:1", *args]
    )
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


class GatedStage(SpamfilterStage):
    """Holds the judging of big mails in the worker thread until the gate opens."""

    def __init__(self, classifier: Classifier) -> None:
        super().__init__(classifier)
        self.big_started = threading.Event()
        self.gate = threading.Event()

    def judge(self, data: bytes) -> tuple[str, float, str]:
        if len(data) > 1_000_000:
            self.big_started.set()
            assert self.gate.wait(60), "the gate never opened: the event loop was blocked"
        return super().judge(data)


async def test_big_mail_being_classified_does_not_block_another_session(
    tmp_path: Path,
) -> None:
    stage = GatedStage(Classifier(small_db()))
    box = Mailbox(f"{tmp_path}/box/", 0, with_data=False)
    big = big_attachment()
    small = hammy(random.Random(9))
    async with running(stage, MailboxHop(box)) as svc:
        host, port = svc.sockname[0], svc.sockname[1]

        async def deliver(raw: bytes) -> None:
            await aiosmtplib.send(
                raw,
                sender="a@example.org",
                recipients=["b@example.net"],
                hostname=host,
                port=port,
                timeout=120,
            )

        big_task = asyncio.create_task(deliver(big))
        assert await asyncio.to_thread(stage.big_started.wait, 60)
        # the 20 MB mail is now inside the classifier; a whole other session completes
        await asyncio.wait_for(deliver(small), 60)
        assert not big_task.done()
        assert (tmp_path / "box" / "1.eml").exists()
        stage.gate.set()
        await asyncio.wait_for(big_task, 120)
    first = (tmp_path / "box" / "1.eml").read_bytes()
    second = (tmp_path / "box" / "2.eml").read_bytes()
    assert first.startswith(b"X-Spamtacus: no\r\n") or b"\r\nX-Spamtacus: no\r\n" in first
    assert len(second) > 20 * 1024 * 1024
    assert b"X-Spamtacus: " in second[:2000]
    assert second.endswith(big)


async def test_twenty_megabyte_mail_is_labelled_by_the_real_classifier(tmp_path: Path) -> None:
    stage = SpamfilterStage(Classifier(small_db()))
    box = Mailbox(f"{tmp_path}/box/", 0, with_data=False)
    big = big_attachment()
    async with running(stage, MailboxHop(box)) as svc:
        await aiosmtplib.send(
            big,
            sender="a@example.org",
            recipients=["b@example.net"],
            hostname=svc.sockname[0],
            port=svc.sockname[1],
            timeout=120,
        )
    stored = (tmp_path / "box" / "1.eml").read_bytes()
    assert stored.endswith(big)
    fields, _ = split_fields(stored)
    assert any(f.startswith(b"X-Spamtacus: ") for f in fields)


async def test_reload_swaps_the_database_and_keeps_it_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "spam.db"
    small_db().save(path)
    stage = SpamfilterStage(Classifier(small_db()), db_path=str(path))
    raw = spammy(random.Random(4))
    assert stage.judge(raw)[0] == "yes"
    # the same mails with the labels swapped: what was spam now reads as ham
    flipped = Database()
    spam, ham = corpus()
    flipped.fit([(tokenize(r), False) for r in spam] + [(tokenize(r), True) for r in ham])
    flipped.save(path)
    await stage.reload()
    assert stage.judge(raw)[0] == "no"
    path.write_bytes(b"damaged")
    await stage.reload()
    assert stage.judge(raw)[0] == "no"


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"db": "/nonexistent.db"}, "--db"),
        ({"header_name": "a b"}, "--header-name"),
        ({"ham_cutoff": 0.9, "spam_cutoff": 0.1}, "--ham-cutoff"),
        ({"ham_cutoff": -0.5}, "--ham-cutoff"),
        ({"spam_cutoff": 1.5}, "--spam-cutoff"),
    ],
)
def test_build_stage_names_the_bad_flag(kwargs: dict[str, object], flag: str) -> None:
    args: dict[str, object] = {"db": None, **kwargs}
    with pytest.raises(ConfigError) as info:
        build_stage(**args)  # type: ignore[arg-type]
    assert f"--{info.value.key}" == flag


def test_build_stage_labels_with_the_given_settings(tmp_path: Path) -> None:
    path = tmp_path / "spam.db"
    small_db().save(path)
    stage = build_stage(str(path), "X-Label", True, 0.1, 0.9)
    label, _, detail = stage.judge(spammy(random.Random(8)))
    assert label == "yes"
    assert detail.startswith("score=")
    assert stage.fields(label, detail).startswith(b"X-Label: yes\r\nX-Label-Detail: score=")
    assert stage.db_path == str(path)
    # None: the database shipped with poste (trained on 500 spam)
    assert build_stage(None).classifier.db.nspam == 500
