"""The reply address of a forwarded mail whose From the relay rewrote (from_rewrite.py).

When the relay must put its own domain in From (the author's DMARC would
fail once the author's DKIM broke in transit), replies to that From have to
reach the author.  The address carries the author, like an SRS address, and
only this relay can make one:

    fwd+HHHHHHHH=TT=example.org=alice@our.test

HHHHHHHH is an HMAC (base32) with the SRS secrets, of its own kind ("fwd":
an SRS hash is never a valid token hash, nor the other way round), over the
day TT (as in SRS) and the author; a forged, altered or expired address is
refused at RCPT with 550.  Stateless: any relay sharing the SRS secret can
route a reply.  An author whose address would make the local part longer
than RFC 5321's 64 octets gets the SRS database form instead
(`fwd+HHHHHHHH=TT=TOKEN`, the author in the SRS database), as SRS does.

Why not the SRS address itself: a From is shown to people and kept in
address books; its lifetime and its form are the forwarding's, not the
bounce path's, and mixing the two would let one stand for the other.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

from poste.services.relay.srs import (
    DAY,
    MAX_LOCAL,
    SRS,
    TS_MOD,
    SRSError,
    _ts_decode,
    _ts_encode,
)
from poste.smtp.address import AddressError, parse_mailbox, quote_local, unquote_local

PREFIX = "fwd+"
HASH_LENGTH = 8  # base32 characters: 40 bits
MAX_AGE_DAYS = 90  # replies come later than bounces


def is_fwd(address: str) -> bool:
    """A token's shape (`fwd+` and `=` fields): `fwd+news@` stays a user's subaddress."""
    local = unquote_local(address.rpartition("@")[0] if "@" in address else address)
    return local[:4].lower() == PREFIX and "=" in local


@dataclass
class FwdTokens:
    """Make and read `fwd+...@domain` addresses with the relay's SRS secrets."""

    srs: SRS
    max_age_days: int = MAX_AGE_DAYS

    def _hash(self, secret: bytes, *parts: str) -> str:
        mac = hmac.new(secret, b"fwd\0", hashlib.sha256)
        for part in parts:
            mac.update(part.lower().encode("utf-8"))
            mac.update(b"\0")
        return base64.b32encode(mac.digest()).decode("ascii")[:HASH_LENGTH]

    def address(self, author: str, now: float | None = None) -> str:
        """Our address standing for `author`; SRSError if `author` is no mailbox."""
        try:
            parsed = parse_mailbox(author)
        except AddressError as exc:
            raise SRSError(f"cannot make a reply address for <{author}>: {exc}") from None
        ts = _ts_encode(int((time.time() if now is None else now) // DAY))
        secret = self.srs.secrets[0]
        local, dom = parsed.local_content, parsed.domain
        content = f"{PREFIX}{self._hash(secret, ts, dom, local)}={ts}={dom}={local}"
        if len(quote_local(content).encode("utf-8")) > MAX_LOCAL and self.srs.db is not None:
            token = base64.b32encode(
                hmac.new(secret, b"fwd-db\0" + author.encode("utf-8"), hashlib.sha256).digest()
            ).decode("ascii")[:16]
            self.srs.db.put(token, author)
            content = f"{PREFIX}{self._hash(secret, ts, token)}={ts}={token}"
        return f"{quote_local(content)}@{self.srs.domain}"

    def author(self, address: str, now: float | None = None) -> str:
        """The author behind one of our addresses; SRSError when forged, expired or unknown."""
        quoted, _, dom = address.rpartition("@")
        if dom.lower() != self.srs.domain:
            raise SRSError("not an address of our domain")
        local = unquote_local(quoted)
        if local[:4].lower() != PREFIX:
            raise SRSError("not a forwarding address")
        fields = local[4:].split("=", 3)
        if len(fields) == 3 and all(fields) and self.srs.db is not None:
            hh, ts, token = fields
            self._check(hh, ts, now, ts, token.upper())
            found = self.srs.db.get(token)
            if found is None:
                raise SRSError("forwarding address unknown here")
            return found
        if len(fields) != 4 or not all(fields):
            raise SRSError("malformed forwarding address")
        hh, ts, odom, olocal = fields
        self._check(hh, ts, now, ts, odom, olocal)
        try:
            return f"{quote_local(olocal)}@{odom}"
        except AddressError as exc:
            raise SRSError(f"bad local part in forwarding address: {exc}") from None

    def _check(self, given: str, ts: str, now: float | None, *parts: str) -> None:
        given = given.upper()
        if not any(hmac.compare_digest(given, self._hash(s, *parts)) for s in self.srs.secrets):
            raise SRSError("forwarding address does not verify (forged?)")
        signed = _ts_decode(ts)
        today = int((time.time() if now is None else now) // DAY) % TS_MOD
        if (today - signed) % TS_MOD > self.max_age_days:
            raise SRSError("forwarding address has expired")
