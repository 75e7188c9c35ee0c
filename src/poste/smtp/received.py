"""The `Received:` trace field every service prepends (RFC 5321 4.4, design.md section 2)."""

from __future__ import annotations

import re
import time
from email.utils import formatdate

from poste.smtp.stage import Envelope

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\[\]\\;]")


def _clean(text: str, limit: int = 255) -> str:
    """HELO names and rDNS come from strangers: keep them printable and inert."""
    cleaned = _UNSAFE.sub("_", text)[:limit]
    return cleaned or "unknown"


_date: tuple[int, str] = (0, "")


def _now() -> str:
    """The RFC 5322 date of this second, made once a second (three fields per sent mail
    in `poste up` each formatted it: 1-2% of the CPU)."""
    global _date
    second = int(time.time())
    if _date[0] != second:
        _date = (second, formatdate(second, localtime=False, usegmt=True).replace("GMT", "+0000"))
    return _date[1]


def _literal(ip: str) -> str:
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def received_field(env: Envelope, hostname: str, date: str | None = None) -> bytes:
    """One folded `Received:` field, CRLF-terminated.

    `for <rcpt>` is given only for a single recipient: with several it would
    tell each recipient who else got the mail.  No AUTH identity is ever
    written here; `with ESMTPSA` says authentication happened, nothing more.

    It names only what happened: the peer's address and name only for a
    TCP connection; a unix socket or a stage of this process (`poste up`)
    has none, and says how the mail came instead, with RFC 5321's `via`
    clause (`via unix`, `via poste-up`), so one field per stage has the same
    shape in either topology.
    """
    helo = _clean(env.helo) if env.helo else "unknown"
    if env.peer_ip:
        detail = (
            f"{_clean(env.peer_name)} {_literal(env.peer_ip)}"
            if env.peer_name
            else _literal(env.peer_ip)
        )
        lines = [f"Received: from {helo} ({detail})"]
    else:
        lines = [f"Received: from {helo}"]
    if env.tls and env.tls_version:
        cipher = f" with cipher {_clean(env.tls_cipher)}" if env.tls_cipher else ""
        lines.append(f"\t(using {_clean(env.tls_version)}{cipher})")
    via = f" via {_clean(env.via)}" if env.via and not env.peer_ip else ""
    lines.append(f"\tby {_clean(hostname)} (poste){via} with {env.protocol} id {env.queue_id}")
    when = date or _now()
    if len(env.rcpt_tos) == 1:
        lines.append(f"\tfor <{_clean(env.rcpt_tos[0], 320)}>; {when}")
    else:
        lines[-1] += f"; {when}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
