"""MAIL FROM / RCPT TO paths: parsed strictly once, and sent on byte for byte.

The open relay of issue 15 came from the gap between the address a service
checked and the address its SMTP client wrote on the next hop.  These tests
talk raw bytes to a real listener whose next hop is a recording SMTP server,
and compare what the stage checked with what reached the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from poste.smtp.address import AddressError, parse_path, quote_local, unquote_local
from poste.smtp.client import SMTPHop
from poste.smtp.stage import Envelope, Reply, Stage
from support.smtp import LineClient, running

# (path as the client writes it, the address every stage sees and every hop is sent)
VALID = [
    ("<a@b.test>", "a@b.test"),
    ('<"john doe"@b.test>', '"john doe"@b.test'),
    ('<"x\\"y"@b.test>', '"x\\"y"@b.test'),
    ('<"x\\\\y"@b.test>', '"x\\\\y"@b.test'),
    ('<"a@b"@c.test>', '"a@b"@c.test'),
    ('<"<victim@other.test>"@b.test>', '"<victim@other.test>"@b.test'),
    ('<""@b.test>', '""@b.test'),
    ("<!#$%&'*+-/=?^_`{|}~@b.test>", "!#$%&'*+-/=?^_`{|}~@b.test"),
    ("<u@[127.0.0.1]>", "u@[127.0.0.1]"),
    ("<u@[IPv6:2001:db8::1]>", "u@[IPv6:2001:db8::1]"),
    ("<U.Ser@B.Test>", "U.Ser@B.Test"),
    ("<@relay.test,@r2.test:u@b.test>", "u@b.test"),  # source route: dropped (RFC 5321 C)
    ("u@b.test", "u@b.test"),  # no brackets: old clients
    ("<jöhn@exämple.test>", "jöhn@exämple.test"),
]

# Each must be refused at the command, never seen by a stage nor sent on.
INVALID = [
    b'<"victim@other.test\r"@our.test>',
    b'<"x\r<victim@other.test>"@our.test>',
    b'<"victim@other.test\x00"@our.test>',
    b"<victim@other.test\x00@our.test>",
    b'<"x\x1b[2J"@our.test>',
    b'<"x\x7f"@our.test>',
    b'<"x\\"@our.test>',  # unterminated quote
    b"<a b@our.test>",
    b"<a@our.test.>",
    b"<a@our..test>",
    b"<a@[1.2.3]>",
    b"<(comment)a@our.test>",
    b"<a@our.test>junk",
    b"<a@our.test",
    b'<"\xff"@our.test>',  # not UTF-8
]


@pytest.mark.parametrize(("path", "address"), VALID)
def test_parse_valid(path: str, address: str) -> None:
    got, rest = parse_path(path + " SIZE=1", recipient=True)
    assert got is not None and got.text == address and rest == " SIZE=1"


@pytest.mark.parametrize("path", INVALID)
def test_parse_invalid(path: bytes) -> None:
    with pytest.raises(AddressError):
        parse_path(path.decode("utf-8", "surrogateescape"), recipient=True)


def test_null_and_postmaster() -> None:
    assert parse_path("<>", recipient=False) == (None, "")
    with pytest.raises(AddressError):
        parse_path("<>", recipient=True)
    got, _ = parse_path("<Postmaster>", recipient=True)
    assert got is not None and got.text == "Postmaster" and got.domain == ""
    with pytest.raises(AddressError):
        parse_path("<Postmaster>", recipient=False)


def test_quote_roundtrip() -> None:
    for content in ["john doe", 'a"b\\c', "plain", "SRS0=HH=TT=x.test=john doe", ""]:
        assert unquote_local(quote_local(content)) == content
        parse_path(f"<{quote_local(content)}@x.test>", recipient=True)


class Recorder:
    """A next hop that answers 250 to everything and keeps every command line as bytes."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 recorder ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-recorder\r\n250-SMTPUTF8\r\n250-8BITMIME\r\n250 SIZE\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 stored\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                if verb in (b"MAIL", b"RCPT"):
                    self.lines.append(line)
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()


class Checking(Stage):
    """Keeps what it was asked to judge, as a verifier would check it."""

    name = "checking"

    def __init__(self) -> None:
        self.senders: list[str] = []
        self.rcpts: list[str] = []

    async def on_mail(self, env: Envelope, sender: str) -> Reply | None:
        self.senders.append(sender)
        return None

    async def on_rcpt(self, env: Envelope, rcpt: str) -> Reply | None:
        self.rcpts.append(rcpt)
        return None


@asynccontextmanager
async def chain() -> AsyncIterator[tuple[LineClient, Checking, Recorder]]:
    rec = Recorder()
    server = await asyncio.start_server(rec.session, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stage = Checking()
    async with running(stage, SMTPHop("127.0.0.1", port)) as service:
        client = await LineClient.connect(*service.sockname)
        assert (await client.reply()).startswith("220")
        assert (await client.cmd("EHLO client.test")).startswith("250")
        try:
            yield client, stage, rec
        finally:
            await client.close()
            server.close()
            await server.wait_closed()


async def test_checked_address_is_sent_address() -> None:
    async with chain() as (client, stage, rec):
        for path, _address in VALID:
            utf8 = b"" if path.isascii() else b" SMTPUTF8"
            r = await client.cmd_bytes(b"MAIL FROM:" + path.encode() + utf8)
            assert r.startswith("250"), (path, r)
            r = await client.cmd_bytes(b"RCPT TO:" + path.encode())
            assert r.startswith("250"), (path, r)
            assert (await client.cmd("DATA")).startswith("354")
            assert (await client.cmd("Subject: x\r\n\r\nbody\r\n.")).startswith("250")
        await client.cmd("QUIT")
    want_mail = [s.encode() for s in stage.senders]
    want_rcpt = [s.encode() for s in stage.rcpts]
    assert stage.senders == [a for _, a in VALID] == stage.rcpts
    got_mail = [line.split(b"<", 1)[1].rsplit(b">", 1)[0] for line in rec.lines
                if line.startswith(b"MAIL")]
    got_rcpt = [line.split(b"<", 1)[1].rsplit(b">", 1)[0] for line in rec.lines
                if line.startswith(b"RCPT")]
    assert got_mail == want_mail and got_rcpt == want_rcpt


async def test_null_sender_passes_as_null() -> None:
    async with chain() as (client, stage, rec):
        assert (await client.cmd("MAIL FROM:<>")).startswith("250")
        assert (await client.cmd("RCPT TO:<a@b.test>")).startswith("250")
        await client.cmd("QUIT")
    assert stage.senders == [""]
    assert rec.lines[0] == b"MAIL FROM:<>\r\n"


@pytest.mark.parametrize("path", INVALID)
async def test_bad_paths_refused_at_the_command(path: bytes) -> None:
    async with chain() as (client, stage, rec):
        r = await client.cmd_bytes(b"MAIL FROM:" + path)
        assert r[:1] == "5", (path, r)
        assert (await client.cmd("MAIL FROM:<a@b.test>")).startswith("250")
        r = await client.cmd_bytes(b"RCPT TO:" + path)
        assert r[:1] == "5", (path, r)
        # the connection stays sane: a good recipient still works
        assert (await client.cmd("RCPT TO:<ok@b.test>")).startswith("250")
        await client.cmd("QUIT")
    assert stage.senders == ["a@b.test"] and stage.rcpts == ["ok@b.test"]
    assert rec.lines == [b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<ok@b.test>\r\n"]


async def test_non_ascii_needs_smtputf8() -> None:
    async with chain() as (client, stage, _):
        assert (await client.cmd("MAIL FROM:<jöhn@b.test>")).startswith("553 5.6.7")
        assert (await client.cmd("MAIL FROM:<a@b.test>")).startswith("250")
        assert (await client.cmd("RCPT TO:<jöhn@b.test>")).startswith("553 5.6.7")
        await client.cmd("QUIT")
    assert stage.senders == ["a@b.test"] and stage.rcpts == []
