"""A small, forgiving MIME walker over raw bytes.

The stdlib `email` parser is too slow for a filter that must keep pace with
spamoracle (it builds a full object tree and re-decodes headers), and it can
raise or recurse deeply on hostile input.  This walker only finds what the
tokenizer needs: the header fields of each part and the decoded text of the
text parts.  It never raises on malformed input and bounds its work: parts
nested deeper than `MAX_DEPTH` are not opened, at most `MAX_PARTS` parts are
looked at, non-text parts are never decoded, and only the first `max_bytes`
of text are decoded overall.
"""

from __future__ import annotations

import binascii
import codecs
import re
from collections.abc import Iterable, Iterator, Mapping

# typing only for the checker: its import costs a batch command ~5 ms of start-up
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_DEPTH = 16
MAX_PARTS = 64
MAX_HEAD = 64 * 1024  # a header block longer than this is cut there
# text decoded and tokenized per mail: on the time split of the dev corpus
# 32 KB labels as 256 KB did (within a mail) and tokenizes ~9% faster, the
# few long newsletters and digests being where the time went
DEFAULT_MAX_BYTES = 32 * 1024

_ASCII = frozenset({"us-ascii", "ascii"})
# charsets bytes.decode knows without a codecs lookup (its C fast paths)
_BUILTIN = frozenset({"utf-8", "utf8", "iso-8859-1", "latin-1", "latin1", "iso8859-1"})

_FOLD = re.compile(rb"\n[ \t]+")
_FIELD_START = re.compile(rb"[!-9;-~]{1,76}[ \t]*:")
# matched after a newline (the text gets one in front): a literal first
# character lets the regex engine skip to line starts instead of trying every
# position, as "^" with re.M would
_FIELD = re.compile(rb"\n([!-9;-~]{1,76})[ \t]*:[ \t]*([^\n]*)")
# fields decoded (RFC 2047, charsets) because their words become tokens
DECODED_FIELDS = frozenset(
    {"subject", "from", "reply-to", "to", "cc", "organization", "x-mailer", "user-agent"}
)
# matched on latin-1 text: [a-zA-Z] is what re.I made of [a-z] there (re.I also
# takes U+0130, U+0131, U+017F, U+212A, never in latin-1), and compiles 6x faster
_PARAM = re.compile(r"""(?:^|;)\s*([a-zA-Z0-9*._-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))""")
_ENCODED_WORD = re.compile(rb"=\?([^?\s]{1,40})\?([bBqQ])\?([^?\s]*)\?=")
_ENCODED_GAP = re.compile(rb"(\?=)[ \t\r\n]+(=\?)")


class Fields(Mapping[str, list[str]]):
    """Header fields of a part, decoded only when asked for (most never are)."""

    __slots__ = ("_decoded", "_raw", "_words")

    def __init__(self, raw: dict[str, list[bytes]], words: bool) -> None:
        self._raw = raw
        self._words = words  # decode RFC 2047 words in DECODED_FIELDS
        self._decoded: dict[str, list[str]] = {}

    def __getitem__(self, name: str) -> list[str]:
        found = self._decoded.get(name)
        if found is None:
            values = self._raw[name]
            if self._words and name in DECODED_FIELDS:
                found = [decode_words(v.strip()) for v in values]
            else:
                found = [v.decode("latin-1").strip() for v in values]
            self._decoded[name] = found
        return found

    def get(self, name: str, default: Any = None) -> Any:
        found = self._decoded.get(name)
        if found is not None:
            return found
        if name in self._raw:
            return self[name]
        return default

    def first(self, name: str, count: int = 1) -> list[str]:
        """The first `count` values of a field (only those are decoded), or []."""
        values = self._raw.get(name)
        if not values:
            return []
        if len(values) <= count:
            return self[name]
        found = self._decoded.get(name)
        if found is not None:
            return found[:count]
        if self._words and name in DECODED_FIELDS:
            return [decode_words(v.strip()) for v in values[:count]]
        return [v.decode("latin-1").strip() for v in values[:count]]

    def names(self) -> Iterable[str]:
        return self._raw.keys()

    def __contains__(self, name: object) -> bool:
        return name in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)


class Part:
    """One leaf of the MIME tree: its content type, its fields, its text if it is text."""

    # a plain class, not a dataclass: `import dataclasses` costs ~20 ms of a batch command's start-up
    __slots__ = ("content_type", "depth", "filename", "headers", "text")

    def __init__(
        self, content_type: str, headers: Fields, text: str = "", filename: str = "", depth: int = 0
    ) -> None:
        self.content_type = content_type
        self.headers = headers
        self.text = text
        self.filename = filename
        self.depth = depth

    def __repr__(self) -> str:
        return f"Part({self.content_type!r}, depth={self.depth}, filename={self.filename!r})"


def split_head(raw: bytes, start: int = 0, end: int = -1) -> tuple[bytes, int]:
    """The header block of raw[start:end] and the offset where its body starts.

    A message with no blank line is all header (cut at MAX_HEAD).
    """
    if end < 0:
        end = len(raw)
    if raw.startswith(b"\n", start) or raw.startswith(b"\r\n", start):  # no header at all
        return b"", start + (1 if raw[start] == 10 else 2)
    if not _FIELD_START.match(raw, start, end):  # text where the header should be: all body
        return b"", start
    limit = min(end, start + MAX_HEAD + 4)
    # bytes.find is much faster than a regex without a literal prefix
    i = raw.find(b"\n\n", start, limit)
    # only a CRLF blank line before the first LF one matters: no need to look further
    j = raw.find(b"\n\r\n", start, limit if i < 0 else i)
    if i < 0 and j < 0:
        cut = min(end, start + MAX_HEAD)
        return raw[start:cut], cut
    if j >= 0 and (i < 0 or j < i):
        stop, body = j, j + 3
    else:
        stop, body = i, i + 2
    if stop > start and raw[stop - 1] == 13:
        stop -= 1
    return raw[start:stop], body


def to_text(data: bytes, charset: str = "") -> str:
    """Bytes to str: the declared charset if Python knows it, else UTF-8, else cp1252."""
    if charset:
        low = charset.lower()
        if low in _ASCII:  # Python knows them: no lookup (nor its module import) needed
            charset = ""
        elif low not in _BUILTIN:
            try:
                codecs.lookup(charset)
            except (LookupError, ValueError):
                charset = ""
    if charset:
        try:
            return data.decode(charset, "replace")
        except Exception:  # exotic codecs can fail in odd ways; fall through
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def decode_words(value: bytes) -> str:
    """RFC 2047 encoded words decoded; raw 8-bit text decoded as best we can."""
    if b"=?" not in value:
        return to_text(value)
    value = _ENCODED_GAP.sub(rb"\1\2", value)
    out: list[str] = []
    pos = 0
    for m in _ENCODED_WORD.finditer(value):
        out.append(to_text(value[pos : m.start()]))
        charset, enc, payload = m.group(1), m.group(2), m.group(3)
        cs = charset.decode("ascii", "replace").split("*", 1)[0]
        try:
            if enc in b"bB":
                data = binascii.a2b_base64(payload + b"===")
            else:
                data = binascii.a2b_qp(payload, header=True)
        except (binascii.Error, ValueError):
            data = payload
        out.append(to_text(data, cs))
        pos = m.end()
    out.append(to_text(value[pos:]))
    return "".join(out)


# raw field name -> its lower-case str: the same few dozen names recur in every
# mail, and one dict lookup is cheaper than decoding and lowering each (a
# mail of the time split has ~23 fields; parse_fields was a quarter of the tokenizer)
_NAMES: dict[bytes, str] = {}
_MAX_NAMES = 4096  # bounded: a stream of mails with random field names must not grow it forever


def parse_fields(head: bytes) -> dict[str, list[bytes]]:
    """Field name (lower case) to raw values, folded lines joined.

    Values keep trailing white space; users strip what they use.
    """
    if b"\r" in head:
        head = head.replace(b"\r\n", b"\n")
    fields: dict[str, list[bytes]] = {}
    get, names = fields.get, _NAMES
    for name, value in _FIELD.findall(b"\n" + _FOLD.sub(b" ", head)):
        key = names.get(name)
        if key is None:
            key = name.decode("ascii").lower()
            if len(names) < _MAX_NAMES:
                names[name] = key
        values = get(key)
        if values is None:
            fields[key] = [value]
        else:
            values.append(value)
    return fields


def content_type(fields: dict[str, list[bytes]], default: str) -> tuple[str, dict[str, str]]:
    """The MIME type (lower case) and its parameters; junk gives the default."""
    values = fields.get("content-type")
    if not values:
        return default, {}
    text = values[0].decode("latin-1")
    main, _, rest = text.partition(";")
    ctype = main.strip().lower()
    if "/" not in ctype or " " in ctype:
        ctype = default
    params: dict[str, str] = {}
    for m in _PARAM.finditer(";" + rest):
        params.setdefault(m.group(1).lower(), m.group(2) if m.group(2) is not None else m.group(3))
    return ctype, params


def _decode_body(body: bytes, cte: str, max_bytes: int) -> bytes:
    """Transfer decoding of at most about max_bytes of output; junk stays raw."""
    if cte == "base64":
        chunk = body[: max_bytes * 4 // 3 + 1024]
        try:
            return binascii.a2b_base64(chunk)  # skips line breaks and junk characters
        except (binascii.Error, ValueError):
            pass
        # cut mid-quantum (or junk): keep whole 4-character groups
        chunk = re.sub(rb"[^A-Za-z0-9+/]", b"", chunk)
        chunk = chunk[: len(chunk) - len(chunk) % 4]
        try:
            return binascii.a2b_base64(chunk)
        except (binascii.Error, ValueError):
            return body[:max_bytes]
    if cte == "quoted-printable":
        try:
            return binascii.a2b_qp(body[: max_bytes * 3])[:max_bytes]
        except (binascii.Error, ValueError):
            return body[:max_bytes]
    return body[:max_bytes]


def _filename(fields: dict[str, list[bytes]], params: dict[str, str]) -> str:
    name = params.get("name", "")
    disp = fields.get("content-disposition")
    if disp:
        m = re.search(r"""filename\*?\s*=\s*"?([^";]*)""", disp[0].decode("latin-1"), re.I)
        if m:
            name = m.group(1)
    return name.strip().lower()


def walk(raw: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[list[Part], set[str]]:
    """The parts of a message in order, text parts decoded, and flags about its shape.

    The first part is always the message itself (its fields are the top-level
    header); its text is set only when it is a single-part text message.
    Flags are `mime:too-deep`, `mime:too-many-parts`, `mime:no-boundary`, and
    `header:8bit` for raw 8-bit bytes in the top-level header.
    Offsets into `raw` are passed down instead of slices, so a 20 MB
    attachment nested deep is never copied.
    """
    walker = _Walker(raw, max_bytes)
    walker.walk(0, len(raw), "text/plain", 0)
    return walker.out, walker.flags


class _Walker:
    def __init__(self, raw: bytes, max_bytes: int) -> None:
        self.raw = raw
        self.budget = max_bytes
        self.out: list[Part] = []
        self.flags: set[str] = set()

    def walk(self, start: int, end: int, default: str, depth: int) -> None:
        raw = self.raw
        head, body = split_head(raw, start, end)
        if depth == 0 and not head[:4096].isascii():
            self.flags.add("header:8bit")
        raw_fields = parse_fields(head)
        ctype, params = content_type(raw_fields, default)
        part = Part(
            ctype,
            Fields(raw_fields, depth == 0),
            depth=depth,
            filename=_filename(raw_fields, params),
        )
        self.out.append(part)
        if ctype.startswith("multipart/"):
            boundary = params.get("boundary", "")
            if not boundary:
                self.flags.add("mime:no-boundary")
                part.text = self.text_of(body, end, "7bit", "")
                return
            if depth >= MAX_DEPTH:
                self.flags.add("mime:too-deep")
                return
            sub_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
            delim = b"--" + boundary.encode("latin-1", "replace")
            for s, e in _split_multipart(raw, body, end, delim):
                if len(self.out) >= MAX_PARTS:
                    self.flags.add("mime:too-many-parts")
                    return
                self.walk(s, e, sub_default, depth + 1)
            return
        if ctype == "message/rfc822":
            if depth >= MAX_DEPTH:
                self.flags.add("mime:too-deep")
            elif len(self.out) < MAX_PARTS:
                self.walk(body, end, "text/plain", depth + 1)
            return
        if ctype.startswith("text/") and self.budget > 0:
            cte = raw_fields.get("content-transfer-encoding", [b""])[0].strip().lower()
            part.text = self.text_of(body, end, cte.decode("latin-1"), params.get("charset", ""))

    def text_of(self, start: int, end: int, cte: str, charset: str) -> str:
        # Enough raw input for `budget` bytes of output whatever the encoding.
        body = self.raw[start : min(end, start + self.budget * 3 + 1024)]
        data = _decode_body(body, cte, self.budget)
        self.budget -= len(data)
        return to_text(data, charset)


def _split_multipart(raw: bytes, start: int, end: int, delim: bytes) -> list[tuple[int, int]]:
    """(start, end) of the body parts between delimiter lines.

    The preamble and epilogue are dropped; a missing close delimiter is
    tolerated (the last part runs to the end).  bytes.find keeps this fast on
    a 20 MB attachment.
    """
    spans: list[tuple[int, int]] = []
    pos = -1
    i = start
    n = len(delim)
    while True:
        i = raw.find(delim, i, end)
        if i < 0:
            break
        if i != start and raw[i - 1] != 10:  # not at the start of a line
            i += n
            continue
        line_end = raw.find(b"\n", i + n, end)
        if line_end < 0:
            line_end = end
        closing = raw.startswith(b"--", i + n)
        rest = raw[i + n + (2 if closing else 0) : line_end].strip()
        if rest:  # "--boundaryX": a longer boundary, not ours
            i += n
            continue
        if pos >= 0:
            stop = i - 1
            if stop > pos and raw[stop - 1] == 13:
                stop -= 1
            spans.append((pos, max(pos, stop)))
        if closing or len(spans) >= MAX_PARTS:
            return spans
        pos = min(line_end + 1, end)
        i = pos
    if pos >= 0:
        spans.append((pos, end))
    return spans
