"""A stage in front of a hop: the one place where cut-through is implemented.

The SMTP server runs each transaction through a `StageTransaction`, and
`StageHop` makes the same thing a hop, so `poste up` can chain stages in
memory with exactly the behaviour (replies, prepended fields, Received:) of
services talking SMTP to each other.
"""

from __future__ import annotations

import logging
import time

from poste.metrics import MAILS, RECIPIENTS, labelled, outcome
from poste.smtp import replies as R
from poste.smtp.hop import Hop, HopError, Transaction
from poste.smtp.message import Message
from poste.smtp.received import received_field
from poste.smtp.stage import Envelope, Reply, Stage

log = logging.getLogger("poste.smtp")


class StageTransaction:
    """One mail through one stage, its downstream transaction opened at the first RCPT."""

    def __init__(self, stage: Stage, hop: Hop, env: Envelope, hostname: str) -> None:
        self.stage = stage
        self.hop = hop
        self.env = env
        self.hostname = hostname
        self._down: Transaction | None = None

    async def mail(self, sender: str, options: list[str]) -> Reply:
        reply = await self.stage.on_mail(self.env, sender)
        if reply is not None:
            return reply
        self.env.mail_from = sender
        self.env.mail_options = list(options)
        return R.SENDER_OK

    async def rcpt(self, rcpt: str, options: list[str]) -> Reply:
        reply = await self._rcpt(rcpt, options)
        labelled(RECIPIENTS, self.stage.name, outcome(reply.code)).inc()
        return reply

    async def _rcpt(self, rcpt: str, options: list[str]) -> Reply:
        reply = await self.stage.on_rcpt(self.env, rcpt)
        if reply is not None:
            return reply
        if self._down is None:
            # Until it is ours, the onward transaction is closed on every way out of here
            # (refused sender, HopError, any bug): a leaked one per RCPT would let one
            # client fill the next hop's connection cap (issue 15).
            try:
                down = await self.hop.open(self.env)
            except HopError as exc:
                log.warning("%s next hop unavailable at RCPT: %s", self.env.queue_id, exc.reply)
                return exc.reply
            try:
                mail_reply = await down.mail(self.env.mail_from, self.env.mail_options)
            except BaseException as exc:
                await _close(down)
                if isinstance(exc, HopError):
                    return exc.reply
                raise
            if not mail_reply.ok:
                await _close(down)
                log.info("%s next hop refused sender: %s", self.env.queue_id, mail_reply)
                return mail_reply
            self._down = down
        try:
            reply = await self._down.rcpt(rcpt, options)
        except BaseException as exc:
            await self.abort()
            if isinstance(exc, HopError):
                log.warning("%s next hop failed at RCPT: %s", self.env.queue_id, exc.reply)
                return exc.reply
            raise
        if reply.ok:
            self.env.rcpt_tos.append(rcpt)
            self.env.rcpt_options.append(list(options))
        return reply

    async def data(self, data: Message) -> Reply:
        reply = await self._data(data)
        labelled(MAILS, self.stage.name, outcome(reply.code)).inc()
        return reply

    async def _data(self, data: Message) -> Reply:
        down = self._down
        if down is None:
            return R.NEED_RCPT
        start = time.monotonic()
        try:
            verdict = await self.stage.on_data(self.env, data)
        except BaseException as exc:
            await self.abort()
            if not isinstance(exc, Exception):  # cancelled: the client went away
                raise
            log.exception("%s stage %s failed", self.env.queue_id, self.stage.name)
            return R.LOCAL_ERROR
        if verdict.reply is not None and not verdict.reply.ok:
            log.info("%s refused by %s: %s", self.env.queue_id, self.stage.name, verdict.reply)
            await self.abort()
            return verdict.reply
        base = data if verdict.message is None else verdict.message
        message = base.prepend(verdict.prepend + received_field(self.env, self.hostname))
        self._down = None
        try:
            reply = await down.data(message)
        except BaseException as exc:
            await _close(down)
            if not isinstance(exc, HopError):
                raise
            reply = exc.reply
        # The one INFO line of this service for this mail: who, what the stage found,
        # how long from the end of DATA to the next hop's reply, and that reply.
        log.info(
            "%s %s from=<%s> to=%s size=%d %sdelay=%.3f: %s",
            self.env.queue_id,
            self.stage.name,
            self.env.mail_from,
            ",".join(f"<{r}>" for r in self.env.rcpt_tos),
            data.size,
            verdict.note + " " if verdict.note else "",
            time.monotonic() - start,
            reply,
        )
        return reply

    async def abort(self) -> None:
        down, self._down = self._down, None
        if down is not None:
            await _close(down)


async def _close(down: Transaction) -> None:
    try:
        await down.abort()
    except Exception:  # the transaction is over whatever happens
        log.debug("abort failed", exc_info=True)


class StageHop:
    """A hop that is the next stage in this process (`poste up`).

    The downstream stage sees what it would see behind a socket: a fresh
    envelope, plain ESMTP, but no peer address: no connection was made, so
    none is claimed (its Received: says `via poste-up`).  `own_hop` says
    what a unix socket says in the separate topology: this hop is ours
    (the signer's into the relay, which may then relay anywhere).
    """

    def __init__(
        self, stage: Stage, hop: Hop, hostname: str, peer_helo: str, *, own_hop: bool = False
    ) -> None:
        self.stage = stage
        self.hop = hop
        self.hostname = hostname
        self.peer_helo = peer_helo
        self.own_hop = own_hop

    async def open(self, env: Envelope) -> Transaction:
        inner = Envelope(helo=self.peer_helo, own_hop=self.own_hop, via="poste-up")
        reply = await self.stage.on_connect(inner)
        if reply is not None:
            raise HopError(reply)
        return StageTransaction(self.stage, self.hop, inner, self.hostname)
