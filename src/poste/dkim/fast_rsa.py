"""dkimpy's RSA signature check, done by OpenSSL (`cryptography`) instead of Python.

dkimpy verifies RSA itself: `RSASSA_PKCS1_v1_5_verify` builds the expected
PKCS#1 v1.5 block and turns the signature back into bytes one byte at a time
in Python (`int2str`), and `parse_public_key` parses the key's DER with its
own ASN.1 reader on every signature.  Measured on a 5 KB mail with a 2048-bit
key: 1.5 ms per `dkim.verify`, of which int2str alone is a third; OpenSSL's
check is a few tens of microseconds.  On the inbound path every signed mail
pays it once per signature (issue 16, docs/performance.md).

What stays dkimpy's: which keys are acceptable.  `parse_public_key` still
runs dkimpy's own parser (its errors and its SPKI-or-PKCS#1 leniency are
unchanged), once per distinct key (the answer is kept, bounded); the
resulting key also carries an OpenSSL key object built from the same
modulus and exponent.  The check itself goes to OpenSSL only when the result
is bound to be dkimpy's: a key of at least 1024 bits (smaller ones keep
dkimpy's "digest too large" and "key too small" paths), a SHA-1 or SHA-256
hash, and a signature no longer than the modulus (a shorter one is the same
integer left-padded, which is what dkimpy's arithmetic reads; a longer one
stays with dkimpy).  Anything else, and any key OpenSSL refuses to build,
goes to dkimpy's own function.  One difference, on purpose: a signature
whose integer is not below the modulus (the real one plus n, same length)
passes dkimpy's arithmetic but is refused here, as RFC 8017 8.2.2 says
(RSAVP1: "signature representative out of range"); no signer makes one.  tests/test_dkim_fast_rsa.py compares the two
over generated cases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

MIN_BITS = 1024  # below this dkimpy's own paths decide (and refuse: its minkey is 1024)
KEEP = 1024  # distinct keys remembered; one per selector a sender uses
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
}


class PublicKey(dict[str, int]):
    """dkimpy's key (a dict with 'modulus' and 'publicExponent') plus OpenSSL's for it.

    A dict subclass so that every dkimpy line that reads the key as a dict
    (its bit size, its own verify on a fallback) works unchanged.
    """

    key: rsa.RSAPublicKey
    length: int  # bytes in the modulus


_dkimpy_parse: Callable[[bytes], Any] = dkim.parse_public_key
_dkimpy_verify: Callable[[Any, bytes, Any], bool] = dkim.RSASSA_PKCS1_v1_5_verify
_parsed: dict[bytes, dict[str, int]] = {}


def parse_public_key(data: bytes) -> dict[str, int]:
    """dkimpy's parse, once per key; with an OpenSSL key attached when it can be built."""
    found = _parsed.get(data)
    if found is not None:
        return found
    pk: dict[str, int] = _dkimpy_parse(data)  # raises as dkimpy does
    n, e = pk["modulus"], pk["publicExponent"]
    if n.bit_length() >= MIN_BITS:
        try:
            key = rsa.RSAPublicNumbers(e, n).public_key()
        except (ValueError, TypeError):  # OpenSSL's own limits (an even modulus, e = 1...)
            pass
        else:
            fast = PublicKey(pk)
            fast.key = key
            fast.length = (n.bit_length() + 7) // 8
            pk = fast
    if len(_parsed) >= KEEP:
        _parsed.pop(next(iter(_parsed)))
    _parsed[data] = pk
    return pk


def rsassa_pkcs1_v1_5_verify(hasher: Any, signature: bytes, public_key: Any) -> bool:
    """dkimpy's verify, by OpenSSL where the answer is bound to be the same."""
    algorithm = _HASHES.get(getattr(hasher, "name", ""))
    if (
        not isinstance(public_key, PublicKey)
        or algorithm is None
        or len(signature) > public_key.length
    ):
        return _dkimpy_verify(hasher, signature, public_key)
    signature = signature.rjust(public_key.length, b"\0")
    try:
        public_key.key.verify(
            signature, hasher.digest(), padding.PKCS1v15(), Prehashed(algorithm())
        )
    except InvalidSignature:
        return False
    return True


def install() -> None:
    """Make dkimpy's DKIM and ARC verification (its module globals) use these."""
    if getattr(dkim, "_poste_fast_rsa", False):
        return
    dkim.parse_public_key = parse_public_key
    dkim.RSASSA_PKCS1_v1_5_verify = rsassa_pkcs1_v1_5_verify
    dkim._poste_fast_rsa = True
