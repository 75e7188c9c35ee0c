"""dkimpy's RSA, done by OpenSSL (`cryptography`) where its answers stay the same.

dkimpy does RSA in pure Python: about 11 ms per 2048-bit signature made, and
the modular exponentiation of each signature checked (~7% of `poste up`'s CPU
at 5 KB, issue 16).  Its `DKIM.sign` and `DKIM.verify` (and ARC's, which share
them) look up module globals at call time; we wrap them, once, with a dispatch
on the key's type, so other callers of dkimpy in the process (the bench
compares against them) see no change:

- signing: `parse_pem_private_key` passes a `CryptoRSA` key through untouched
  and `RSASSA_PKCS1_v1_5_sign` signs it with OpenSSL (PKCS#1 v1.5 over the
  prehashed SHA-256 digest, the same deterministic bytes dkimpy would make);
- verifying: `parse_public_key` (the DER of a DNS p=) gives dkimpy's own dict
  of modulus and exponent, as an `RSAPublic` that also holds OpenSSL's key
  object, made once per key text and kept in a bounded cache; and
  `RSASSA_PKCS1_v1_5_verify` checks with OpenSSL only a signature of exactly
  the modulus' length and below it.  There PKCS#1 v1.5 has one answer, and
  OpenSSL's is dkimpy's.  A shorter signature (dkimpy reads it as a number),
  one not below the modulus (dkimpy reduces it), a key OpenSSL refuses (an
  even exponent...) go to dkimpy's own function, as does every key-size and
  key-type rule (`minkey`, k=), which dkimpy applies around these calls.

ed25519 goes through dkimpy's own pynacl path (libsodium), already fast.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha1": hashes.SHA1,
}
_HOOKED = (
    "parse_pem_private_key",
    "RSASSA_PKCS1_v1_5_sign",
    "parse_public_key",
    "RSASSA_PKCS1_v1_5_verify",
)
KEY_CACHE_SIZE = 1024  # public keys (by their DER), most recently used kept


class CryptoRSA:
    """An RSA private key whose signing operation OpenSSL does."""

    __slots__ = ("key",)

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self.key = key

    def sign_digest(self, hasher: Any) -> bytes:
        if hasher.name.lower() != "sha256":
            raise dkim.ParameterError("only rsa-sha256 is signed with cryptography")
        digest: bytes = hasher.digest()
        return self.key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


class RSAPublic(dict[str, int]):
    """dkimpy's public key dict (modulus, publicExponent), with OpenSSL's key beside it."""

    __slots__ = ("crypto", "modulus_bytes")

    def __init__(self, numbers: dict[str, int]) -> None:
        super().__init__(numbers)
        n, e = numbers["modulus"], numbers["publicExponent"]
        self.modulus_bytes = n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")
        self.crypto: rsa.RSAPublicKey | None
        try:
            self.crypto = rsa.RSAPublicNumbers(e, n).public_key()
        except Exception:  # OpenSSL refuses what dkimpy may still use: dkimpy decides
            self.crypto = None

    def verify(self, hasher: Any, signature: bytes) -> bool | None:
        """OpenSSL's answer, or None where it might not be dkimpy's (dkimpy's own then)."""
        algorithm = _HASHES.get(hasher.name.lower())
        if (
            self.crypto is None
            or algorithm is None
            or len(signature) != len(self.modulus_bytes)
            or bytes(signature) >= self.modulus_bytes
        ):
            return None
        try:
            self.crypto.verify(
                bytes(signature), hasher.digest(), padding.PKCS1v15(), Prehashed(algorithm())
            )
        except InvalidSignature:
            return False
        return True


# dkimpy's own functions, as install() found them (tests and the bench compare against them)
DKIMPY_OWN: dict[str, Any] = {}
_keys: OrderedDict[bytes, RSAPublic] = OrderedDict()
_keys_lock = threading.Lock()  # the verifier's worker pool shares the cache


def install() -> None:
    """Route dkimpy's RSA operations (DKIM and ARC, signing and verifying) as above."""
    if getattr(dkim, "_poste_rsa", False):
        return
    for name in _HOOKED:
        DKIMPY_OWN[name] = getattr(dkim, name)
    parse_private: Callable[[Any], Any] = dkim.parse_pem_private_key
    rsa_sign: Callable[[Any, Any], Any] = dkim.RSASSA_PKCS1_v1_5_sign
    parse_public: Callable[[bytes], dict[str, int]] = dkim.parse_public_key
    rsa_verify: Callable[[Any, bytes, Any], bool] = dkim.RSASSA_PKCS1_v1_5_verify

    def parse_pem_private_key(data: Any) -> Any:
        return data if isinstance(data, CryptoRSA) else parse_private(data)

    def rsassa_sign(hasher: Any, private_key: Any) -> Any:
        if isinstance(private_key, CryptoRSA):
            return private_key.sign_digest(hasher)
        return rsa_sign(hasher, private_key)

    def parse_public_key(data: bytes) -> dict[str, int]:
        with _keys_lock:
            key = _keys.get(data)
            if key is not None:
                _keys.move_to_end(data)
                return key
        key = RSAPublic(parse_public(data))  # dkimpy's errors reach dkimpy unchanged
        with _keys_lock:
            _keys[data] = key
            if len(_keys) > KEY_CACHE_SIZE:
                _keys.popitem(last=False)
        return key

    def rsassa_verify(hasher: Any, signature: bytes, public_key: Any) -> bool:
        if isinstance(public_key, RSAPublic):
            answer = public_key.verify(hasher, signature)
            if answer is not None:
                return answer
        return rsa_verify(hasher, signature, public_key)

    dkim.parse_pem_private_key = parse_pem_private_key
    dkim.RSASSA_PKCS1_v1_5_sign = rsassa_sign
    dkim.parse_public_key = parse_public_key
    dkim.RSASSA_PKCS1_v1_5_verify = rsassa_verify
    dkim._poste_rsa = True
