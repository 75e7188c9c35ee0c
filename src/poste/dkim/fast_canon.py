"""dkimpy's relaxed canonicalisation, without regex passes that would change nothing.

dkimpy's relaxed header and body canonicalisation (RFC 6376 3.4.2, 3.4.4) runs
`re.sub` over every signed field twice and over the whole body twice, and
each pass copies its input even when nothing matches.  Most fields have no
fold, no tab and no double space, and most bodies no trailing blank: then
each pass returns its input.  These wrappers test for what each regex could
match with C-level `in` scans first and return the input when it cannot
match, else call dkimpy's own function, so every result is byte for byte
dkimpy's (tests/test_dkim_fast_parse.py compares them over random input).
Installed for signing and verification alike (issue 16: the outbound path's
DKIM share, docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable

from dkim import canonicalization as _canon

_compress: Callable[[bytes], bytes] = _canon.compress_whitespace
_strip: Callable[[bytes], bytes] = _canon.strip_trailing_whitespace
_unfold: Callable[[bytes], bytes] = _canon.unfold_header_value


def compress_whitespace(content: bytes) -> bytes:
    """`[\\t ]+` -> one space: nothing to do without a tab or two spaces in a row."""
    if b"\t" not in content and b"  " not in content:
        return content
    return _compress(content)


def strip_trailing_whitespace(content: bytes) -> bytes:
    """`[\\t ]+\\r\\n` -> CRLF: nothing to do unless a blank ends a line."""
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _strip(content)


def unfold_header_value(content: bytes) -> bytes:
    """`\\r?\\n` removed: nothing to do without a line feed."""
    if b"\n" not in content:
        return content
    return _unfold(content)


def install() -> None:
    """Make dkimpy's Relaxed canonicalisation (its module globals) use these."""
    if getattr(_canon, "_poste_fast", False):
        return
    _canon.compress_whitespace = compress_whitespace
    _canon.strip_trailing_whitespace = strip_trailing_whitespace
    _canon.unfold_header_value = unfold_header_value
    _canon._poste_fast = True
