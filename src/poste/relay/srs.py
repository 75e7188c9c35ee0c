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
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass

B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
DAY = 86400
TS_MOD = 1024  # two base32 characters


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
    local = address.rpartition("@")[0] if "@" in address else address
    head = local[:5].upper()
    return head in ("SRS0=", "SRS0-", "SRS0+", "SRS1=", "SRS1-", "SRS1+")


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
        returned as they are: they need no rewriting.
        """
        if not sender or "@" not in sender:
            return sender
        local, _, dom = sender.rpartition("@")
        if dom.lower() == self.domain:
            return sender
        secret = self.secrets[0]
        upper = local[:5].upper()
        if upper[:4] == "SRS0" and len(local) > 5 and upper[4] in "=-+":
            # Already SRS0 of forwarder `dom`: SRS1 keeps its opaque part.
            opaque = local[4:]  # "=HHH=TT=d=l"
            hh = self._hash(secret, dom, opaque)
            return f"SRS1={hh}={dom}={opaque}@{self.domain}"
        if upper[:4] == "SRS1" and len(local) > 5 and upper[4] in "=-+":
            # SRS1 of another forwarder: re-sign the same first hop.
            try:
                _, _old, first, opaque = _split_srs1(local)
            except SRSError:
                pass
            else:
                hh = self._hash(secret, first, opaque)
                return f"SRS1={hh}={first}={opaque}@{self.domain}"
        day = int((time.time() if now is None else now) // DAY)
        ts = _ts_encode(day)
        hh = self._hash(secret, ts, dom, local)
        return f"SRS0={hh}={ts}={dom}={local}@{self.domain}"

    # -- reverse ---------------------------------------------------------

    def reverse(self, address: str, now: float | None = None) -> str:
        """The original address behind an SRS address of ours; SRSError if forged/expired."""
        local, _, dom = address.rpartition("@")
        if dom and dom.lower() != self.domain:
            raise SRSError("SRS address is not of our domain")
        upper = local[:4].upper()
        if upper == "SRS0" and len(local) > 5 and local[4] in "=-+":
            fields = local[5:].split("=", 3)
            if len(fields) != 4 or not all(fields[:3]):
                raise SRSError("malformed SRS0 address")
            hh, ts, odom, olocal = fields
            self._check_hash(hh, ts, odom, olocal)
            signed = _ts_decode(ts)
            today = int((time.time() if now is None else now) // DAY) % TS_MOD
            age = (today - signed) % TS_MOD
            if age > self.max_age_days:
                raise SRSError("SRS address has expired")
            return f"{olocal}@{odom}"
        if upper == "SRS1" and len(local) > 5 and local[4] in "=-+":
            _, hh, first, opaque = _split_srs1(local)
            self._check_hash(hh, first, opaque)
            return f"SRS0{opaque}@{first}"
        raise SRSError("not an SRS address")


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
