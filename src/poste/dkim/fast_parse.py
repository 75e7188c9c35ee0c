"""dkimpy's message split, without re-splitting the body line by line.

dkimpy's `rfc822_parse` splits the whole message with `re.split(b"\\r?\\n")` and
joins the body back with CRLF, so that a message with bare LF line ends is
hashed as if they were CRLF.  For a 1 MB mail that was a third of `poste up`'s
CPU (issue 16, docs/performance.md).  On the transport path a mail's line ends
are CRLF already (the DATA reader refuses bare CR and LF), and then the body
dkimpy would rebuild is exactly the bytes after the blank line: this gives it
those, and parses only the header section with dkimpy's own function.  A mail
with a bare LF in its body (a file given to `poste dkim verify`) still goes
through dkimpy's own split, so every answer is the one dkimpy would give.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dkim

_original: Callable[[bytes], tuple[list[Any], bytes]] = dkim.rfc822_parse


def rfc822_parse(message: bytes) -> tuple[list[Any], bytes]:
    if message.startswith(b"\r\n"):
        start = 0
    else:
        start = message.find(b"\r\n\r\n")
        if start < 0:
            return _original(message)
        start += 2
    head, body = message[:start + 2], message[start + 2:]
    if b"\n" in head[:start].replace(b"\r\n", b"") or body.count(b"\n") != body.count(b"\r\n"):
        return _original(message)  # a bare LF: dkimpy's own reading of it
    headers, _ = _original(head)  # the blank line itself: dkimpy's "body" of `head`
    return headers, body


def install() -> None:
    """Make dkimpy's signers and verifiers (DKIM and ARC) split messages this way."""
    dkim.rfc822_parse = rfc822_parse
