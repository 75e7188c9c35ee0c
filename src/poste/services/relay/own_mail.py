"""The relay's own keys: DKIM on the mail it writes itself, ARC seals on the mail it forwards.

A DSN is poste's own mail, From MAILER-DAEMON@ our domain and sent from
`<>`, so only the HELO name's SPF and a DKIM signature of our domain can make
it pass DMARC at the receiver: it is signed with the domain's keys, the
signer's (`dkim-selector`/`dkim-key`; `poste up` takes the [signer]'s).

A forwarded mail (one of its recipients is a local address) gets an ARC set
(RFC 8617) over the verifier's Authentication-Results, so a receiver that
trusts us can see SPF and DKIM as they were before we forwarded.  Mail from
our own users to the outside is not sealed: the signer's DKIM says it all.
Both run in a thread (RSA and body hashing), never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from poste.dkim.arc import Sealer, seal_or_pass
from poste.dkim.keys import DKIMKeyError
from poste.dkim.sign import Signer, pair_keys, sign_or_pass
from poste.runtime.settings import ConfigError
from poste.smtp.address import domain_of
from poste.smtp.message import Message
from poste.smtp.stage import Envelope

log = logging.getLogger("poste.relay")


@dataclass
class OwnKeys:
    """What the relay signs and seals with; either may be None (no keys, no RSA key)."""

    signer: Signer | None = None
    sealer: Sealer | None = None

    def say_what_is_missing(self) -> None:
        """At start (not while the flags are checked: a refused start says one line)."""
        if self.signer is not None and self.sealer is None:
            log.warning("no RSA key among --dkim-key: forwarded mail is not ARC-sealed "
                        "(RFC 8617 seals with rsa-sha256 only)")

    async def sign(self, message: bytes, queue_id: str) -> bytes:
        """`message` with our DKIM-Signature fields on top (as it is when it cannot be signed)."""
        if self.signer is None:
            return message
        fields = await asyncio.to_thread(sign_or_pass, self.signer, message, queue_id)
        return fields + message


def own_keys(
    domain: str, selectors: Sequence[str], paths: Sequence[str], authserv_id: str
) -> OwnKeys:
    """The keys of the settings; a ConfigError for a key that cannot be used."""
    if not paths and not selectors:
        return OwnKeys()
    try:
        keys = pair_keys(domain, selectors, paths)
    except DKIMKeyError as exc:
        raise ConfigError(None, str(exc)) from None
    except ValueError as exc:
        raise ConfigError(None, f"{exc}: give one {{0}} per {{1}}",
                          names=["dkim-selector", "dkim-key"]) from None
    rsa = [k for k in keys if k.key.algorithm == "rsa"]
    return OwnKeys(Signer(keys), Sealer(rsa[0], authserv_id) if rsa else None)


class ForwardSeal:
    """The relay stage's call: the ARC set for a forwarded mail, or nothing."""

    def __init__(self, sealer: Sealer, is_local: Callable[[str], bool]) -> None:
        self.sealer = sealer
        self.is_local = is_local

    async def fields(self, env: Envelope, message: Message) -> bytes:
        if not any("@" in r and self.is_local(domain_of(r)) for r in env.rcpt_tos):
            return b""
        async with message.whole() as data:  # the seal hashes the body: a big one waits its turn
            return await asyncio.to_thread(seal_or_pass, self.sealer, data, env.queue_id)
