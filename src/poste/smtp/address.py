"""Mail addresses as SMTP carries them: parsed strictly once, at the edge, and never again.

Why our own parser: aiosmtpd reads paths with the `email` header parser
(comments, obsolete routes, a CR kept inside quotes) and aiosmtplib rewrites
them with `email.utils.parseaddr` before sending.  Between the two, the
address a service checked was not the address it sent on:
`<"victim@other.test\\r"@our.test>` passed the check for our.test and left
for other.test (an open relay).  So the SMTP listener accepts only the
grammar of RFC 5321 4.1.2 (with RFC 6531's UTF-8 where SMTPUTF8 allows),
refuses every control character, and from then on the address text is
carried byte for byte: stages read its parts from `Address`, and the SMTP
client writes `<text>` as it is.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

# RFC 5321 4.1.2 / RFC 5322 3.2.3 atext; RFC 6531 adds every non-ASCII character (but not
# the lone surrogates that aiosmtpd's surrogateescape makes of bytes that are not UTF-8).
_U8 = "\u0080-\ud7ff\ue000-\U0010ffff"
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_ATOM = rf"[{_ATEXT}{_U8}]+"
_LABEL = rf"[A-Za-z0-9{_U8}](?:[A-Za-z0-9\-{_U8}]*[A-Za-z0-9{_U8}])?"
_DOMAIN_RX = rf"{_LABEL}(?:\.{_LABEL})*"


class _Grammar:
    """The path grammar, compiled at first use: the Unicode classes cost about 80 ms to
    compile, which every poste process (a `--help` included) would pay at import."""

    @functools.cached_property
    def dot_string(self) -> re.Pattern[str]:
        return re.compile(rf"{_ATOM}(?:\.{_ATOM})*")

    @functools.cached_property
    def quoted(self) -> re.Pattern[str]:
        # qtextSMTP (%d32-33 / %d35-91 / %d93-126) or quoted-pairSMTP (%d92 %d32-126), + UTF-8
        return re.compile(rf'"(?:[ !#-\[\]-~{_U8}]|\\[ -~])*"')

    @functools.cached_property
    def domain(self) -> re.Pattern[str]:
        return re.compile(_DOMAIN_RX)

    @functools.cached_property
    def general_literal(self) -> re.Pattern[str]:
        return re.compile(r"[A-Za-z0-9\-]*[A-Za-z0-9]:[!-Z^-~]+")

    @functools.cached_property
    def adl(self) -> re.Pattern[str]:
        return re.compile(rf"@{_DOMAIN_RX}(?:,@{_DOMAIN_RX})*:")


_G = _Grammar()
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

MAX_PATH = 256  # RFC 5321 4.5.3.1.3, counting the angle brackets
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2


class AddressError(ValueError):
    """A path that RFC 5321 does not allow; `code` and `text` are the SMTP reply."""

    def __init__(self, message: str, code: int = 553, status: str = "5.1.3") -> None:
        super().__init__(message)
        self.code = code
        self.text = f"{status} {message}"


@dataclass(frozen=True)
class Address:
    """One mailbox: `local` exactly as written (quoted or not), `domain` as written.

    `domain` is empty only for the special recipient `<Postmaster>` (RFC 5321
    4.5.1).  Compare domains through `domain_key(address.domain)`; send `text`.
    """

    local: str
    domain: str

    @property
    def text(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def local_content(self) -> str:
        """The local part with its quoting undone (`"john doe"` -> `john doe`)."""
        return unquote_local(self.local)

    def __str__(self) -> str:
        return self.text


@functools.lru_cache(maxsize=4096)
def ip_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's IP as poste compares it: no %zone, an IPv4-mapped IPv6 address as IPv4.

    A listener on `::` sees IPv4 clients as ::ffff:a.b.c.d; SPF, caps, budgets
    and granted networks must all see the same a.b.c.d.  Kept per text (the
    addresses are immutable): admission, rDNS and SPF each parsed the peer's
    again, 1.4% of `poste up`'s CPU at 5 KB, one connection per mail (issue 16).
    """
    try:
        addr = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def domain_key(name: str) -> str:
    """A domain as poste compares it: no surrounding space, no root dot, lower case."""
    return name.strip().rstrip(".").lower()


def domain_of(address: str) -> str:
    """The domain_key of a mailbox's domain ("" for `<Postmaster>` and the null sender).

    Splitting at the last '@' is right only for an address that passed
    `parse_path`/`parse_mailbox`: a domain holds no '@', a quoted local part may.
    """
    return domain_key(address.rpartition("@")[2]) if "@" in address else ""


def unquote_local(local: str) -> str:
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


def quote_local(content: str) -> str:
    """The shortest way to write `content` as a local part: a dot-string, or quoted."""
    if _G.dot_string.fullmatch(content):
        return content
    if _CONTROL.search(content):
        raise AddressError("Control character in local part")
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_domain(domain: str) -> None:
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("Domain name too long")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError("Bad address literal")
        inner = domain[1:-1]
        try:
            if inner[:5].upper() == "IPV6:":
                ipaddress.IPv6Address(inner[5:])
            elif ":" in inner:
                if not _G.general_literal.fullmatch(inner):
                    raise ValueError(inner)
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            raise AddressError("Bad address literal") from None
        return
    if not _G.domain.fullmatch(domain):
        raise AddressError("Bad domain name")
    if any(len(label.encode("utf-8")) > 63 for label in domain.split(".")):
        raise AddressError("Domain label too long")


def _split_mailbox(text: str) -> tuple[str, str]:
    """Local-part and domain of a mailbox; the local part may itself hold '@' in quotes."""
    if text.startswith('"'):
        m = _G.quoted.match(text)
        if m is None:
            raise AddressError("Bad quoted local part")
        local, rest = m.group(), text[m.end() :]
        if not rest.startswith("@"):
            raise AddressError("Missing domain")
        return local, rest[1:]
    local, at, domain = text.rpartition("@")
    if not at:
        raise AddressError("Missing domain")
    if not _G.dot_string.fullmatch(local):
        raise AddressError("Bad local part")
    return local, domain


def parse_mailbox(text: str) -> Address:
    """A mailbox (`local@domain`) in RFC 5321 syntax; AddressError if it is not one."""
    if _CONTROL.search(text):
        raise AddressError("Control character in address", 501, "5.1.3")
    local, domain = _split_mailbox(text)
    _check_domain(domain)
    return Address(local, domain)


def parse_path(arg: str, *, recipient: bool) -> tuple[Address | None, str]:
    """Parse the argument of MAIL FROM: / RCPT TO: into (address, parameters).

    None is the null reverse-path `<>` (MAIL only).  A source route
    (`<@a,@b:user@c>`) is accepted and dropped, as RFC 5321 4.1.1.3 and
    appendix C ask.  A bare mailbox without angle brackets is accepted
    (many old clients send it; Postfix takes it too), but nothing else is
    loosened: no comments, no spaces, no control characters.
    """
    if _CONTROL.search(arg):
        raise AddressError("Control character in address", 501, "5.1.3")
    arg = arg.lstrip(" ")
    if arg.startswith("<"):
        end = _path_end(arg)
        inner, rest = arg[1:end], arg[end + 1 :]
        if end + 1 > MAX_PATH:
            raise AddressError("Path too long", 501, "5.1.3")
    else:
        inner, _, rest = arg.partition(" ")
        rest = " " + rest if rest else ""
    if rest and not rest.startswith(" "):
        raise AddressError("Garbage after address", 501, "5.5.4")
    if inner == "":
        if recipient:
            raise AddressError("Null recipient not allowed", 501, "5.1.3")
        return None, rest
    m = _G.adl.match(inner)
    if m is not None:
        inner = inner[m.end() :]
    if recipient and "@" not in inner and inner.lower() == "postmaster":
        return Address(inner, ""), rest
    return parse_mailbox(inner), rest


def _path_end(arg: str) -> int:
    """Index of the '>' that closes the path, skipping quoted strings."""
    i, quoted = 1, False
    while i < len(arg):
        c = arg[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ">":
            return i
        i += 1
    raise AddressError("Unterminated path", 501, "5.1.3")


def smtp_path(text: str) -> bytes:
    """`<text>` for a MAIL/RCPT command, after the same strict check the listener applies.

    Every address poste sends passed `parse_path` on the way in or was
    built with `quote_local`; checking again here means a bug elsewhere is
    a refused command, never an address rewritten into another one.
    """
    if text:
        if text.lower() != "postmaster":
            parse_mailbox(text)
    return b"<" + text.encode("utf-8") + b">"
