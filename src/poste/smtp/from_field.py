"""The From fields of a header section, as the email package (compat32) would give them.

The verifier's DMARC (`from_domain`, here so that the spam evaluation can group
mails by the same From domain) and the relay's forward plan (`author_of`)
each parsed the whole header with `email.message_from_bytes` to ask for
`get_all("From")`: at 5 KB that was 6% of the verifier's CPU and 10% of the
relay's in the separate processes (issue 16).  A header of the shape nearly every
mail has (ASCII, CRLF line ends, each line a `name:` field or a continuation of
one, no envelope `From ` line) is read here with one regex instead, to the same
values; anything else (`None`) goes to the email package as before, so no mail is
read differently (tests/test_from_field.py compares both ways over generated
headers).
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re

import dns.exception
import dns.name

from poste.smtp.address import domain_key

# compat32's field line: a name of printable characters but ":" and space, then ":";
# here at least one character in the name (email's parser allows none: not ours).
_LINES = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]+:[^\r\n]*\r\n|[ \t][^\r\n]*\r\n)*")
_FROM = re.compile(rb"^from:([^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)", re.IGNORECASE | re.MULTILINE)


def from_values(header: bytes) -> list[str] | None:
    """The values of the From fields of `header` (through its blank line), unfolded as
    compat32 keeps them; None when the header is not of the simple shape."""
    if not header.endswith(b"\r\n\r\n") or header[:1] in (b" ", b"\t") \
            or header.startswith(b"From ") or not header.isascii():
        return None
    fields = header[:-2]
    if _LINES.fullmatch(fields) is None:
        return None
    # compat32: the first line's value without its leading blanks, the continuation
    # lines as they are, CR and LF stripped at the end
    return [m.group(1).decode("ascii").lstrip(" \t").rstrip("\r\n")
            for m in _FROM.finditer(fields)]


def from_fields(header: bytes) -> list[str]:
    """`email.message_from_bytes(header, policy=compat32).get_all("From")` as strings
    (`[]` when there is none), by the regex when the header allows; may raise what the
    parser raises."""
    values = from_values(header)
    if values is not None:
        return values
    msg = email.message_from_bytes(header, policy=email.policy.compat32)
    return [str(v) for v in msg.get_all("From") or []]


def from_domain(message: bytes) -> tuple[str | None, str]:
    """The RFC5322.From domain, or None and why (no From, several, unparseable)."""
    try:
        fields = from_fields(message)  # as email's parser would, by a regex mostly
    except Exception as exc:  # the transport path never trusts the parser
        return None, f"message not parseable ({exc.__class__.__name__})"
    if len(fields) != 1:
        return None, "no From field" if not fields else "several From fields"
    try:
        addresses = email.utils.getaddresses([fields[0]])
    except Exception:
        return None, "From not parseable"
    addresses = [a for a in addresses if a[1]]
    if len(addresses) != 1:
        return None, "From has no single address"
    _, at, domain = addresses[0][1].rpartition("@")
    if not at:
        return None, "From has no domain"
    domain = domain_key(domain)
    if not domain or not _is_domain(domain):
        return None, "From has no domain"
    return domain, ""


def _is_domain(text: str) -> bool:
    try:
        dns.name.from_text(text)
    except (dns.exception.DNSException, UnicodeError):
        return False
    return all(c.isalnum() or c in "-._" for c in text)
