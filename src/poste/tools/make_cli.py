"""`poste make`: build a mail from a body on stdin (blaze's `make`)."""

from __future__ import annotations

import re
import sys
from email.header import Header
from email.utils import formatdate, make_msgid

import click

_FIELD_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")  # printable, no colon (RFC 5322 2.2)


def _encode_value(value: str) -> str:
    if value.isascii():
        return value
    return Header(value, "utf-8").encode()


def _fold(name: str, value: str) -> str:
    return f"{name}: {_encode_value(value)}"


def _body(raw: bytes) -> tuple[list[str], bytes]:
    """MIME fields and the body in CRLF form; QP when lines are too long or not UTF-8."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    lines = text.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    long_lines = any(len(line) > 998 for line in lines)
    try:
        text.decode("utf-8")
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    if text.isascii() and not long_lines:
        fields = ["Content-Transfer-Encoding: 7bit", "Content-Type: text/plain; charset=us-ascii"]
        return fields, b"".join(line + b"\r\n" for line in lines)
    if utf8 and not long_lines:
        fields = ["Content-Transfer-Encoding: 8bit", "Content-Type: text/plain; charset=utf-8"]
        return fields, b"".join(line + b"\r\n" for line in lines)
    import quopri

    encoded = quopri.encodestring(b"\n".join(lines) + b"\n").replace(b"\n", b"\r\n")
    charset = "utf-8" if utf8 else "unknown-8bit"
    fields = [
        "Content-Transfer-Encoding: quoted-printable",
        f"Content-Type: text/plain; charset={charset}",
    ]
    return fields, encoded


def build(
    sender: str,
    to: list[str],
    cc: list[str],
    fields: list[str],
    body: bytes,
    date: str = "now",
    message_id: bool = False,
) -> bytes:
    headers: list[str] = []
    if date == "now":
        headers.append(f"Date: {formatdate(localtime=True)}")
    elif date != "none":
        headers.append(f"Date: {date}")
    if to:
        headers.append(_fold("To", ", ".join(to)))
    if cc:
        headers.append(_fold("Cc", ", ".join(cc)))
    headers.append(_fold("From", sender))
    if message_id:
        domain = sender.rpartition("@")[2].strip("> ") or None
        headers.append(f"Message-ID: {make_msgid(domain=domain)}")
    mime, encoded = _body(body)
    headers.append("MIME-Version: 1.0")
    headers.extend(mime)
    for field in fields:
        name, sep, value = field.partition(":")
        if not sep or not _FIELD_NAME.match(name.strip()):
            raise click.BadParameter(
                f"not a header field 'Name: value': {field!r}", param_hint="-f"
            )
        headers.append(_fold(name.strip(), value.strip()))
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + encoded


@click.command(context_settings={"help_option_names": ["--help"]})
@click.option("--from", "sender", required=True, help="The From: address.")
@click.option("--to", multiple=True, help="A To: address (repeatable).")
@click.option("--cc", multiple=True, help="A Cc: address (repeatable).")
@click.option(
    "-f",
    "--field",
    "fields",
    multiple=True,
    metavar='"Name: value"',
    help='An extra header field (repeatable), e.g. -f "Subject: Hello".',
)
@click.option("--date", default="now", show_default=True, help="'now', 'none', or a date to use.")
@click.option("--message-id", is_flag=True, help="Add a Message-ID: field.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write here instead of stdout.",
)
def main(
    sender: str,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    fields: tuple[str, ...],
    date: str,
    message_id: bool,
    output: str | None,
) -> None:
    """Build a mail (CRLF line endings) from the body read on stdin."""
    body = sys.stdin.buffer.read()
    mail = build(sender, list(to), list(cc), list(fields), body, date, message_id)
    if output:
        try:
            with open(output, "wb") as f:
                f.write(mail)
        except OSError as exc:
            raise click.ClickException(f"cannot write {output}: {exc.strerror}") from None
    else:
        sys.stdout.buffer.write(mail)
        sys.stdout.buffer.flush()
