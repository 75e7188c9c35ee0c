"""Sender Rewriting Scheme (SRS0/SRS1) for forwarded mail.

When the relay forwards `bob@example.org -> alice@our.test -> alice@gmail.test`,
the destination checks SPF of the envelope sender's domain against *our* IP,
which fails.  So the relay sends as an address of its own domain that encodes
the original sender and that only it can produce:

    SRS0=HHHHHH=TT=example.org=bob@our.test

HHHHHH is a truncated HMAC (base32, case-insensitive: some MTAs fold local
parts) over the timestamp and the original address, TT the day of signing
(base32, modulo 1024).  A bounce to that address comes back here, is verified
and reversed to `bob@example.org`; a forged or expired one is refused, so the
rewritten addresses cannot be used as an open relay.

A sender that is already SRS0 of another forwarder becomes SRS1, which keeps the
first forwarder's opaque part and only names that forwarder (the scheme of
Shevek's paper and libsrs2, with our own hash and encoding).

RFC 5321 limits a local part to 64 octets, and the stateless forms above grow
with the original address.  When one would exceed 64 octets and a database
folder is given, the address becomes `SRS0=HHHHHH=TT=TOKEN@our.test` instead:
TOKEN (16 base32 characters, an HMAC of the original address) names a small
file in the folder holding that address.  Hash and timestamp are checked as
for the long form, so forgery and expiry are still refused statelessly; only
the reversal needs the file, which is why only the relay that wrote it can
reverse such an address.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets as _secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from poste.smtp.address import (
    AddressError,
    domain_of,
    parse_mailbox,
    quote_local,
    unquote_local,
)

B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
DAY = 86400
TS_MOD = 1024  # two base32 characters
MAX_LOCAL = 64  # RFC 5321 4.5.3.1.1
TOKEN_LENGTH = 16  # base32 characters: 80 bits


class SRSError(ValueError):
    """The address looks like SRS but is forged, expired or mangled."""


def _ts_encode(day: int) -> str:
    day %= TS_MOD
    return B32[day >> 5] + B32[day & 31]


def _ts_decode(text: str) -> int:
    text = text.upper()
    if len(text) != 2 or any(c not in B32 for c in text):
        raise SRSError("bad SRS timestamp")
    return B32.index(text[0]) * 32 + B32.index(text[1])


def is_srs(address: str) -> bool:
    local = unquote_local(address.rpartition("@")[0] if "@" in address else address)
    head = local[:5].upper()
    return head in ("SRS0=", "SRS0-", "SRS0+", "SRS1=", "SRS1-", "SRS1+")


class SRSDatabase:
    """TOKEN -> original address, one small file each (for too-long SRS addresses).

    Written with fsync before the address is used, refreshed (mtime) each
    time it is used again, pruned once older than the SRS lifetime.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def put(self, token: str, address: str) -> None:
        target = self.path / token
        try:
            if target.read_text(encoding="utf-8") == address:
                os.utime(target)
                return
        except (FileNotFoundError, UnicodeDecodeError):
            pass
        tmp = self.path / f".tmp-{token}-{_secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, address.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def get(self, token: str) -> str | None:
        if not token.isalnum():
            return None
        try:
            return (self.path / token.upper()).read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def prune(self, max_age: float) -> int:
        """Remove entries unused for `max_age` seconds; returns how many."""
        limit = time.time() - max_age
        removed = 0
        for p in self.path.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_mtime < limit:
                    p.unlink()
                    removed += 1
        return removed


@dataclass
class SRS:
    """Forward and reverse SRS addresses for `domain`.

    `secrets`: the first one signs, every one verifies (so a secret can be
    rotated without refusing the bounces of mail sent the day before).
    """

    domain: str
    secrets: Sequence[bytes]
    max_age_days: int = 21
    hash_length: int = 6
    algorithm: str = "sha256"  # or "sha1"
    db: SRSDatabase | None = None  # for addresses whose local part would exceed 64 octets

    def __post_init__(self) -> None:
        if not self.secrets or not all(self.secrets):
            raise ValueError("SRS needs at least one non-empty secret")
        if self.algorithm not in ("sha1", "sha256"):
            raise ValueError(f"unsupported SRS hash {self.algorithm!r}")
        if not 4 <= self.hash_length <= 32:
            raise ValueError("SRS hash length must be 4..32")
        self.domain = self.domain.lower()

    # -- hashing ---------------------------------------------------------

    def _hash(self, secret: bytes, *parts: str) -> str:
        mac = hmac.new(secret, digestmod=getattr(hashlib, self.algorithm))
        for part in parts:
            mac.update(part.lower().encode("utf-8"))
            mac.update(b"\0")
        return base64.b32encode(mac.digest()).decode("ascii")[: self.hash_length]

    def _check_hash(self, given: str, *parts: str) -> None:
        given = given.upper()
        for secret in self.secrets:
            if hmac.compare_digest(given, self._hash(secret, *parts)):
                return
        raise SRSError("SRS hash does not match (forged address?)")

    # -- forward ---------------------------------------------------------

    def forward(self, sender: str, now: float | None = None) -> str:
        """The SRS address to send as, for `sender` forwarded by us.

        The null sender, our own addresses and addresses without a domain are
        returned as they are: they need no rewriting.  A result whose local
        part would exceed 64 octets uses the database form when there is a
        database, and stays long (as in every stateless SRS) when there is not.
        """
        if not sender or "@" not in sender:
            return sender
        if domain_of(sender) == self.domain:
            return sender
        out = self._forward(sender, now)
        if self.db is not None and len(out.rpartition("@")[0].encode("utf-8")) > MAX_LOCAL:
            token = base64.b32encode(
                hmac.new(self.secrets[0], b"srs-db\0" + sender.encode("utf-8"),
                         hashlib.sha256).digest()
            ).decode("ascii")[:TOKEN_LENGTH]
            self.db.put(token, sender)
            ts = _ts_encode(int((time.time() if now is None else now) // DAY))
            hh = self._hash(self.secrets[0], ts, token)
            return f"SRS0={hh}={ts}={token}@{self.domain}"
        return out

    def needs_db(self, sender: str) -> bool:
        """Whether `forward(sender)` writes the database (then it must not run on the loop)."""
        if self.db is None or not sender or "@" not in sender or domain_of(sender) == self.domain:
            return False
        return len(self._forward(sender, None).rpartition("@")[0].encode("utf-8")) > MAX_LOCAL

    def _forward(self, sender: str, now: float | None) -> str:
        """The SRS form of `sender`, its local part quoted when it must be (RFC 5321).

        The hash and the encoding work on the local part's content, so
        `"john doe"@x` becomes `"SRS0=HHH=TT=x=john doe"@our.test`, a mailbox
        every SMTP server can carry, and reverses to the same original.
        """
        try:
            parsed = parse_mailbox(sender)
        except AddressError as exc:
            raise SRSError(f"cannot rewrite <{sender}>: {exc}") from None
        return f"{quote_local(self._forward_local(parsed.local_content, parsed.domain, now))}" \
            f"@{self.domain}"

    def _forward_local(self, local: str, dom: str, now: float | None) -> str:
        secret = self.secrets[0]
        upper = local[:5].upper()
        if upper[:4] == "SRS0" and len(local) > 5 and upper[4] in "=-+":
            # Already SRS0 of forwarder `dom`: SRS1 keeps its opaque part.
            opaque = local[4:]  # "=HHH=TT=d=l"
            hh = self._hash(secret, dom, opaque)
            return f"SRS1={hh}={dom}={opaque}"
        if upper[:4] == "SRS1" and len(local) > 5 and upper[4] in "=-+":
            # SRS1 of another forwarder: re-sign the same first hop.
            try:
                _, _old, first, opaque = _split_srs1(local)
            except SRSError:
                pass
            else:
                hh = self._hash(secret, first, opaque)
                return f"SRS1={hh}={first}={opaque}"
        day = int((time.time() if now is None else now) // DAY)
        ts = _ts_encode(day)
        hh = self._hash(secret, ts, dom, local)
        return f"SRS0={hh}={ts}={dom}={local}"

    # -- reverse ---------------------------------------------------------

    def reverse(self, address: str, now: float | None = None) -> str:
        """The original address behind an SRS address of ours; SRSError if forged/expired."""
        quoted, _, dom = address.rpartition("@")
        if dom and dom.lower() != self.domain:
            raise SRSError("SRS address is not of our domain")
        local = unquote_local(quoted)
        upper = local[:4].upper()
        if upper == "SRS0" and len(local) > 5 and local[4] in "=-+":
            fields = local[5:].split("=", 3)
            if len(fields) == 3 and all(fields) and self.db is not None:
                hh, ts, token = fields  # the database form
                self._check_hash(hh, ts, token.upper())
                self._check_age(ts, now)
                original = self.db.get(token)
                if original is None:
                    raise SRSError("SRS address unknown here (not signed by this relay?)")
                return original
            if len(fields) != 4 or not all(fields[:3]):
                raise SRSError("malformed SRS0 address")
            hh, ts, odom, olocal = fields
            self._check_hash(hh, ts, odom, olocal)
            self._check_age(ts, now)
            return f"{_local(olocal)}@{odom}"
        if upper == "SRS1" and len(local) > 5 and local[4] in "=-+":
            _, hh, first, opaque = _split_srs1(local)
            self._check_hash(hh, first, opaque)
            return f"{_local('SRS0' + opaque)}@{first}"
        raise SRSError("not an SRS address")

    def _check_age(self, ts: str, now: float | None) -> None:
        signed = _ts_decode(ts)
        today = int((time.time() if now is None else now) // DAY) % TS_MOD
        if (today - signed) % TS_MOD > self.max_age_days:
            raise SRSError("SRS address has expired")


def _local(content: str) -> str:
    try:
        return quote_local(content)
    except AddressError as exc:
        raise SRSError(f"bad local part in SRS address: {exc}") from None


def _split_srs1(local: str) -> tuple[str, str, str, str]:
    """`SRS1=HHH=first==rest` -> ("SRS1", HHH, first, "=rest")."""
    body = local[5:]
    hh, sep, rest = body.partition("=")
    first, sep2, opaque = rest.partition("=")
    if not (sep and sep2 and hh and first and opaque):
        raise SRSError("malformed SRS1 address")
    return local[:4], hh, first, opaque if opaque[:1] in "=-+" else "=" + opaque


def load_secrets(secret: str | None, secret_file: str | None) -> list[bytes]:
    """Secrets from the flag or a file (one per line, first signs, '#' comments)."""
    found: list[bytes] = []
    if secret:
        found.append(secret.encode("utf-8"))
    if secret_file:
        with open(secret_file, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line and not line.startswith("#"):
                    found.append(line.encode("utf-8"))
    return found
