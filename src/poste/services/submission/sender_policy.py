"""Header From policy: a user sends only as themselves (issue 15, item 8).

The envelope sender is checked at MAIL; this checks what people see and what
DMARC aligns on: every address in From: (and in Sender:, when present) must
be one of the logged-in user's addresses (their own, an alias, a +tag of
either) or match the user's `send-as` grant in the users repository
(`*@domain` or `local@domain`).  Otherwise the mail is refused with 553 5.7.1
before anything is passed on, so nothing is signed.

The header is read by hand from the raw bytes (no `email` policy that raises
or repairs), and judged twice, so that no parser differential between us and
the reader's mail client can hide an address:

1. `email.utils.getaddresses` (compat32 parsing) on each field must yield at
   least one address, and every address it yields (groups flattened) must be
   the user's;
2. every address-like token anywhere in the field, raw and after decoding
   RFC 2047 encoded words (display names, comments, quoted strings), must be
   the user's too: `"alice@our.test" <bob@our.test>` and
   `=?utf-8?q?alice=40our.test?= <bob@our.test>` are refused for bob.

Exactly one From: is required (RFC 5322 3.6: a missing From is refused with
550 5.6.0 rather than added: an MSA may add Date and Message-ID, RFC 6409
section 8, but who the mail is from is the author's to say), and at most one
Sender:.  Duplicated fields are a known way to show one From to the reader
and another to DMARC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.header import decode_header
from email.utils import getaddresses

from poste.smtp.stage import Reply
from poste.users.repo import User, UsersDB

NOT_YOURS = "5.7.1 Header {field} address not owned by the authenticated user"

# Something a mail client could show as an address: no spaces, brackets, quotes or
# separators on either side of one @.
_ADDRESS_LIKE = re.compile(r"[^\s<>()\[\],;:\"@\\]+@[^\s<>()\[\],;:\"@\\]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Field:
    name: str  # as written (case kept), without the colon
    value: str  # unfolded


def header_fields(data: bytes) -> list[Field]:
    """The header section's fields, unfolded (8-bit that is not UTF-8 becomes U+FFFD)."""
    end = 0 if data.startswith((b"\r\n", b"\n")) else len(data)  # empty header section
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = data.find(sep)
        if at != -1:
            end = min(end, at)
    text = data[:end].decode("utf-8", "replace")
    fields: list[Field] = []
    for line in re.split(r"\r?\n", text):
        if line[:1] in (" ", "\t") and fields:
            last = fields[-1]
            fields[-1] = Field(last.name, last.value + line)
            continue
        name, colon, value = line.partition(":")
        if colon:
            fields.append(Field(name, value))
    return fields


def _decoded(value: str) -> str:
    """The value with RFC 2047 encoded words decoded (best effort, never raises)."""
    try:
        parts = decode_header(value)
    except (ValueError, LookupError):
        return value
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, bytes):
            try:
                out.append(chunk.decode(charset or "ascii", "replace"))
            except LookupError:
                out.append(chunk.decode("latin-1"))
        else:
            out.append(chunk)
    return " ".join(out)


# `addr@dom` or `Name Words <addr@dom>` (atoms only: no quotes, comments or encoded
# words, so no other place for an address to hide): what nearly every mail client writes.
# For these the parser's answer is the one address (tests/test_submission_header_from.py
# compares both ways over generated values); everything else goes through the parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_SIMPLE = re.compile(
    rf"[ \t]*(?:(?P<bare>{_DOT_ATOM}@{_DOT_ATOM})"
    rf"|(?:{_ATEXT}+(?:[ \t]+{_ATEXT}+)*[ \t]*)?<(?P<addr>{_DOT_ATOM}@{_DOT_ATOM})>)[ \t]*")


def field_addresses(value: str) -> tuple[list[str], list[str]] | None:
    """(addresses the parser finds, address-like tokens anywhere); None if unreadable."""
    if _CONTROL.search(value):
        return None
    simple = _SIMPLE.fullmatch(value) if "=?" not in value else None
    if simple is not None:  # no encoded word: decoding would change nothing
        tokens = _ADDRESS_LIKE.findall(value)
        return [simple.group("bare") or simple.group("addr")], tokens + tokens
    return parsed_addresses(value)


def parsed_addresses(value: str) -> tuple[list[str], list[str]]:
    """field_addresses the long way: the parser, and the tokens raw and decoded."""
    parsed = [addr for _, addr in getaddresses([value]) if addr]
    tokens = _ADDRESS_LIKE.findall(value) + _ADDRESS_LIKE.findall(_decoded(value))
    return parsed, tokens


def owns(db: UsersDB, user: User, address: str) -> bool:
    """Whether `user` may put `address` in From:/Sender: (own, alias, +tag, or send-as)."""
    address = address.strip().rstrip(".")
    if "@" not in address:  # a bare `bob` is no address to show or align on
        return False
    owner = db.lookup(address)
    if owner is not None and owner.path == user.path:
        return True
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return False
    domain = domain.lower().rstrip(".")
    for grant in user.send_as:
        g_local, _, g_domain = grant.rpartition("@")
        if g_domain == domain and (g_local == "*" or g_local.lower() == local.lower()):
            return True
    return False


def check_header(db: UsersDB, user: User, data: bytes) -> Reply | None:
    """None if the header's From:/Sender: are the user's, else the refusal."""
    fields = header_fields(data)
    by_name: dict[str, list[str]] = {"from": [], "sender": []}
    for f in fields:
        key = f.name.rstrip(" \t").lower()  # obs-syntax allows blanks before the colon
        if key in by_name:
            by_name[key].append(f.value)
    if len(by_name["from"]) != 1:
        which = "no" if not by_name["from"] else "more than one"
        return Reply(550, f"5.6.0 The mail has {which} From: header field (RFC 5322 3.6)")
    if len(by_name["sender"]) > 1:
        return Reply(550, "5.6.0 The mail has more than one Sender: header field (RFC 5322 3.6)")
    for name, values in (("From:", by_name["from"]), ("Sender:", by_name["sender"])):
        for value in values:
            found = field_addresses(value)
            if found is None:
                return Reply(553, NOT_YOURS.format(field=name))
            parsed, tokens = found
            if not parsed or not all(owns(db, user, a) for a in parsed + tokens):
                return Reply(553, NOT_YOURS.format(field=name))
    return None
