"""A listener's TLS context from `tls-cert`/`tls-key`, kept reloadable (SIGHUP, ACME renewal).

The listeners hold one context object for their whole life; a reload does not
load the new files into it (OpenSSL keeps one certificate per key type, so an
RSA chain loaded over an ECDSA one would leave the ECDSA one served), it
builds a fresh context from them, and the listeners' context hands each new
handshake over to the fresh one from its server-name callback (which OpenSSL
calls on every ClientHello, with or without SNI).  A connection keeps the
context it began with: nothing open is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field

from poste.runtime.settings import ConfigError, Values
from poste.smtp.tls import TLSConfigError, server_context

log = logging.getLogger("poste")


@dataclass
class TLSFiles:
    """The listeners' context and the files it came from, so a reload can serve new ones."""

    ctx: ssl.SSLContext
    cert: str
    key: str
    current: ssl.SSLContext | None = field(default=None, repr=False)  # what handshakes get

    def __post_init__(self) -> None:
        self.ctx.sni_callback = self._switch

    def _switch(self, conn: ssl.SSLObject | ssl.SSLSocket, name: str | None,
                ctx: ssl.SSLContext) -> None:
        if self.current is not None and self.current is not ctx:
            conn.context = self.current

    def load(self) -> None:
        """Serve the files as they are now; TLSConfigError (and the old pair kept) if they do
        not load.  Blocking: call it off the event loop."""
        self.current = server_context(self.cert, self.key)

    async def reload(self) -> None:
        """New handshakes use the new chain; open connections keep theirs.  A bad pair is
        logged and the old one kept."""
        try:
            await asyncio.to_thread(self.load)
        except TLSConfigError as exc:
            log.error("reload: certificate %s refused, keeping the old one: %s", self.cert, exc)
            return
        log.info("reload: certificate %s", self.cert)


def tls_files(values: Values) -> TLSFiles | None:
    """The context of `tls-cert` and `tls-key`, or None when neither is set."""
    cert, key = values.get("tls-cert"), values.get("tls-key")
    if not cert and not key:
        return None
    if not cert or not key:
        raise ConfigError(None, "{0} and {1} go together", names=("tls-cert", "tls-key"))
    try:
        return TLSFiles(server_context(cert, key), cert, key)
    except TLSConfigError as exc:
        raise ConfigError(None, str(exc)) from None
