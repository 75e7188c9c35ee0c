"""Received: says what happened (issue 12, item 4): the address of a TCP peer, and for a
hop without one (a stage of `poste up`, a unix socket) how the mail came, never an
address no one used; one field per stage, of the same shape in both topologies."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from poste.services.relay.stage import count_received
from poste.smtp.stage import Stage
from poste.tools.srv import Mailbox, MailboxHop
from support.loop_world import (
    GMAIL_IP,
    LOGIN,
    NAMES,
    OUR_OUTGOING_IP,
    inbound,
    swaks,
)
from support.smtp import running

# RFC 5321 4.4 Stamp as poste writes it, one field (its folded lines joined by CRLF TAB)
STAMP = re.compile(
    r"Received: from (?P<helo>[\x21-\x7e]+)(?: \((?P<tcp>[^()]*)\))?"
    r"(?:\r\n\t\(using [^()]*\))?"
    r"\r\n\tby (?P<by>[\x21-\x7e]+) \(poste\)(?: via (?P<via>[A-Za-z0-9-]+))?"
    r" with (?P<proto>E?SMTPS?A?) id (?P<id>[0-9A-F]+)"
    r"(?:\r\n\tfor <(?P<rcpt>[^>]+)>)?; (?P<date>[A-Z][a-z]{2}, .+ \+0000)\r\n\Z"
)
ADDRESS = re.compile(r"\[(?:IPv6:)?[0-9a-fA-F.:]+\]")


def ours(mail: bytes) -> list[str]:
    """Our services' Received: fields, raw (folded), top first (not the stand-in MX's)."""
    head = mail.split(b"\r\n\r\n", 1)[0].decode() + "\r\n"
    found = re.findall(r"^Received: .*?\r\n(?=\S)", head + "X", re.M | re.S)
    return [f for f in found if any(f"\tby {n} (poste)" in f for n in (*NAMES.values(), "test.poste"))]


def shape(field: str) -> str:
    """The field with what differs per mail (id, date, cipher) and per link taken out."""
    m = STAMP.match(field)
    assert m, ascii(field)
    link = "LINK" if (m["tcp"] is not None) != (m["via"] is not None) else "BAD"
    return f"from {m['helo']} {link} by {m['by']} with {m['proto']} for {m['rcpt']}"


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["up", "separate"])
def test_one_honest_field_per_stage(tmp_path: Path, poste_bin: str, topology: str) -> None:
    with inbound(tmp_path, poste_bin, topology) as (world, (host, port)):
        r = swaks("--server", host, "--port", str(port), "--local-interface", GMAIL_IP,
                  "--ehlo", "mx.gmail.test", "--from", "someone@gmail.test", "--to", LOGIN,
                  "--header", "Subject: received fields", "--body", "hello")
        assert r.returncode == 0, r.stdout + r.stderr + world.logs()
        try:
            mail = world.gmail.wait(1)[0]
        except TimeoutError:
            raise AssertionError(world.logs()) from None
    fields = ours(mail)
    # relay, spamfilter, verifier: one each, whatever the topology
    by = [STAMP.match(f)["by"] for f in fields]  # type: ignore[index]
    assert by == [NAMES["relay"], NAMES["spamfilter"], NAMES["verifier"]], fields
    assert [shape(f) for f in fields] == [
        f"from {NAMES['spamfilter']} LINK by {NAMES['relay']} with ESMTP for {LOGIN}",
        f"from {NAMES['verifier']} LINK by {NAMES['spamfilter']} with ESMTP for {LOGIN}",
        f"from mx.gmail.test LINK by {NAMES['verifier']} with ESMTP for {LOGIN}",
    ]
    relay, spam, verifier = (STAMP.match(f) for f in fields)
    assert verifier and verifier["tcp"] == f"[{GMAIL_IP}]"  # the address swaks really used
    assert relay and spam
    if topology == "up":  # chained in memory: no connection, so no address and no rDNS name
        assert relay["via"] == spam["via"] == "poste-up"
        assert relay["tcp"] is None and spam["tcp"] is None
        assert not ADDRESS.search(fields[0] + fields[1]), fields
    else:  # real TCP hops, from the address loopback connections leave from
        assert relay["tcp"] == spam["tcp"] == f"[{OUR_OUTGOING_IP}]"
        assert relay["via"] is None and spam["via"] is None
    # the loop detection counts every hop: ours, and the stand-in Gmail MX's on top
    assert count_received(mail) == 4


async def test_unix_socket_hop_says_via_unix(tmp_path: Path) -> None:
    sock = tmp_path / "in.sock"
    box = Mailbox(str(tmp_path / "box") + "/", 0, with_data=True)
    async with running(Stage(), MailboxHop(box), host=str(sock)):
        swaks_ = await asyncio.create_subprocess_exec(
            "swaks", "--socket", str(sock), "--ehlo", "signer.our.test", "--from", "a@our.test",
            "--to", "b@their.test", "--body", "hi", "--timeout", "20",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await swaks_.communicate()
    assert swaks_.returncode == 0, out.decode()
    mail = _only_mail(tmp_path / "box")
    (field,) = ours(mail)
    m = STAMP.match(field)
    assert m, ascii(field)
    assert m["helo"] == "signer.our.test" and m["via"] == "unix" and m["tcp"] is None
    assert not ADDRESS.search(field), field
    assert m["by"] == "test.poste" and m["rcpt"] == "b@their.test"


def _only_mail(folder: Path) -> bytes:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) == 1, files
    return files[0].read_bytes()
