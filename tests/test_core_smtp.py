"""The SMTP service core: protocol, limits, smuggling, STARTTLS, cut-through."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from poste.smtp.client import SMTPHop
from poste.smtp.server import Limits
from poste.smtp.stage import Envelope, Reply, Stage
from poste.smtp.tls import self_signed, server_context
from support.smtp import LineClient, mailbox_server, running
from support.standin import reserve_common_port


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    self_signed(d / "cert.pem", d / "key.pem", "test.poste")
    return d / "cert.pem", d / "key.pem"


def mails(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.eml"), key=lambda p: int(p.stem))]


def body_of(mail: bytes) -> bytes:
    return mail.split(b"\r\n\r\n", 1)[1]


async def hello(client: LineClient) -> None:
    assert (await client.reply()).startswith("220")
    assert (await client.cmd("EHLO client.test")).startswith("250")


async def test_ehlo_advertises_extensions(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    ctx = server_context(*tls_files)
    async with mailbox_server(tmp_path, tls_context=ctx) as (service, _):
        c = await LineClient.connect(*service.sockname)
        await c.reply()
        ehlo = await c.cmd("EHLO client.test")
        for ext in ("PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 26214400", "ENHANCEDSTATUSCODES",
                    "STARTTLS"):
            assert f"250-{ext}" in ehlo or f"250 {ext}" in ehlo, ext
        assert "AUTH" not in ehlo
        assert (await c.cmd("NOOP")).startswith("250 2.0.0")
        assert (await c.cmd("VRFY root")).startswith("252")
        assert (await c.cmd("RSET")).startswith("250")
        assert (await c.cmd("QUIT")).startswith("221")
        await c.close()


async def test_no_starttls_without_certificate(tmp_path: Path) -> None:
    async with mailbox_server(tmp_path) as (service, _):
        c = await LineClient.connect(*service.sockname)
        await c.reply()
        assert "STARTTLS" not in await c.cmd("EHLO client.test")
        await c.close()


async def test_several_transactions_and_dot_unstuffing(tmp_path: Path) -> None:
    wire = b"..leading dot\r\n..\r\n...\r\n. space\r\nend\r\n"
    unstuffed = b".leading dot\r\n.\r\n..\r\n space\r\nend\r\n"
    async with mailbox_server(tmp_path) as (service, _):
        c = await LineClient.connect(*service.sockname)
        await hello(c)
        for i in range(3):
            assert (await c.cmd(f"MAIL FROM:<a{i}@x.test>")).startswith("250 2.1.0")
            assert (await c.cmd("RCPT TO:<b@y.test>")).startswith("250")
            assert (await c.cmd("DATA")).startswith("354")
            await c.send(b"Subject: t\r\n\r\n" + wire + b".\r\n")
            assert (await c.reply()).startswith("250")
        await c.cmd("QUIT")
        await c.close()
    got = mails(tmp_path)
    assert len(got) == 3
    for m in got:
        assert body_of(m) == unstuffed


@pytest.mark.parametrize(
    "vector",
    [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"],
    ids=["LF.LF", "CR.CR", "CRLF.LF", "LF.CRLF", "CRLF-NUL.CRLF", "CRLF.NUL-CRLF"],
)
async def test_smuggling_never_splits_a_message(tmp_path: Path, vector: bytes) -> None:
    smuggled = (
        b"Subject: one\r\n\r\nfirst" + vector
        + b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
        + b"Subject: smuggled\r\n\r\nforged\r\n.\r\n"
    )
    async with mailbox_server(tmp_path) as (service, _):
        c = await LineClient.connect(*service.sockname)
        await hello(c)
        await c.cmd("MAIL FROM:<a@x.test>")
        await c.cmd("RCPT TO:<b@y.test>")
        assert (await c.cmd("DATA")).startswith("354")
        await c.send(smuggled)
        first = await c.reply()
        # The message is refused as a whole (bare CR/LF, NUL), and nothing follows it.
        assert first.startswith("550 5.6.0"), first
        # The connection stays sane: a clean mail after it goes through.
        assert (await c.cmd("MAIL FROM:<a@x.test>")).startswith("250")
        assert (await c.cmd("RCPT TO:<b@y.test>")).startswith("250")
        await c.cmd("DATA")
        await c.send(b"Subject: clean\r\n\r\nok\r\n.\r\n")
        assert (await c.reply()).startswith("250")
        await c.close()
    got = mails(tmp_path)
    assert len(got) == 1
    assert b"Subject: clean" in got[0] and b"smuggled" not in got[0]


async def test_starttls_discards_pipelined_commands(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    async with mailbox_server(tmp_path, tls_context=server_context(*tls_files)) as (service, _):
        c = await LineClient.connect(*service.sockname)
        await hello(c)
        await c.send(b"STARTTLS\r\nRSET\r\n")
        assert (await c.reply()).startswith("220")
        await c.starttls()
        # If the injected RSET were run inside TLS, its 250 would come before our EHLO reply.
        reply = await c.cmd("EHLO client.test")
        assert reply.startswith("250-test.poste"), reply
        assert "STARTTLS" not in reply
        assert (await c.cmd("NOOP")).startswith("250 2.0.0")
        await c.close()


async def test_require_tls(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    ctx = server_context(*tls_files)
    async with mailbox_server(tmp_path, tls_context=ctx, require_tls=True) as (service, _):
        c = await LineClient.connect(*service.sockname)
        await hello(c)
        assert (await c.cmd("MAIL FROM:<a@x.test>")).startswith("530")
        await c.cmd("STARTTLS")
        await c.starttls()
        await c.cmd("EHLO client.test")
        assert (await c.cmd("MAIL FROM:<a@x.test>")).startswith("250")
        await c.close()


async def test_oversize_and_overlong_lines_keep_connection(tmp_path: Path) -> None:
    limits = Limits(max_message_size=10_000)
    async with mailbox_server(tmp_path, limits=limits) as (service, _):
        c = await LineClient.connect(*service.sockname)
        await hello(c)
        # A command line over 512 octets.
        assert (await c.cmd("MAIL FROM:<" + "a" * 600 + "@x.test>")).startswith("500")
        # SIZE= announced too big.
        assert (await c.cmd("MAIL FROM:<a@x.test> SIZE=20000")).startswith("552")
        # A message too big.
        await c.cmd("MAIL FROM:<a@x.test>")
        await c.cmd("RCPT TO:<b@y.test>")
        await c.cmd("DATA")
        await c.send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 200 + b".\r\n")
        assert (await c.reply()).startswith("552 5.3.4")
        # A text line over 1000 octets, and one far over the reader's buffer.
        for n in (1001, 70_000):
            await c.cmd("MAIL FROM:<a@x.test>")
            await c.cmd("RCPT TO:<b@y.test>")
            await c.cmd("DATA")
            await c.send(b"Subject: long\r\n\r\n" + b"y" * n + b"\r\n.\r\n")
            assert (await c.reply()).startswith("500 5.5.2"), n
        # Still usable.
        await c.cmd("MAIL FROM:<a@x.test>")
        await c.cmd("RCPT TO:<b@y.test>")
        await c.cmd("DATA")
        await c.send(b"Subject: fine\r\n\r\n" + b"z" * 998 + b"\r\n.\r\n")
        assert (await c.reply()).startswith("250")
        await c.close()
    got = mails(tmp_path)
    assert len(got) == 1 and b"z" * 998 + b"\r\n" in got[0]


async def test_recipient_limit(tmp_path: Path) -> None:
    async with mailbox_server(tmp_path, limits=Limits(max_recipients=3)) as (service, _):
        c = await LineClient.connect(*service.sockname)
        await hello(c)
        await c.cmd("MAIL FROM:<a@x.test>")
        for i in range(3):
            assert (await c.cmd(f"RCPT TO:<b{i}@y.test>")).startswith("250")
        assert (await c.cmd("RCPT TO:<b9@y.test>")).startswith("452 4.5.3")
        await c.close()


async def test_bad_commands_close_the_connection(tmp_path: Path) -> None:
    async with mailbox_server(tmp_path, limits=Limits(max_bad_commands=3)) as (service, _):
        c = await LineClient.connect(*service.sockname)
        await hello(c)
        for _ in range(3):
            assert (await c.cmd("MAIL FROM:")).startswith("501")
        assert (await c.cmd("RCPT TO:<x@y>")).startswith("503")
        assert (await c.reply()).startswith("421 4.7.0")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await c.cmd("NOOP")


async def test_connection_cap(tmp_path: Path) -> None:
    async with mailbox_server(tmp_path, limits=Limits(max_connections=2)) as (service, _):
        a = await LineClient.connect(*service.sockname)
        b = await LineClient.connect(*service.sockname)
        assert (await a.reply()).startswith("220")
        assert (await b.reply()).startswith("220")
        c = await LineClient.connect(*service.sockname)
        assert (await c.reply()).startswith("421 4.7.0")
        await a.cmd("QUIT")
        await a.close()
        await asyncio.sleep(0.1)
        d = await LineClient.connect(*service.sockname)
        assert (await d.reply()).startswith("220")
        for x in (b, c, d):
            await x.close()


async def test_idle_timeout(tmp_path: Path) -> None:
    async with mailbox_server(tmp_path, limits=Limits(idle_timeout=0.5)) as (service, _):
        c = await LineClient.connect(*service.sockname)
        await c.reply()
        assert (await c.reply(timeout=5)).startswith("421 4.4.2")
        await c.close()


async def test_idle_timeout_counts_from_the_last_command(tmp_path: Path) -> None:
    """The idle timer is moved, not remade, per command (server.py `_reset_timeout`): a
    client that keeps talking past the first timer's time is answered, then cut once idle."""
    async with mailbox_server(tmp_path, limits=Limits(idle_timeout=1.0)) as (service, _):
        c = await LineClient.connect(*service.sockname)
        await hello(c)
        for _ in range(15):  # 1.5 s of commands: the first timer fires in the middle
            assert (await c.cmd("NOOP")).startswith("250")
            await asyncio.sleep(0.1)
        assert (await c.reply(timeout=10)).startswith("421 4.4.2")
        await c.close()


class RejectSome(Stage):
    name = "reject-some"

    async def on_rcpt(self, env: Envelope, rcpt: str) -> Reply | None:
        if rcpt.startswith("bad"):
            return Reply(550, "5.1.1 No such user")
        if rcpt.startswith("later"):
            return Reply(450, "4.2.1 Try later")
        return None


async def test_cut_through_per_recipient_replies(tmp_path: Path) -> None:
    async with mailbox_server(tmp_path / "box") as (dest, _):
        hop = SMTPHop(*dest.sockname)
        async with running(RejectSome(), hop) as mid:
            # The front service accepts everything; the middle one rejects some.
            async with running(Stage(), SMTPHop(*mid.sockname)) as front:
                c = await LineClient.connect(*front.sockname)
                await hello(c)
                await c.cmd("MAIL FROM:<a@x.test>")
                assert (await c.cmd("RCPT TO:<good@y.test>")).startswith("250")
                assert (await c.cmd("RCPT TO:<bad@y.test>")).startswith("550 5.1.1")
                assert (await c.cmd("RCPT TO:<later@y.test>")).startswith("450 4.2.1")
                assert (await c.cmd("RCPT TO:<good2@y.test>")).startswith("250")
                await c.cmd("DATA")
                await c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
                assert (await c.reply()).startswith("250")
                await c.close()
    got = mails(tmp_path / "box")
    assert len(got) == 1
    assert b"Delivered-To: good@y.test\r\nDelivered-To: good2@y.test\r\n" in got[0]
    # Every hop prepended its Received:, newest on top.
    assert got[0].count(b"Received: ") == 3


async def test_next_hop_down_gives_451(tmp_path: Path) -> None:
    nothing = reserve_common_port(["127.0.0.1"])  # bound, not listening: refused
    port = nothing.port
    async with running(Stage(), SMTPHop("127.0.0.1", port, timeout=5)) as front:
        c = await LineClient.connect(*front.sockname)
        await hello(c)
        assert (await c.cmd("MAIL FROM:<a@x.test>")).startswith("250")
        reply = await c.cmd("RCPT TO:<b@y.test>")
        assert reply.startswith("451 4.4.1"), reply
        assert (await c.cmd("DATA")).startswith("503")
        await c.close()
    nothing.close()


async def test_next_hop_5xx_passed_back(tmp_path: Path) -> None:
    from poste.tools.srv import Mailbox, MailboxHop

    box = Mailbox(str(tmp_path) + "/", 0, False)
    refusing = MailboxHop(box, data_reply=Reply(554, "5.7.1 Message refused"))
    async with running(Stage(), refusing) as dest:
        async with running(Stage(), SMTPHop(*dest.sockname)) as front:
            c = await LineClient.connect(*front.sockname)
            await hello(c)
            await c.cmd("MAIL FROM:<a@x.test>")
            await c.cmd("RCPT TO:<b@y.test>")
            await c.cmd("DATA")
            await c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
            assert (await c.reply()).startswith("554 5.7.1")
            await c.close()
    assert mails(tmp_path) == []


async def test_next_hop_dies_mid_transaction(tmp_path: Path) -> None:
    async with mailbox_server(tmp_path / "box") as (dest, _):
        async with running(Stage(), SMTPHop(*dest.sockname, timeout=5)) as front:
            c = await LineClient.connect(*front.sockname)
            await hello(c)
            await c.cmd("MAIL FROM:<a@x.test>")
            assert (await c.cmd("RCPT TO:<b@y.test>")).startswith("250")
            await dest.stop()
            await c.cmd("DATA")
            await c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
            # The sender is told to keep the mail.
            assert (await c.reply()).startswith("451")
            await c.close()


class RefuseConnect(Stage):
    async def on_connect(self, env: Envelope) -> Reply | None:
        env.peer_name = "client.example"
        if env.peer_ip == "127.0.0.9":
            return Reply(554, "5.7.1 Not welcome")
        return None


async def test_on_connect_sees_peer_before_greeting(tmp_path: Path) -> None:
    from poste.tools.srv import Mailbox, MailboxHop

    box = Mailbox(str(tmp_path) + "/", 0, False)
    async with running(RefuseConnect(), MailboxHop(box), host="127.0.0.1") as service:
        reader, writer = await asyncio.open_connection(*service.sockname, local_addr=("127.0.0.9", 0))
        refused = LineClient(reader, writer)
        assert (await refused.reply()).startswith("554 5.7.1")
        await refused.close()
        c = await LineClient.connect(*service.sockname)
        await hello(c)
        await c.cmd("MAIL FROM:<a@x.test>")
        await c.cmd("RCPT TO:<b@y.test>")
        await c.cmd("DATA")
        await c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        assert (await c.reply()).startswith("250")
        await c.close()
    assert b"from client.test (client.example [127.0.0.1])" in mails(tmp_path)[0]


class Login(Stage):
    auth_required = True

    async def authenticate(self, env: Envelope, username: str, password: str) -> Reply | None:
        if (username, password) == ("joe", "secret"):
            return None
        return Reply(535, "5.7.8 Authentication credentials invalid")


async def test_auth_only_under_tls_and_no_foreign_authzid(
    tmp_path: Path, tls_files: tuple[Path, Path]
) -> None:
    import base64

    from poste.tools.srv import Mailbox, MailboxHop

    box = Mailbox(str(tmp_path) + "/", 0, False)
    ctx = server_context(*tls_files)
    async with running(Login(), MailboxHop(box), tls_context=ctx) as service:
        c = await LineClient.connect(*service.sockname)
        await c.reply()
        assert "AUTH" not in await c.cmd("EHLO client.test")
        assert (await c.cmd("AUTH PLAIN " + base64.b64encode(b"\0joe\0secret").decode()))[:1] == "5"
        await c.cmd("STARTTLS")
        await c.starttls()
        assert "250-AUTH LOGIN PLAIN" in await c.cmd("EHLO client.test")
        assert (await c.cmd("MAIL FROM:<joe@x.test>")).startswith("530")
        forged = base64.b64encode(b"admin\0joe\0secret").decode()
        assert (await c.cmd(f"AUTH PLAIN {forged}")).startswith("535")
        wrong = base64.b64encode(b"\0joe\0nope").decode()
        assert (await c.cmd(f"AUTH PLAIN {wrong}")).startswith("535 5.7.8")
        good = base64.b64encode(b"joe\0joe\0secret").decode()
        assert (await c.cmd(f"AUTH PLAIN {good}")).startswith("235")
        assert (await c.cmd("MAIL FROM:<joe@x.test>")).startswith("250")
        await c.close()


async def test_data_timeout(tmp_path: Path) -> None:
    async with mailbox_server(tmp_path, limits=Limits(idle_timeout=30, data_timeout=0.5)) as (
        service,
        _,
    ):
        c = await LineClient.connect(*service.sockname)
        await hello(c)
        await c.cmd("MAIL FROM:<a@x.test>")
        await c.cmd("RCPT TO:<b@y.test>")
        assert (await c.cmd("DATA")).startswith("354")
        await c.send(b"Subject: stalled\r\n\r\nhalf a mail\r\n")
        assert (await c.reply(timeout=10)).startswith("421 4.4.2")
        await c.close()
    assert mails(tmp_path) == []


async def test_control_characters_in_helo_refused(tmp_path: Path) -> None:
    async with mailbox_server(tmp_path) as (service, _):
        c = await LineClient.connect(*service.sockname)
        assert (await c.reply()).startswith("220")
        assert (await c.cmd_bytes(b"EHLO evil\x1b[2J.test")).startswith("501 5.5.4")
        assert (await c.cmd_bytes(b"HELO evil\x07.test")).startswith("501 5.5.4")
        assert (await c.cmd("EHLO client.test")).startswith("250")
        await c.close()
