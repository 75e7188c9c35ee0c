"""smtp/header_fields.py reads a header's fields as the email package's compat32 does."""

from __future__ import annotations

import email
import email.policy

from hypothesis import given, settings
from hypothesis import strategies as st

from poste.smtp.header_fields import field_values


def _parser(header: bytes, name: str) -> list[str]:
    msg = email.message_from_bytes(header, policy=email.policy.compat32)
    return [str(v) for v in msg.get_all(name) or []]


def test_plain_header() -> None:
    header = (b"Received: from a\r\n\tby b\r\nFrom: \"A B\" <a@example.org>\r\n"
              b"Subject: hi\r\nfrom:   second@x.test  \r\n continued\r\n\r\n")
    assert field_values(header, "From") == _parser(header, "From")
    assert field_values(header, "From") == ['"A B" <a@example.org>',
                                            "second@x.test  \r\n continued"]
    assert field_values(header, "To") == []


def test_odd_headers_are_left_to_the_parser() -> None:
    for header in (
        b"From: a@x.test\nSubject: bare LF\r\n\r\n",
        b"From: a@x.test\rSubject: bare CR\r\n\r\n",
        b" continued first\r\nFrom: a@x.test\r\n\r\n",
        b"From a@x.test Thu Dec  3 12:00:00 2026\r\nFrom: a@x.test\r\n\r\n",
        b"From: caf\xc3\xa9 <a@x.test>\r\n\r\n",
        b"not a field\r\nFrom: a@x.test\r\n\r\n",
        b": empty name\r\nFrom: a@x.test\r\n\r\n",
        b"From: a@x.test\r\nSubject: cut in the mid",
    ):
        assert field_values(header, "From") is None, header


_names = st.sampled_from(["From", "from", "FROM", "To", "Subject", "X-A", "Fro", "Fromm"])
_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=30)
_line = st.one_of(
    st.builds(lambda n, sep, v: f"{n}:{sep}{v}", _names, st.sampled_from(["", " ", "\t", "  "]),
              _text),
    st.builds(lambda ws, v: f"{ws}{v}", st.sampled_from([" ", "\t"]), _text),
    _text,  # sometimes not a field: then None, or the same answer
)


@settings(max_examples=400)
@given(st.lists(_line, max_size=8), st.booleans(), st.binary(max_size=20))
def test_same_values_as_the_email_package(lines: list[str], blank: bool, body: bytes) -> None:
    header = "".join(f"{line}\r\n" for line in lines).encode("ascii")
    if blank:
        header += b"\r\n" + body
    for name in ("From", "Subject"):
        fast = field_values(header, name)
        if fast is not None:
            assert fast == _parser(header, name), header
