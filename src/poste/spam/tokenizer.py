"""Tokens from what a reader of the mail sees, each tagged with where it came from.

Body words are bare (`viagra`); words from header fields carry their field
(`subject:free`, `from:name:john`), links carry their host (`url:example.com`,
and each parent domain), and the structure of the mail shows as
`ct:text/html`, `cte:base64`, `header:x-mailer` tokens.  The same word in the
Subject and in the body are different evidence, which is what makes a
token-based filter sharp.  Tokens never contain whitespace (the database stores
them one per line).

`tokenize` works on raw bytes, never raises, and bounds its work (see mime).
"""

from __future__ import annotations

import re
from itertools import compress

from poste.spam.mime import DEFAULT_MAX_BYTES, Part, walk

MIN_LEN = 3
MAX_LEN = 24

_PUNCT = "\"'()[]{}<>.,;:?*=_-#|/\\~`^+&"
_URL = re.compile(r"""://([^/\s"'<>:?#@\\]+(?:@[^/\s"'<>:?#\\]+)?)""")
# links, absolute or protocol-relative, in markup (attribute values start with a quote or =)
_HREF = re.compile(r"""//([a-zA-Z0-9-]{1,63}(?:\.[a-zA-Z0-9-]{1,63})+)""")
_EMAIL = re.compile(r"@([a-zA-Z0-9-]{1,63}(?:\.[a-zA-Z0-9-]{1,63})+)")
_TAG = re.compile(r"<([a-zA-Z][a-zA-Z0-9]{0,9})\b")
# openers and closers of what a reader never sees; matched one by one (a lazy
# ".*?</style>" regex is quadratic on a mail of 50,000 unclosed "<style>").
# "-->" is searched apart with str.find: with it in the same regex there is no
# literal first character and the regex engine tries every position (half of
# the time of HTML mail went there).
_HIDDEN = re.compile(r"<(/?)(style|script|head)\b[^>]{0,1000}>|<!--", re.I)
_ANYTAG = re.compile(r"<[^>]{0,1000}>")
_IP = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_FROM_BY = frozenset({"from", "by", "FROM", "BY", "From", "By"})
_BRACKET_IP = re.compile(r"\[(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.\d{1,3}\]")

_CHARSET = re.compile(r"charset\s*=\s*\"?([\w.:-]{1,30})", re.I)

# header fields whose words are tokens of their own (besides the special ones)
_WORD_FIELDS = ("subject", "x-mailer", "user-agent", "organization")
# fields that only tell something by being there
_SEEN_FIELDS = frozenset(
    {
        "x-mailer",
        "user-agent",
        "x-msmail-priority",
        "x-priority",
        "list-id",
        "list-unsubscribe",
        "in-reply-to",
        "references",
        "mime-version",
        "reply-to",
        "x-originating-ip",
        "disposition-notification-to",
        "errors-to",
        "organization",
        "precedence",
    }
)

# str.translate tables deleting the ASCII letters, the ASCII capitals
_NOT_LETTERS = dict.fromkeys(range(ord("A"), ord("Z") + 1)) | dict.fromkeys(
    range(ord("a"), ord("z") + 1)
)
_NOT_UPPER = dict.fromkeys(range(ord("A"), ord("Z") + 1))

_SEEN_TOKENS = {name: f"header:{name}" for name in _SEEN_FIELDS}
# the host prefixes of address fields, made once (a new string per call is hashed anew)
_DOMAIN = {name: f"{name}:domain" for name in ("from", "reply-to", "to", "cc")}
_NAME = {name: f"{name}:name:" for name in ("from", "reply-to")}


def words(text: str) -> set[str]:
    """Lower-cased words of a reasonable length; longer ones become a length token.

    Splitting on white space and stripping punctuation only from the unique
    words is several times faster than a word regex over the whole text.
    """
    out: set[str] = set()
    add_words(text, out)
    return out


def add_words(text: str, out: set[str], _punct: str = _PUNCT) -> None:
    """words(text), added to `out` directly (no set of its own to build and merge)."""
    add = out.add
    for w in set(text.lower().split()):
        w = w.strip(_punct)
        n = len(w)
        if n < MIN_LEN:
            continue
        if n > MAX_LEN:
            if "://" not in w:
                add(f"skip:{w[0]}:{min(n, 99) // 10 * 10}")
            continue
        add(w)


def _clean(value: str, size: int = 20) -> str:
    """A header value as a token part: no white space, bounded length."""
    return "".join(value.split()).lower()[:size]


# prefix -> host -> its tokens: the same hosts recur in every mail.  A dict
# per prefix, not functools.lru_cache: no key tuple to build and hash and no
# recency list to keep, for ~7 lookups a mail; emptied when it grows too big.
_HOSTS: dict[str, dict[str, tuple[str, ...]]] = {}
_MAX_HOSTS = 1 << 16


def _host_tokens(prefix: str, host: str, out: set[str]) -> None:
    cache = _HOSTS.get(prefix)
    if cache is None:
        cache = _HOSTS[prefix] = {}
    found = cache.get(host)
    if found is None:
        if len(cache) >= _MAX_HOSTS:
            cache.clear()
        found = cache[host] = _host_token_tuple(prefix, host)
    out.update(found)


def _host_token_tuple(prefix: str, host: str) -> tuple[str, ...]:
    """`prefix:host` and its owner domains."""
    host = _clean(host, 255).strip(".").rsplit("@", 1)[-1]
    if not host:
        return ()
    if _IP.match(host):
        return (f"{prefix}:ip", f"{prefix}:{host.rsplit('.', 1)[0]}")
    out = [f"{prefix}:{host}"]
    labels = host.split(".")
    n = len(labels)
    if n > 8:
        out.append(f"{prefix}:many-labels")
    # the parent domains that can name an owner: example.com, example.co.uk
    if n > 2:
        out.append(f"{prefix}:{labels[-2]}.{labels[-1]}")
    if n > 3:
        out.append(f"{prefix}:{labels[-3]}.{labels[-2]}.{labels[-1]}")
    return tuple(out)


def html_to_text(markup: str, out: set[str]) -> str:
    """Visible text of HTML; link hosts and tag names go to `out` on the way."""
    if "//" in markup:
        for host in _HREF.findall(markup):
            _host_tokens("url", host, out)
    for tag in set(_TAG.findall(markup[:200_000])):
        out.add(f"html:{tag.lower()}")
    text = _ANYTAG.sub(" ", _drop_hidden(markup))
    if "&" not in text:
        return text
    import html  # its entity table costs start-up time; plain-text mail never needs it

    return html.unescape(text)


def _drop_hidden(markup: str) -> str:
    """Markup without <style>, <script>, <head> blocks and comments; linear time.

    An unclosed block or comment hides the rest of the document, as in a browser.
    The tags and comment openers come from _HIDDEN, the comment closers from
    str.find, merged in order: the same matches as one regex scanning for all
    three left to right (a "-->" never starts inside a "<..." match's first
    character, so the two searches cannot disagree), except the "-->" inside
    a tag match, which that scan consumed and which are skipped here too.
    """
    out: list[str] = []
    pos = 0
    closer = ""  # what ends the block we are in ("" when outside any)
    find = markup.find
    end_comment = find("-->")
    consumed = 0  # end of the last match: a "-->" before it was part of that match
    for m in _HIDDEN.finditer(markup):
        start = m.start()
        while 0 <= end_comment < start:
            if end_comment >= consumed:  # a "-->" match before this tag
                consumed = end_comment + 3
                if closer == "-->":
                    closer = ""
                    pos = consumed
            end_comment = find("-->", max(end_comment + 1, consumed))
        consumed = m.end()
        if closer:
            if closer != "-->" and m.group(1) and (m.group(2) or "").lower() == closer:
                closer = ""
                pos = consumed
            continue
        if m.group(2) is None:  # "<!--"
            closer = "-->"
        elif not m.group(1):
            closer = m.group(2).lower()
        else:
            continue
        out.append(markup[pos:start])
    if closer == "-->":
        while end_comment >= 0:
            if end_comment >= consumed:
                closer = ""
                pos = end_comment + 3
                break
            end_comment = find("-->", end_comment + 1)
    if not closer:
        out.append(markup[pos:])
    return " ".join(out)


def _split_address(value: str) -> tuple[str, str]:
    """(address, display name) of a From-like value; address "" if there is none.

    Plain string search, not a regex: a 60 KB From: without spaces must not
    cost seconds.
    """
    lt = value.rfind("<")
    if lt >= 0:
        gt = value.find(">", lt)
        addr = value[lt + 1 : gt if gt >= 0 else len(value)].strip()
        name = value[:lt]
    else:
        words_ = value.split()
        addr = next((w for w in reversed(words_) if "@" in w), "")
        name = value.replace(addr, " ") if addr else value
    if "@" not in addr or len(addr) > 254 or addr.split() != [addr]:
        return "", value
    return addr.strip('"()<>,;'), name


def _address_tokens(prefix: str, value: str, out: set[str]) -> None:
    addr, name = _split_address(value)
    if not addr:
        out.add(f"{prefix}:none")
    else:
        addr = addr.lower()
        out.add(f"{prefix}:addr:{addr}")
        local, _, domain = addr.rpartition("@")
        _host_tokens(_DOMAIN[prefix], domain, out)
        if any(map(str.isdigit, local)):  # a C loop, not a generator's frames
            out.add(f"{prefix}:local-has-digits")
    out.update(map(_NAME[prefix].__add__, words(name)))


def _header_tokens(part: Part, out: set[str]) -> None:
    h = part.headers
    out.update(map(_SEEN_TOKENS.__getitem__, _SEEN_FIELDS.intersection(h.names())))
    for name in _WORD_FIELDS:
        if name in h:
            prefix = name + ":"
            for value in h[name]:
                out.update(map(prefix.__add__, words(value)))
    subjects = h.get("subject")
    if subjects:
        s = subjects[0]
        if s.isascii():  # letters are A-Z and a-z: counted by deleting them (C loops)
            nletters = len(s) - len(s.translate(_NOT_LETTERS))
            nupper = len(s) - len(s.translate(_NOT_UPPER))
        else:
            letters = "".join(filter(str.isalpha, s))
            nletters, nupper = len(letters), sum(map(str.isupper, letters))
        if nletters >= 6 and nupper > 0.7 * nletters:
            out.add("subject:shouting")
        if "!" in s:
            out.add("subject:bang")
        if "$" in s:
            out.add("subject:dollar")
    else:
        out.add("subject:none")
    for value in h.first("from"):
        _address_tokens("from", value, out)
    for value in h.first("reply-to"):
        _address_tokens("reply-to", value, out)
    for field in ("to", "cc"):
        for value in h.first(field):
            n = value.count("@")
            out.add(f"{field}:count:{min(n, 5)}")
            for dom in _EMAIL.findall(value)[:5]:
                _host_tokens(_DOMAIN[field], dom, out)
    for value in h.first("message-id"):
        dom = value.rpartition("@")[2].strip("<> ")
        if dom:
            _host_tokens("message-id", dom, out)
        else:
            out.add("message-id:no-domain")
    if "message-id" not in h:
        out.add("message-id:none")
    for value in h.first("received", 4):
        ws = value.split()
        # the word after each "from" / "by"
        for host in compress(ws[1:], map(_FROM_BY.__contains__, ws)):
            if "." in host:
                _host_tokens("received", host.strip("()[];"), out)
        for a, b, c in _BRACKET_IP.findall(value):
            out.add(f"received:{a}.{b}.{c}")
    if "date" not in h:
        out.add("date:none")


def _charset(value: str) -> re.Match[str] | None:
    """_CHARSET.search(value), by str.find where it gives the same match.

    The case-insensitive regex has no literal start to skip to, so a search
    tries every position of the field (5 µs a part, 3% of the tokenizer).
    In ASCII text a match can only start where the lowered text has
    "charset", so those places are tried, in order; beyond ASCII, re.I
    also matches letters that lower() does not give ("ſ" for "s"): search.
    """
    if not value.isascii():
        return _CHARSET.search(value)
    low = value.lower()
    i = low.find("charset")
    while i >= 0:
        m = _CHARSET.match(value, i)
        if m:
            return m
        i = low.find("charset", i + 1)
    return None


def _part_tokens(part: Part, top: bool, out: set[str]) -> None:
    out.add(f"ct:{_clean(part.content_type, 40)}")
    h = part.headers
    for value in h.first("content-transfer-encoding"):
        out.add(f"cte:{_clean(value)}")
    for value in h.first("content-type"):
        m = _charset(value)
        if m:
            out.add(f"charset:{_clean(m.group(1), 30)}")
    if part.filename:
        ext = _clean(part.filename.rpartition(".")[2], 8)
        out.add(f"filename:{ext}" if ext else "filename:noext")
    if not top:
        for value in h.first("content-disposition"):
            out.add(f"cd:{_clean(value.split(';', 1)[0])}")


def tokenize(raw: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> set[str]:
    """The set of tokens of one raw message.  Never raises on any input."""
    out: set[str] = set()
    try:
        _tokenize(raw, max_bytes, out)
    except (RecursionError, MemoryError):  # pragma: no cover - bounded by mime limits
        out.add("tokenizer:gave-up")
    except Exception:
        # A bug must not cost a mail its label: fall back to the raw words.
        out.add("tokenizer:error")
        out.update(words(raw[:max_bytes].decode("latin-1")))
    return out


def _tokenize(raw: bytes, max_bytes: int, out: set[str]) -> None:
    if raw.startswith(b"From "):  # an mbox From_ line
        raw = raw[raw.find(b"\n") + 1 :]
    text_seen = False
    first = True
    parts, flags = walk(raw, max_bytes)
    out.update(flags)
    for part in parts:
        if first:
            _header_tokens(part, out)
        _part_tokens(part, first, out)
        first = False
        text = part.text
        if not text:
            continue
        text_seen = True
        if part.content_type == "text/html" or (
            # only "<" lowers to "<": most plain text is never lowered here
            part.content_type == "text/plain"
            and "<" in text[:2000]
            and "<html" in text[:2000].lower()
        ):
            text = html_to_text(text, out)
        if "://" in text:
            for host in _URL.findall(text):
                _host_tokens("url", host, out)
        if "@" in text:
            for dom in _EMAIL.findall(text)[:20]:
                _host_tokens("email", dom, out)
        add_words(text, out)
    if not text_seen:
        out.add("body:no-text")
