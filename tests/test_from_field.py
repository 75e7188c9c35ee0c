"""The From fields read by a regex are those the email package reads, or the parser decides."""

from __future__ import annotations

import email
import email.policy

from hypothesis import given, settings
from hypothesis import strategies as st

from poste.smtp.from_field import from_fields, from_values


def parsed(header: bytes) -> list[str]:
    msg = email.message_from_bytes(header, policy=email.policy.compat32)
    return [str(v) for v in msg.get_all("From") or []]


LINES = st.sampled_from([
    b"From: Alice <alice@example.org>\r\n", b"from:bob@example.net\r\n", b"FROM: \t x@y.test\r\n",
    b"From:\r\n", b"From : spaced@name.test\r\n", b"From x@y.test\r\n", b"Fromage: no\r\n",
    b"Subject: hi\r\n", b"X-From: a@b.test\r\n", b" folded part\r\n", b"\tmore, <c@d.test>\r\n",
    b"no colon here\r\n", b": empty name\r\n", b"From: bare\nlf@x.test\r\n", b"From: caf\xc3\xa9\r\n",
    b"From: cr\ralone@x.test\r\n", b"Received: from x by y\r\n", b"To: a@b.test, From: c@d.test\r\n",
])


@settings(max_examples=500, deadline=None)
@given(st.lists(LINES, max_size=12), st.sampled_from([b"\r\n", b"", b"\r\nbody\r\n"]))
def test_same_fields_as_the_email_package(lines: list[bytes], end: bytes) -> None:
    header = b"".join(lines) + end
    want = parsed(header)
    assert from_fields(header) == want
    fast = from_values(header)
    assert fast is None or fast == want


def test_the_common_shapes_take_the_regex() -> None:
    header = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net;\r\n\tb=abc\r\n"
              b"From: Bench Sender <sender@example.net>\r\nTo: r@example.org\r\n\r\n")
    assert from_values(header) == ["Bench Sender <sender@example.net>"]
    assert from_values(b"From: a@b.test\r\nFrom: c@d.test\r\n\r\n") == ["a@b.test", "c@d.test"]
    assert from_values(b"From x@y Mon Jan 1\r\nFrom: a@b.test\r\n\r\n") is None  # mbox line
    assert from_values(b"Subject: no end of the header\r\n") is None
