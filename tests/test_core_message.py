"""A mail in bounded memory: spilled to a file past the threshold, sent on byte for byte."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from poste.smtp.client import SMTPHop
from poste.smtp.message import BodyWriter, Budget, Message
from poste.smtp.server import Limits
from poste.smtp.stage import Envelope, Stage, Verdict
from support.smtp import LineClient, mailbox_server, running


def tricky_lines(n: int) -> list[bytes]:
    """Lines a sender stuffs (leading dots), long ones, 8-bit ones, empty ones."""
    out = [b"From: a@sender.test\r\n", b"Subject: big\r\n", b"\r\n"]
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out.append(b".leading dot %d\r\n" % i)
        elif kind == 1:
            out.append(b"x" * 990 + b"\r\n")
        elif kind == 2:
            out.append(f"caf\u00e9 {i}\r\n".encode())
        elif kind == 3:
            out.append(b"\r\n")
        else:
            out.append(b"..two dots\r\n")
    return out


async def send_lines(where: tuple[str, int], lines: list[bytes], mail_params: str = "") -> None:
    """One mail of `lines` in one session, dot-stuffed as a client must; its 250 asserted."""
    c = await LineClient.connect(*where)
    assert (await c.reply()).startswith("220")
    await c.cmd("EHLO client.test")
    assert (await c.cmd(f"MAIL FROM:<a@sender.test>{mail_params}")).startswith("250")
    assert (await c.cmd("RCPT TO:<b@our.test>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    stuffed = (b"." + line if line.startswith(b".") else line for line in lines)
    await c.send(b"".join(stuffed) + b".\r\n")
    reply = await c.reply(timeout=60)
    assert reply.startswith("250"), reply
    await c.cmd("QUIT")
    await c.close()


def written(lines: list[bytes], spill_at: int, folder: Path) -> Message:
    body = BodyWriter(spill_at, str(folder))
    for line in lines:
        body.write(line)
    return body.finish()


def test_small_mail_stays_in_memory(tmp_path: Path) -> None:
    lines = tricky_lines(10)
    m = written(lines, 1 << 20, tmp_path)
    assert m.in_memory and m.to_bytes() == b"".join(lines)


def test_big_mail_goes_to_an_anonymous_file(tmp_path: Path) -> None:
    lines = tricky_lines(5000)  # about 1 MB
    m = written(lines, 64 * 1024, tmp_path)
    assert not m.in_memory
    assert list(tmp_path.iterdir()) == []  # no name on disk: a crash leaves nothing
    assert m.size == sum(map(len, lines))
    assert m.to_bytes() == b"".join(lines)
    assert m.header() == b"From: a@sender.test\r\nSubject: big\r\n\r\n"
    assert not m.isascii()
    top = m.prepend(b"X-Top: 1\r\n")
    assert top.to_bytes() == b"X-Top: 1\r\n" + b"".join(lines)
    assert top.head(12) == b"X-Top: 1\r\nFr"
    m.close()


def test_pieces_start_at_line_starts(tmp_path: Path) -> None:
    lines = tricky_lines(3000)
    whole = b"".join(lines)
    for m in (written(lines, 1024, tmp_path), Message.of(whole)):
        pieces = list(m.chunks(size=1500))  # shorter than some lines
        assert b"".join(pieces) == whole
        assert all(p.endswith(b"\n") for p in pieces)
        assert len(pieces) > 100
    no_end = Message.of(b"a\r\nno line end")
    assert b"".join(no_end.chunks(4)) == b"a\r\nno line end"


async def test_budget_is_first_come_first_served() -> None:
    budget = Budget(100)
    order: list[str] = []

    async def hold(name: str, n: int) -> None:
        await budget.acquire(n)
        order.append(name)
        await asyncio.sleep(0.01)
        budget.release(n)

    await budget.acquire(60)
    waiting = [asyncio.create_task(hold("big", 500)), asyncio.create_task(hold("small", 10))]
    await asyncio.sleep(0.01)
    assert order == []  # the big one is first in line and waits for all of it
    budget.release(60)
    await asyncio.gather(*waiting)
    assert order == ["big", "small"] and budget.used == 0


async def test_a_spilled_mail_is_sent_on_byte_for_byte(tmp_path: Path) -> None:
    """Through a service that spills, its SMTP hop and a mailbox: the same bytes, no file left."""
    lines = tricky_lines(12000)  # about 2.4 MB, far past the spill threshold below
    spill = tmp_path / "spill"
    spill.mkdir()
    limits = Limits(spill_at=256 * 1024, spill_dir=str(spill))
    async with mailbox_server(tmp_path / "box") as (dest, _):
        async with running(Stage(), SMTPHop(*dest.sockname), limits=limits) as front:
            await send_lines(front.sockname, lines, " BODY=8BITMIME")
    stored = (tmp_path / "box" / "1.eml").read_bytes()
    assert stored.endswith(b"".join(lines))
    assert os.listdir(spill) == []


FOLDED = (b"Received: from x\r\n\tby y; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
          b"from: Alice\r\n <alice@sender.test>\r\nSubject: s\r\nReply-From: no\r\n\r\n")


def test_replace_field_in_memory_keeps_everything_else() -> None:
    body = b"first line\r\nFrom: not a header field\r\n"
    m = Message.of(FOLDED + body).prepend(b"X-Top: 1\r\n")
    new = m.replace_field(b"From", b"From: Bob <bob@our.test>\r\n")
    want = (b"X-Top: 1\r\nReceived: from x\r\n\tby y; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            b"From: Bob <bob@our.test>\r\nSubject: s\r\nReply-From: no\r\n\r\n" + body)
    assert new.to_bytes() == want and b"".join(new.chunks()) == want
    assert new.size == len(want)
    assert new.header() == want[: want.index(b"\r\n\r\n") + 4]
    assert new.head(9) == b"X-Top: 1\r"
    # prepending on top of a rewritten mail, and a second rewrite of it
    again = new.prepend(b"X-More: 2\r\n").replace_field(b"subject", b"Subject: t\r\n")
    assert again.to_bytes() == b"X-More: 2\r\n" + want.replace(b"Subject: s", b"Subject: t")
    assert m.to_bytes() == b"X-Top: 1\r\n" + FOLDED + body  # the original view is untouched


def test_replace_field_of_a_spilled_mail_shares_its_file(tmp_path: Path) -> None:
    lines = [FOLDED, *tricky_lines(5000)[3:]]  # about 1 MB below the header
    m = written(lines, 64 * 1024, tmp_path)
    assert not m.in_memory
    new = m.replace_field(b"From", b"From: Bob <bob@our.test>\r\n")
    assert not new.in_memory  # the body is still the file, not a copy
    assert len(new.prefix) < 200  # only the header was copied
    want = b"".join(lines).replace(b"from: Alice\r\n <alice@sender.test>\r\n",
                                   b"From: Bob <bob@our.test>\r\n", 1)
    assert new.to_bytes() == want
    assert all(p.endswith(b"\n") for p in list(new.chunks(4096))[:-1])
    assert new.size == len(want)


def test_replace_field_refuses_what_is_not_there() -> None:
    import pytest

    with pytest.raises(KeyError):
        Message.of(b"Subject: s\r\n\r\nFrom: x\r\n").replace_field(b"From", b"From: y\r\n")
    with pytest.raises(KeyError):  # no end of the header: nothing can be replaced safely
        Message.of(b"From: x\r\nSubject: s\r\n").replace_field(b"From", b"From: y\r\n")


class _Seen(Stage):
    """A stage that notes whether the DATA reader vouched for each body."""

    def __init__(self) -> None:
        self.clean: list[bool] = []

    async def on_data(self, env: Envelope, message: Message) -> Verdict:
        self.clean.append(message.wire_clean)
        return Verdict()


async def test_a_clean_body_goes_on_unscanned_and_unchanged(tmp_path: Path) -> None:
    """Two poste hops and a mailbox: a body without a dot-stuffed line is passed on as
    it came (no scan), one with dots is stuffed again; both arrive byte for byte, in
    memory and spilled."""
    plain = [b"From: a@sender.test\r\n", b"Subject: big\r\n", b"\r\n"] + [
        b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo%06d\r\n" % i for i in range(30000)]
    dotted = [*plain[:-1], b".a dot at the very end\r\n"]
    spill = tmp_path / "spill"
    spill.mkdir()
    limits = Limits(spill_at=256 * 1024, spill_dir=str(spill))
    first, second = _Seen(), _Seen()
    sent = []
    async with mailbox_server(tmp_path / "box") as (dest, _):
        async with running(second, SMTPHop(*dest.sockname, keep=2), limits=limits) as middle, \
                running(first, SMTPHop(*middle.sockname, keep=2)) as front:
            for lines in (plain, dotted, plain[:40], dotted[:40] + dotted[-1:]):
                await send_lines(front.sockname, lines)
                sent.append(b"".join(lines))
    assert first.clean == second.clean == [True, False, True, False]
    for i, body in enumerate(sent, 1):
        stored = (tmp_path / "box" / f"{i}.eml").read_bytes()
        assert stored.endswith(body)
        assert stored.count(b"\r\n") == stored.count(b"\n")


def test_wire_chunks_stuff_what_is_not_vouched_for() -> None:
    m = Message.of(b"a\r\n.b\r\nbare\nlf\r\n").prepend(b"X-Top: .1\r\n")
    assert not m.wire_clean
    assert b"".join(m.wire_chunks()) == b"X-Top: .1\r\na\r\n..b\r\nbare\r\nlf\r\n"
