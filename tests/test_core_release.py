"""Onward transactions are closed on every path: refused MAIL or RCPT, RSET, a lost
client, a failing stage.  Counted as a user of the next hop would: its open connections."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from poste.smtp.client import SMTPHop
from poste.smtp.message import Message
from poste.smtp.stage import Envelope, Reply, Stage, Verdict
from poste.tools.srv import Mailbox, MailboxHop
from support.smtp import LineClient, running


class NextHop(Stage):
    """The next service: refuses senders and recipients whose local part says so."""

    name = "next"

    async def on_mail(self, env: Envelope, sender: str) -> Reply | None:
        return Reply(550, "5.7.1 sender refused") if sender.startswith("refused") else None

    async def on_rcpt(self, env: Envelope, rcpt: str) -> Reply | None:
        return Reply(550, "5.1.1 no such user") if rcpt.startswith("nobody") else None


class Front(Stage):
    """A stage that fails with a bug when asked to (the onward transaction must still close)."""

    name = "front"

    async def on_rcpt(self, env: Envelope, rcpt: str) -> Reply | None:
        return None

    async def on_data(self, env: Envelope, message: Message) -> Verdict:
        if b"crash" in message.to_bytes():
            raise RuntimeError("a bug in the stage")
        return Verdict()


def sink(folder: Path) -> MailboxHop:
    return MailboxHop(Mailbox(str(folder) + "/", 0, with_data=True))


async def settle(count: object, want: int = 0, timeout: float = 10.0) -> int:
    """The next hop's open connections, once the background aborts have run."""
    assert callable(count)
    deadline = asyncio.get_running_loop().time() + timeout
    # polled: a connection count has no event to wait on
    while (n := count()) != want and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    return int(n)


@pytest.mark.parametrize("cycle", ["refused-sender", "refused-rcpt", "rset", "crash"])
async def test_no_connection_left_at_the_next_hop(cycle: str, tmp_path: Path) -> None:
    async with running(NextHop(), sink(tmp_path)) as nxt, running(
        Front(), SMTPHop(*nxt.sockname)
    ) as front:
        def open_at_next() -> int:
            return len(nxt.connections)

        c = await LineClient.connect(*front.sockname)
        assert (await c.reply()).startswith("220")
        assert (await c.cmd("EHLO client.test")).startswith("250")
        for i in range(200):
            if cycle == "refused-sender":
                assert (await c.cmd(f"MAIL FROM:<refused{i}@x.test>")).startswith("250")
                assert (await c.cmd("RCPT TO:<a@b.test>")).startswith("550 5.7.1")
            elif cycle == "refused-rcpt":
                assert (await c.cmd(f"MAIL FROM:<s{i}@x.test>")).startswith("250")
                assert (await c.cmd("RCPT TO:<nobody@b.test>")).startswith("550 5.1.1")
            elif cycle == "rset":
                assert (await c.cmd(f"MAIL FROM:<s{i}@x.test>")).startswith("250")
                assert (await c.cmd("RCPT TO:<a@b.test>")).startswith("250")
            else:
                assert (await c.cmd(f"MAIL FROM:<s{i}@x.test>")).startswith("250")
                assert (await c.cmd("RCPT TO:<a@b.test>")).startswith("250")
                assert (await c.cmd("DATA")).startswith("354")
                assert (await c.cmd("Subject: crash\r\n\r\ncrash\r\n.")).startswith("451")
            assert (await c.cmd("RSET")).startswith("250")
        assert await settle(open_at_next) == 0
        # and the session is still good for a real mail
        assert (await c.cmd("MAIL FROM:<s@x.test>")).startswith("250")
        assert (await c.cmd("RCPT TO:<a@b.test>")).startswith("250")
        assert (await c.cmd("DATA")).startswith("354")
        assert (await c.cmd("Subject: ok\r\n\r\nok\r\n.")).startswith("250")
        await c.cmd("QUIT")
        await c.close()
        assert await settle(open_at_next) == 0


async def test_client_gone_mid_transaction_closes_onward(tmp_path: Path) -> None:
    async with running(NextHop(), sink(tmp_path)) as nxt, running(
        Front(), SMTPHop(*nxt.sockname)
    ) as front:
        for _ in range(50):
            c = await LineClient.connect(*front.sockname)
            await c.reply()
            await c.cmd("EHLO client.test")
            await c.cmd("MAIL FROM:<s@x.test>")
            assert (await c.cmd("RCPT TO:<a@b.test>")).startswith("250")
            c.writer.transport.abort()  # no QUIT, no RSET: the line just drops
        assert await settle(lambda: len(nxt.connections)) == 0


async def _one_mail(c: LineClient, i: int) -> str:
    assert (await c.cmd(f"MAIL FROM:<s{i}@x.test>")).startswith("250")
    assert (await c.cmd("RCPT TO:<a@b.test>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    return await c.cmd(f"Subject: {i}\r\n\r\nmail {i}\r\n.")


async def test_kept_sessions_are_reused_bounded_and_closed(tmp_path: Path) -> None:
    """SMTPHop(keep=N): one session at the next hop carries mail after mail, an
    abandoned transaction is RSET before its session is kept, no more than N stay
    open, a session the next hop closed is replaced, and stopping closes them."""
    box = tmp_path / "box"
    async with running(NextHop(), sink(box)) as nxt:
        hop = SMTPHop(*nxt.sockname, keep=2)
        async with running(Front(), hop) as front:
            def open_at_next() -> int:
                return len(nxt.connections)

            c = await LineClient.connect(*front.sockname)
            assert (await c.reply()).startswith("220")
            assert (await c.cmd("EHLO client.test")).startswith("250")
            seen: set[object] = set()
            for i in range(20):
                assert (await _one_mail(c, i)).startswith("250")
                seen |= set(nxt.connections)
            assert len(seen) == 1  # one session at the next hop for all twenty
            # abandoned transactions: RSET, kept, still one session
            for i in range(20):
                assert (await c.cmd(f"MAIL FROM:<r{i}@x.test>")).startswith("250")
                assert (await c.cmd("RCPT TO:<a@b.test>")).startswith("250")
                assert (await c.cmd("RSET")).startswith("250")
            assert await settle(open_at_next, 1) == 1
            # the next hop closes the kept session: the next mail takes a new one
            for conn in list(nxt.connections):
                assert conn.transport is not None
                conn.transport.close()
            assert await settle(open_at_next, 0) == 0
            assert (await _one_mail(c, 100)).startswith("250")
            # five clients at once: five sessions, then at most two kept
            clients = [await LineClient.connect(*front.sockname) for _ in range(5)]
            for k in clients:
                await k.reply()
                await k.cmd("EHLO client.test")
            for k in clients:
                assert (await k.cmd("MAIL FROM:<p@x.test>")).startswith("250")
                assert (await k.cmd("RCPT TO:<a@b.test>")).startswith("250")
            assert open_at_next() >= 5
            for k in clients:
                assert (await k.cmd("DATA")).startswith("354")
                assert (await k.cmd("Subject: p\r\n\r\np\r\n.")).startswith("250")
                await k.cmd("QUIT")
                await k.close()
            assert await settle(open_at_next, 2) == 2
            await c.cmd("QUIT")
            await c.close()
        assert await settle(open_at_next, 0) == 0  # the front stopped: its sessions closed
    assert len(list(box.glob("*"))) >= 26
