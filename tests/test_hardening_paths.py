"""Issue 15's address attacks and address forms, through the whole inbound path.

Both topologies: verifier -> spamfilter -> relay as separate processes talking
SMTP on loopback (where the open relay was), and `poste up`.  A real DNS
server (knot) serves x25519.test (ours), gmail.test (the forwarded user's
mailbox) and outlook.test (the foreign victim); `poste srv` stands in for
both MX hosts, so "reached a foreign mailbox" is a file in outlook's folder.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.loop_world import GMAIL_IP, World, inbound
from support.relay_env import return_path
from support.smtp import LineClient

pytestmark = pytest.mark.slow

OURS = "x25519.test"
FORWARDED = f"login@{OURS}"  # -> login@gmail.test

# Relay attacks: CR, LF, NUL inside quoted local parts, in RCPT and in MAIL.
RCPT_ATTACKS = [
    b'<"victim@outlook.test\r"@x25519.test>',
    b'<"x\r<victim@outlook.test>"@x25519.test>',
    b'<"victim@outlook.test\x00"@x25519.test>',
    b'<"x\x00<victim@outlook.test>"@x25519.test>',
    b"<victim@outlook.test\x00@x25519.test>",
    b'<"victim@outlook.test\r\n"@x25519.test>',
    b'<"x\n<victim@outlook.test>"@x25519.test>',
    b'<"victim@outlook.test"@x25519.test\r>',
]
MAIL_ATTACKS = [
    b'<"x\r<ceo@outlook.test>"@gmail.test>',
    b'<"x\x00<ceo@outlook.test>"@gmail.test>',
    b'<"ceo@outlook.test\r"@gmail.test>',
    b'<"x\n<ceo@outlook.test>"@gmail.test>',
]

# Sender forms a forwarded user must get mail from (each accepted with 250 must arrive).
FORMS = [
    "<>",
    "<a@gmail.test>",
    '<"john doe"@gmail.test>',
    '<"x\\"y"@gmail.test>',
    '<"x\\\\y"@gmail.test>',
    '<"a@b"@gmail.test>',
    '<"<victim@outlook.test>"@gmail.test>',
    '<"john"@gmail.test>',
    '<""@gmail.test>',
    "<a.b.c@gmail.test>",
    "<a+tag@gmail.test>",
    "<!#$%&'*+-/=?^_`{|}~@gmail.test>",
    f"<user@[{GMAIL_IP}]>",
    "<user@[IPv6:::1]>",
    f'<"x y"@[{GMAIL_IP}]>',
    "<jöhn@gmail.test>",
    '<"jöhn doe"@gmail.test>',
    "<user@bücher.test>",
    "<user@xn--bcher-kva.test>",
    "<USER@GMAIL.TEST>",
    "<@relay.test:user@gmail.test>",
    "<@a.test,@b.test:user@gmail.test>",
    "user@gmail.test",
    '<"a very long quoted local part with spaces that makes the SRS form long"@gmail.test>',
    "<" + "l" * 64 + "@gmail.test>",
    '<"\\ "@gmail.test>',
    '<"()<>[]:,;@"@gmail.test>',
    "<a-b_c@sub.gmail.test>",
    "<SRS0=abcd=TT=foo.test=bar@gmail.test>",
    '<"SRS0=x=y=z= w"@gmail.test>',
    "<postmaster@gmail.test>",
    "<x@outlook.test>",
]


@pytest.fixture(params=["separate", "up"])
def stack(request: pytest.FixtureRequest, tmp_path: Path,
          poste_bin: str) -> Iterator[tuple[World, tuple[str, int]]]:
    with inbound(tmp_path, poste_bin, request.param) as both:
        yield both


async def connect(entry: tuple[str, int]) -> LineClient:
    reader, writer = await asyncio.open_connection(*entry, local_addr=(GMAIL_IP, 0))
    client = LineClient(reader, writer)
    assert (await client.reply()).startswith("220")
    assert (await client.cmd("EHLO mx.gmail.test")).startswith("250")
    return client


async def attacks(entry: tuple[str, int]) -> list[str]:
    """Every attack, each on a connection of its own (bad commands end a session).

    Returns the replies that were not refusals."""
    leaks: list[str] = []

    async def attempt(sender: bytes, rcpt: bytes | None) -> None:
        c = await connect(entry)
        line = b"MAIL FROM:" + sender if rcpt is None else b"RCPT TO:" + rcpt
        if rcpt is not None:
            assert (await c.cmd_bytes(b"MAIL FROM:" + sender)).startswith("250")
        r = await c.cmd_bytes(line)
        if b"\n" in line:  # a bare LF splits the line into two commands: two replies
            r += "\n" + await c.reply()
        if "\n250" in "\n" + r:
            leaks.append(f"{line!r}: {r}")
        # the connection is still sane
        assert (await c.cmd("RSET")).startswith("250")
        await c.cmd("QUIT")
        await c.close()

    for rcpt in RCPT_ATTACKS:
        for sender in (b"<>", b"<a@gmail.test>"):
            await attempt(sender, rcpt)
    for mail in MAIL_ATTACKS:
        await attempt(mail, None)
    return leaks


async def deliver_forms(entry: tuple[str, int]) -> dict[int, str]:
    """One mail per sender form to the forwarded user: {form index: final reply}."""
    out: dict[int, str] = {}
    c = await connect(entry)
    for i, form in enumerate(FORMS):
        utf8 = "" if form.isascii() else " SMTPUTF8"
        assert (await c.cmd("RSET")).startswith("250")
        r = await c.cmd(f"MAIL FROM:{form}{utf8}")
        assert r.startswith("250"), (form, r)
        r = await c.cmd(f"RCPT TO:<{FORWARDED}>")
        assert r.startswith("250"), (form, r)
        assert (await c.cmd("DATA")).startswith("354")
        out[i] = await c.cmd(
            f"From: sender@gmail.test\r\nTo: {FORWARDED}\r\nSubject: form {i}\r\n"
            f"Message-ID: <form-{i}@gmail.test>\r\n\r\nform {i}\r\n.")
    await c.cmd("QUIT")
    await c.close()
    return out


def subject(mail: bytes) -> str:
    for line in mail.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"subject:"):
            return line.split(b":", 1)[1].strip().decode()
    return ""


def test_no_relay_and_no_loss(stack: tuple[World, tuple[str, int]]) -> None:
    world, entry = stack
    leaks = asyncio.run(attacks(entry))
    assert leaks == [], "\n".join(leaks)

    replies = asyncio.run(deliver_forms(entry))
    accepted = {i for i, r in replies.items() if r.startswith("250")}
    assert accepted == set(range(len(FORMS))), {FORMS[i]: r for i, r in replies.items()
                                                 if i not in accepted}
    try:
        got = world.gmail.wait(len(accepted), timeout=60)
    except TimeoutError:
        raise AssertionError(world.logs()) from None
    assert sorted(subject(m) for m in got) == sorted(f"form {i}" for i in accepted)
    # Forwarded: the null sender stays null, every other one is SRS of our domain.
    for m in got:
        i = int(subject(m).split()[1])
        rp = return_path(m)
        if FORMS[i] == "<>":
            assert rp == "", rp
        else:
            assert rp.strip('"').startswith(("SRS0=", "SRS1=")) and rp.endswith(f"@{OURS}"), rp
    # Nothing reached the foreign domain, by any path.
    assert world.outlook.mails() == []
