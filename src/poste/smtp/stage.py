"""The contract between the SMTP core and the services.

A service is one SMTP listener in front of one *stage* and one *next hop*
(design.md section 1).  The stage only judges: it sees the envelope as it is
built and the raw bytes at the end of DATA, and answers with header fields to
prepend or a refusal.  It never re-serialises a message, so the bytes that go
out are the bytes that came in, with fields prepended.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from poste.smtp.message import Message


def new_queue_id() -> str:
    """A short, sortable, unique id, shown in Received: and in every log line."""
    return f"{int(time.time() * 1000):x}{secrets.token_hex(3)}".upper()


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: a code and its text (with the enhanced status code in front).

    The same type says what a next hop, a remote MX or poste itself answered:
    `remote_mta` names the host it is about (for DSNs and logs), and `remote`
    is true when the text is that host's own words rather than ours.
    """

    code: int
    text: str
    remote_mta: str = ""
    remote: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def record(self) -> str:
        """As the spool and the logs keep it: the remote's line with its code, or our words."""
        return f"{self.code} {self.text}" if self.remote else self.text

    def wire(self) -> bytes:
        """The reply as bytes on the socket, for the few places that write before aiosmtpd."""
        return (str(self) + "\r\n").encode("utf-8")

    def __str__(self) -> str:
        lines = self.text.splitlines() or [""]
        out = [f"{self.code}-{line}" for line in lines[:-1]]
        out.append(f"{self.code} {lines[-1]}")
        return "\r\n".join(out)


@dataclass
class Envelope:
    """What the SMTP session knows about the mail in transit."""

    queue_id: str = field(default_factory=new_queue_id)
    helo: str = ""
    peer_ip: str = ""
    peer_port: int = 0
    peer_name: str | None = None  # reverse DNS of peer_ip, when known
    local_ip: str = ""
    tls: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    auth_user: str | None = None
    # The client is one of our own services, proven by the way it came: a unix socket
    # (only our services can open its folder) or a hop inside this process.  Never
    # an address: anyone on the machine can connect from 127.0.0.1.
    own_hop: bool = False
    # How the client reached us when it was not TCP, for Received: (RFC 5321 4.4 `via`):
    # "unix" (a unix socket: no address to name) or "poste-up" (a stage of this process).
    via: str = ""
    esmtp: bool = True
    mail_from: str = ""  # "" is the null sender <>
    mail_options: list[str] = field(default_factory=list)
    rcpt_tos: list[str] = field(default_factory=list)
    rcpt_options: list[list[str]] = field(default_factory=list)

    @property
    def protocol(self) -> str:
        """The `with` word of Received: (RFC 3848)."""
        if not self.esmtp:
            return "SMTP"
        word = "ESMTP"
        if self.tls:
            word += "S"
        if self.auth_user:
            word += "A"
        return word

    def copy_for_transaction(self) -> Envelope:
        """A fresh envelope for the next transaction on the same connection."""
        return Envelope(
            helo=self.helo,
            peer_ip=self.peer_ip,
            peer_port=self.peer_port,
            peer_name=self.peer_name,
            local_ip=self.local_ip,
            tls=self.tls,
            tls_version=self.tls_version,
            tls_cipher=self.tls_cipher,
            auth_user=self.auth_user,
            own_hop=self.own_hop,
            via=self.via,
            esmtp=self.esmtp,
        )


@dataclass
class Verdict:
    """What a stage says at the end of DATA.

    `reply` None means: accept, prepend `prepend` (complete header lines, each
    ending in CRLF, stage fields above our Received:) and pass on to the next
    hop.  A 4xx or 5xx `reply` refuses the mail with that reply.  `message`,
    when given, replaces the received mail (a view sharing its body).
    """

    prepend: bytes = b""
    reply: Reply | None = None
    # The mail as the stage rewrote it, when it must (the relay's From rewrite for
    # DMARC, services/relay/from_rewrite.py): `prepend` goes on top of this instead.
    message: Message | None = None
    # What the stage found, as `key=value` words (`spf=pass dkim=pass ...`): the core
    # puts it in its one INFO line per mail per service, so no stage logs a line of
    # its own per mail (issue 16: eight lines per mail were 6-8% of `poste up`'s CPU).
    note: str = ""


class Stage:
    """The do-nothing stage: accepts every sender, recipient and message.

    Services subclass it.  Hooks return None to accept or a Reply to refuse.
    `on_data` gets the mail as a `Message`: read the header with `header()`,
    take the whole of it only through `whole()` (a big mail is in a file, and
    the budget keeps many of them from filling memory at once).  CPU-heavy
    work in `on_data` must run off the event loop (`await asyncio.to_thread(...)`).
    """

    name = "forward"

    async def on_connect(self, env: Envelope) -> Reply | None:
        return None

    async def on_mail(self, env: Envelope, sender: str) -> Reply | None:
        return None

    async def on_rcpt(self, env: Envelope, rcpt: str) -> Reply | None:
        return None

    async def on_data(self, env: Envelope, message: Message) -> Verdict:
        return Verdict()
