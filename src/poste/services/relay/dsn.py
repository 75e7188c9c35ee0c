"""Delivery status notifications (RFC 3464 multipart/report) for the original sender.

Sent with the null sender `<>` (so a DSN is never bounced itself, RFC 5321
6.1), only to a real sender: never to `<>` and never for a DSN.  The report
carries the original header fields (text/rfc822-headers), not the body: the
sender has the body, and a bounce should not carry spam back out.
"""

from __future__ import annotations

import email.utils
import secrets
import time
from collections.abc import Sequence

from poste.services.relay.spool import Recipient

FAILED = "failed"
DELAYED = "delayed"


def status_of(reply: str, default: str) -> str:
    """The enhanced status code in an SMTP reply text, else `default`.

    Remote replies carry it after the code ("550 5.1.1 ..."); our own failures
    start with it ("5.1.2 Domain ... does not exist").
    """
    parts = reply.split()
    for word in parts[:3]:
        bits = word.split(".")
        if len(bits) == 3 and all(b.isdigit() for b in bits) and bits[0] in "245":
            return word
    if parts and parts[0].isdigit() and len(parts[0]) == 3:
        return {"4": "4.0.0", "5": "5.0.0"}.get(parts[0][0], default)
    return default


def _headers_of(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    head = message if end < 0 else message[: end + 2]
    return head[: 64 * 1024]


def _date(ts: float) -> str:
    return email.utils.formatdate(ts, localtime=False)


def make_dsn(
    *,
    action: str,
    reporting_mta: str,
    postmaster_domain: str,
    to: str,
    recipients: Sequence[Recipient],
    original: bytes,
    queue_id: str,
    arrival: float,
    retry_until: float | None = None,
    now: float | None = None,
) -> bytes:
    """Build the DSN message (CRLF line ends) for `recipients` of one queued mail."""
    ts = time.time() if now is None else now
    boundary = f"=_poste_{secrets.token_hex(12)}"
    if action == FAILED:
        subject = "Undelivered Mail Returned to Sender"
        human = (
            "This is the mail system at {host}.\r\n\r\n"
            "I'm sorry to have to inform you that your message could not\r\n"
            "be delivered to one or more recipients. The reasons are below.\r\n"
        )
    else:
        subject = "Delayed Mail (still being retried)"
        human = (
            "This is the mail system at {host}.\r\n\r\n"
            "Your message could not be delivered yet to one or more recipients.\r\n"
            "The mail system will keep trying until {until}.\r\n"
            "You do not need to send it again.\r\n"
        )
    text = human.format(host=reporting_mta, until=_date(retry_until or ts))
    text += "\r\n"
    for r in recipients:
        text += f"<{r.address}>: {r.last_reply or 'no reply'}\r\n"

    status_default = "5.0.0" if action == FAILED else "4.0.0"
    per_message = (
        f"Reporting-MTA: dns; {reporting_mta}\r\n"
        f"X-Poste-Queue-ID: {queue_id}\r\n"
        f"Arrival-Date: {_date(arrival)}\r\n"
    )
    blocks = []
    for r in recipients:
        lines = []
        if r.original and r.original.lower() != r.address.lower():
            lines.append(f"Original-Recipient: rfc822; {r.original}")
        lines.append(f"Final-Recipient: rfc822; {r.address}")
        lines.append(f"Action: {action}")
        lines.append(f"Status: {status_of(r.last_reply, status_default)}")
        if r.remote_mta:
            lines.append(f"Remote-MTA: dns; {r.remote_mta}")
        if r.last_reply and r.last_reply[:3].isdigit():
            lines.append(f"Diagnostic-Code: smtp; {_oneline(r.last_reply)}")
        elif r.last_reply:
            lines.append(f"Diagnostic-Code: X-poste; {_oneline(r.last_reply)}")
        if r.last_attempt:
            lines.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if action == DELAYED and retry_until:
            lines.append(f"Will-Retry-Until: {_date(retry_until)}")
        blocks.append("\r\n".join(lines) + "\r\n")
    status_part = per_message + "\r\n" + "\r\n".join(blocks)

    headers = (
        f"From: Mail Delivery System <MAILER-DAEMON@{postmaster_domain}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {_date(ts)}\r\n"
        f"Message-ID: <{queue_id}.{secrets.token_hex(6)}@{reporting_mta}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f' boundary="{boundary}"\r\n'
        "Content-Transfer-Encoding: 8bit\r\n"
    )
    out = [
        headers.encode("utf-8"),
        b"\r\nThis is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\n".encode(),
        b"Content-Description: Notification\r\n",
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n",
        text.encode("utf-8"),
        f"\r\n--{boundary}\r\n".encode(),
        b"Content-Description: Delivery report\r\n",
        b"Content-Type: message/delivery-status\r\n\r\n",
        status_part.encode("utf-8"),
        f"\r\n--{boundary}\r\n".encode(),
        b"Content-Description: Undelivered Message Headers\r\n",
        b"Content-Type: text/rfc822-headers\r\n\r\n",
        _crlf(_headers_of(original)),
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(out)


def _oneline(text: str) -> str:
    return " ".join(text.split())[:900]


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
