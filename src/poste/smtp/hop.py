"""Next hops: where a service passes a mail once its stage accepted it.

A hop is opened per transaction, at the first recipient the local stage
accepts, and every recipient is forwarded at once (cut-through): so the reply
the sender gets for each RCPT is the next hop's own, and the 250 at the end of
DATA is the next hop's 250.  Three kinds exist: an SMTP client to
`--destination` (`poste.smtp.client.SMTPHop`), the next stage in the same
process (`poste.smtp.chain.StageHop`, used by `poste up`), and the relay's
durable queue.
"""

from __future__ import annotations

from typing import Protocol

from poste.smtp.message import Message
from poste.smtp.stage import Envelope, Reply


class HopError(Exception):
    """The next hop could not be reached or broke mid-transaction."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class Transaction(Protocol):
    """One mail transaction with the next hop.  Methods return the hop's reply."""

    async def mail(self, sender: str, options: list[str]) -> Reply: ...

    async def rcpt(self, rcpt: str, options: list[str]) -> Reply: ...

    async def data(self, message: Message) -> Reply:
        """Pass the mail on; `message` stays the caller's (it closes it after)."""
        ...

    async def abort(self) -> None:
        """End the transaction without sending (RSET, QUIT, lost client)."""
        ...


class Hop(Protocol):
    async def open(self, env: Envelope) -> Transaction:
        """Start a transaction; raises HopError when the hop is unreachable."""
        ...
