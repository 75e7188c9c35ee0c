"""A listener's TLS context from `tls-cert`/`tls-key`, kept reloadable for SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

from poste.runtime.settings import ConfigError, Values
from poste.smtp.tls import TLSConfigError, server_context

log = logging.getLogger("poste")


@dataclass
class TLSFiles:
    """A server context and the files it came from, so SIGHUP can load new ones into it."""

    ctx: ssl.SSLContext
    cert: str
    key: str

    async def reload(self) -> None:
        """New handshakes use the new chain; open connections keep theirs.  A bad pair
        raises (the runtime logs it) and the context keeps the old one."""
        try:
            await asyncio.to_thread(self.ctx.load_cert_chain, self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
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
