"""Bounded fuzzing of what a peer controls: paths, command lines, DATA, headers, MIME.

Each target runs a fixed number of examples in the suite (POSTE_FUZZ_EXAMPLES
raises it for a long run by hand, e.g. POSTE_FUZZ_EXAMPLES=20000).  What is
checked is what a user relies on: the parser either refuses with its own
error or gives an address that reads back the same; a listener answers every
line with an SMTP reply and stays up, without logging a traceback; the
message paths of the stages never raise on any bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poste.dkim.keys import generate
from poste.dkim.sign import Signer, SigningKey, sign_or_pass
from poste.services.verifier.dmarc import from_domain
from poste.smtp.address import AddressError, parse_path, smtp_path
from poste.spam.tokenizer import tokenize
from poste.tools.srv import Mailbox, MailboxHop
from support.smtp import LineClient, running

EXAMPLES = int(os.environ.get("POSTE_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Bytes that matter to SMTP and mail parsers, mixed with anything.
SPECIAL = [b"<", b">", b"@", b'"', b"\\", b"\r", b"\n", b"\r\n", b"\x00", b".", b":", b",",
           b" ", b"[", b"]", b"=?utf-8?b?", b"?=", b"\xc3\xa9", b"\xff", b"From: ", b"--b\r\n",
           b"Content-Type: multipart/mixed; boundary=b\r\n", b"\r\n\r\n", b"SIZE=", b"BODY="]
chunks = st.lists(st.one_of(st.sampled_from(SPECIAL), st.binary(max_size=12)), max_size=24)
junk = chunks.map(b"".join)


@FUZZ
@given(junk)
def test_parse_path_refuses_or_reads_back(raw: bytes) -> None:
    text = raw.decode("utf-8", "surrogateescape")
    for recipient in (False, True):
        try:
            address, rest = parse_path(text, recipient=recipient)
        except AddressError as exc:
            assert exc.code in (501, 553)
            continue
        assert rest == "" or rest.startswith(" ")
        if address is None:
            continue
        # the canonical text is a path of its own, and the client can send it
        again, _ = parse_path(f"<{address.text}>", recipient=recipient)
        assert again == address
        assert smtp_path(address.text) == b"<" + address.text.encode("utf-8") + b">"


@FUZZ
@given(junk)
def test_message_paths_never_raise(raw: bytes) -> None:
    message = b"From: a@b.test\r\n" + raw + b"\r\n\r\nbody\r\n" + raw
    tokenize(message)
    tokenize(raw)
    from_domain(message)
    from_domain(raw)


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer([SigningKey("ours.test", "s", generate("ed25519"))])


@FUZZ
@given(junk)
def test_signer_passes_anything_on(signer: Signer, raw: bytes) -> None:
    fields = sign_or_pass(signer, b"From: a@ours.test\r\n" + raw + b"\r\n\r\nx\r\n")
    assert fields == b"" or fields.startswith(b"DKIM-Signature:")


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@FUZZ
@given(st.lists(chunks.map(b"".join), min_size=1, max_size=12))
def test_listener_answers_every_line_and_stays_up(tmp_path: Path, lines: list[bytes]) -> None:
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    try:
        asyncio.run(_session(tmp_path, lines))
    finally:
        logging.getLogger().removeHandler(errors)
    assert [r.getMessage() for r in errors.records] == []


async def _session(folder: Path, lines: list[bytes]) -> None:
    hop = MailboxHop(Mailbox(str(folder) + "/", 0, with_data=True))
    async with running(_stage(), hop) as service:
        c = await LineClient.connect(*service.sockname)
        assert (await c.reply())[:3] == "220"
        await c.cmd("EHLO fuzz.test")
        # a valid transaction prefix, so MAIL/RCPT/DATA states are reached too
        await c.cmd("MAIL FROM:<a@b.test>")
        await c.cmd("RCPT TO:<c@d.test>")
        for line in lines:
            c.writer.write(line.replace(b"\n", b"") + b"\r\n")
        c.writer.write(b"\r\n.\r\nQUIT\r\n")
        await c.writer.drain()
        while True:  # every reply is a reply; the session ends by QUIT or by the server
            try:
                reply = await c.reply(timeout=10)
            except ConnectionError:
                break
            assert reply[:3].isdigit() and reply[0] in "2345", reply
            if reply.startswith(("221", "421")):
                break
        await c.close()
        # the listener is still up for the next client
        c2 = await LineClient.connect(*service.sockname)
        assert (await c2.reply())[:3] == "220"
        await c2.close()


def _stage():  # type: ignore[no-untyped-def]
    from poste.smtp.stage import Stage

    return Stage()
