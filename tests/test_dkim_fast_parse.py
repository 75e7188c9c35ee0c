"""dkimpy's split of a message, done without re-splitting the body: the same answer."""

from __future__ import annotations

import dkim
from hypothesis import given, settings
from hypothesis import strategies as st

import poste.dkim  # noqa: F401  (installs the fast split)
from poste.dkim import fast_canon, fast_parse

PIECES = st.sampled_from([
    b"From: a@b.test\r\n", b"Subject: x\r\n", b" folded\r\n", b"\r\n", b"\n", b"\r",
    b"body line\r\n", b"From the start\r\n", b"X-A: b\n", b"\r\n\r\n", b"tail",
])


@settings(max_examples=500, deadline=None)
@given(st.lists(PIECES, max_size=30))
def test_same_split_as_dkimpy(pieces: list[bytes]) -> None:
    message = b"".join(pieces)
    want: object
    got: object
    try:
        want = fast_parse._original(message)
    except Exception as exc:  # dkimpy's own errors (IndexError included) stay the same
        want = type(exc)
    try:
        got = fast_parse.rfc822_parse(message)
    except Exception as exc:
        got = type(exc)
    assert got == want


def test_installed_for_dkimpy() -> None:
    assert dkim.rfc822_parse is fast_parse.rfc822_parse


# -- the canonicalisation passes (fast_canon): dkimpy's own result every time ----------

BLANKS = st.lists(st.sampled_from([b"a", b"b c", b" ", b"  ", b"\t", b"\r\n", b"\n", b"\r",
                                   b" \r\n", b"\t\r\n"]), max_size=40).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(BLANKS)
def test_canonicalisation_passes_as_dkimpy(content: bytes) -> None:
    assert fast_canon.compress_whitespace(content) == fast_canon._compress(content)
    assert fast_canon.strip_trailing_whitespace(content) == fast_canon._strip(content)
    assert fast_canon.unfold_header_value(content) == fast_canon._unfold(content)


def test_canonicalisation_installed_for_dkimpy() -> None:
    from dkim import canonicalization

    assert canonicalization.compress_whitespace is fast_canon.compress_whitespace
    body = b"a  b\t\r\nc \r\n\r\n\r\n"
    assert canonicalization.Relaxed.canonicalize_body(body) == b"a b\r\nc\r\n"
