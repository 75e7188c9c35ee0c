"""DKIM key pairs: generation, PEM files, and the TXT record that publishes them.

Keys live in PEM files (PKCS#8, mode 0600) for both algorithms, so one loader
serves `poste dkim keygen`, `poste signer` and `poste init`.  For
compatibility with dkimpy's `dknewkey`, a file holding just the base64 of an
ed25519 seed is accepted too.  The public half goes in DNS as
`v=DKIM1; k=rsa|ed25519; p=...` (RFC 6376 3.6.1, RFC 8463 4); a TXT string
holds at most 255 bytes, so long values (RSA 2048+) are split into several
strings, which a verifier concatenates.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from poste.dns.records import DEFAULT_TTL, Record, split_txt

Algorithm = Literal["rsa", "ed25519"]
ALGORITHMS: tuple[Algorithm, ...] = ("rsa", "ed25519")
MIN_RSA_BITS = 2048


class DKIMKeyError(ValueError):
    """A key file that cannot be read or is not a usable DKIM key (one-line reason)."""


@dataclass(frozen=True)
class DKIMKey:
    """A private key with what signing and DNS need to know about it."""

    algorithm: Algorithm
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

    @property
    def signature_algorithm(self) -> bytes:
        """The `a=` tag of signatures made with this key."""
        return b"rsa-sha256" if self.algorithm == "rsa" else b"ed25519-sha256"

    @property
    def bits(self) -> int:
        return self.private.key_size if isinstance(self.private, rsa.RSAPrivateKey) else 256

    def public_b64(self) -> str:
        """The `p=` tag: SubjectPublicKeyInfo for RSA, the raw 32 bytes for ed25519."""
        pub = self.private.public_key()
        if isinstance(pub, ed25519.Ed25519PublicKey):
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raw = pub.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return base64.b64encode(raw).decode("ascii")

    def txt_value(self) -> str:
        """The whole DKIM key record, as one string (what a verifier reassembles)."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public_b64()}"

    def txt_strings(self) -> list[str]:
        """The record cut into TXT character-strings of at most 255 bytes."""
        return split_txt(self.txt_value())

    def pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def ed25519_seed_b64(self) -> bytes:
        """dkimpy (pynacl) takes an ed25519 key as the base64 of its 32-byte seed."""
        if not isinstance(self.private, ed25519.Ed25519PrivateKey):
            raise TypeError("not an ed25519 key")
        raw = self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(raw)


def record_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain.rstrip('.')}."


def generate(algorithm: str, bits: int = MIN_RSA_BITS) -> DKIMKey:
    if algorithm == "rsa":
        if bits < MIN_RSA_BITS:
            raise DKIMKeyError(f"RSA keys must have at least {MIN_RSA_BITS} bits (got {bits})")
        return DKIMKey("rsa", rsa.generate_private_key(public_exponent=65537, key_size=bits))
    if algorithm == "ed25519":
        return DKIMKey("ed25519", ed25519.Ed25519PrivateKey.generate())
    raise DKIMKeyError(f"unknown algorithm {algorithm!r} (rsa or ed25519)")


def parse_key(data: bytes, source: str = "key") -> DKIMKey:
    """A DKIM key from PEM (RSA PKCS#1/PKCS#8, ed25519 PKCS#8) or a base64 ed25519 seed."""
    text = data.strip()
    if b"-----BEGIN" in text:
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except (ValueError, TypeError) as exc:
            reason = f"not a readable unencrypted PEM private key ({exc})"
            raise DKIMKeyError(f"{source}: {reason}") from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < MIN_RSA_BITS:
                raise DKIMKeyError(
                    f"{source}: RSA key of {key.key_size} bits; DKIM needs {MIN_RSA_BITS}+"
                )
            return DKIMKey("rsa", key)
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return DKIMKey("ed25519", key)
        raise DKIMKeyError(f"{source}: not an RSA or ed25519 key")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DKIMKeyError(f"{source}: neither PEM nor a base64 ed25519 seed") from None
    if len(raw) != 32:
        raise DKIMKeyError(f"{source}: neither PEM nor a base64 ed25519 seed")
    return DKIMKey("ed25519", ed25519.Ed25519PrivateKey.from_private_bytes(raw))


def load_key(path: str | os.PathLike[str]) -> DKIMKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DKIMKeyError(f"cannot read key {path}: {exc.strerror}") from None
    return parse_key(data, str(path))


def write_key(key: DKIMKey, path: str | os.PathLike[str]) -> None:
    """Write the private key readable by its owner only, never half-written."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key.pem())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)


def dkim_record(domain: str, selector: str, key: DKIMKey, ttl: int = DEFAULT_TTL) -> Record:
    """The TXT record that publishes `key` under `selector` (RFC 6376 3.6.2)."""
    return Record(record_name(selector, domain), "TXT", (key.txt_value(),), ttl, "v=DKIM1")
