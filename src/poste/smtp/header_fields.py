"""A header field's values as the email package's compat32 parser gives them, without it.

The relay's forward plan (`author_of`) and the verifier's DMARC (`from_domain`)
each parsed every mail's header with `email.message_from_bytes` only to read
its From fields: 4-5% of `poste up`'s CPU per mail at 5 KB (issue 16).  For a
plain header (ASCII, CRLF line ends only, every line a `name:` field or a
continuation of one) the values are found here with a split and a compare;
anything else returns None and the caller keeps the email package, so an odd
header is read exactly as before.  A property test compares both.
"""

from __future__ import annotations

import re

# A field line as the feedparser's headerRE, with a name of at least one character
# (its `[\041-\071\073-\176]*:` also takes an empty one, which it then drops as a defect).
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


def field_values(header: bytes, name: str) -> list[str] | None:
    """Every value of field `name` as `Message.get_all` (compat32) returns it; None
    when the header is not plain enough to be sure (then ask the email package)."""
    end = header.find(b"\r\n\r\n")
    block = header[:end + 2] if end >= 0 else header
    crlf = block.count(b"\r\n")
    if not block.isascii() or block.count(b"\r") != crlf or block.count(b"\n") != crlf:
        return None  # 8-bit (compat32 makes Header objects of it) or a bare CR or LF
    lines = block.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if end < 0 and not header.endswith(b"\r\n"):
        return None  # a header cut off in a line: leave it to the parser
    want = name.lower().encode("ascii")
    values: list[str] = []
    current: list[bytes] | None = None  # the field of `name` being read, with its lines
    for i, line in enumerate(lines):
        if line[:1] in (b" ", b"\t"):
            if i == 0:
                return None  # a continuation first: the parser's defect path
            if current is not None:
                current.append(line)
            continue
        if not _FIELD.match(line) or line.startswith(b"From "):
            return None
        if current is not None:
            values.append(_value(current))
            current = None
        key, _, rest = line.partition(b":")
        if key.lower() == want:
            current = [rest.lstrip(b" \t")]
    if current is not None:
        values.append(_value(current))
    return values


def _value(lines: list[bytes]) -> str:
    """compat32's `header_source_parse`: the lines joined with their CRLFs, the last stripped."""
    return b"\r\n".join(lines).rstrip(b"\r\n").decode("ascii")
