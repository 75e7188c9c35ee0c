"""dkimpy's RSA check done by OpenSSL (fast_rsa): dkimpy's answer, case by case."""

from __future__ import annotations

import base64
import hashlib
from functools import cache

import dkim
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hypothesis import given, settings
from hypothesis import strategies as st

import poste.dkim  # noqa: F401  (installs fast_rsa)
from poste.dkim import fast_rsa

ALGORITHMS = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}


@cache
def private(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def spki(bits: int) -> bytes:
    return private(bits).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def signed(bits: int, name: str, data: bytes) -> tuple[object, bytes]:
    hasher = hashlib.new(name, data)
    sig = private(bits).sign(hasher.digest(), padding.PKCS1v15(), Prehashed(ALGORITHMS[name]()))
    return hasher, sig


def both(hasher: object, sig: bytes, der: bytes) -> tuple[bool, bool]:
    """(poste's answer, dkimpy's own answer) for one signature."""
    fast = fast_rsa.parse_public_key(der)
    return (fast_rsa.rsassa_pkcs1_v1_5_verify(hasher, sig, fast),
            fast_rsa._dkimpy_verify(hasher, sig, fast_rsa._dkimpy_parse(der)))


def test_installed_for_dkimpy() -> None:
    assert dkim.parse_public_key is fast_rsa.parse_public_key
    assert dkim.RSASSA_PKCS1_v1_5_verify is fast_rsa.rsassa_pkcs1_v1_5_verify


@pytest.mark.parametrize("bits", [1024, 2048, 4096])
@pytest.mark.parametrize("name", ["sha1", "sha256"])
def test_good_and_bad_signatures_agree(bits: int, name: str) -> None:
    der = spki(bits)
    assert isinstance(fast_rsa.parse_public_key(der), fast_rsa.PublicKey)
    hasher, sig = signed(bits, name, b"the header hash")
    assert both(hasher, sig, der) == (True, True)
    flipped = sig[:-1] + bytes([sig[-1] ^ 1])
    assert both(hasher, flipped, der) == (False, False)
    other, _ = signed(bits, name, b"another header hash")
    assert both(other, sig, der) == (False, False)
    assert both(hasher, b"\0" + sig, der) == (True, True)  # longer: dkimpy's own check


def test_signature_with_leading_zero_stripped_still_passes() -> None:
    for i in range(5000):
        hasher, sig = signed(1024, "sha256", b"%d" % i)
        if sig[0] == 0:
            break
    assert sig[0] == 0
    assert both(hasher, sig[1:], spki(1024)) == (True, True)


def test_signature_representative_out_of_range_is_refused() -> None:
    """s + n: dkimpy's arithmetic accepts it, RFC 8017 8.2.2 (and we) do not."""
    n = private(1024).public_key().public_numbers().n
    for i in range(1000):  # a signature small enough that s + n still has 128 bytes
        hasher, sig = signed(1024, "sha256", b"x%d" % i)
        bigger = int.from_bytes(sig, "big") + n
        if bigger.bit_length() <= 1024:
            break
    else:
        pytest.skip("no s + n of the modulus length for this key")
    assert both(hasher, bigger.to_bytes(128, "big"), spki(1024)) == (False, True)


def test_pkcs1_key_and_small_key_and_garbage() -> None:
    pkcs1 = private(2048).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    hasher, sig = signed(2048, "sha256", b"y")
    assert both(hasher, sig, pkcs1) == (True, True)
    n512 = (1 << 511) | 0xF1  # odd, 512 bits: a key too small, whatever its factors
    small_der = rsa.RSAPublicNumbers(65537, n512).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    small = fast_rsa.parse_public_key(small_der)
    assert not isinstance(small, fast_rsa.PublicKey)  # dkimpy's own "too small" paths
    with pytest.raises(type(_raised(b"\x30\x03junk"))):
        fast_rsa.parse_public_key(b"\x30\x03junk")


def _raised(der: bytes) -> Exception:
    try:
        fast_rsa._dkimpy_parse(der)
    except Exception as exc:
        return exc
    raise AssertionError("dkimpy parsed garbage")


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=260), st.sampled_from(["sha1", "sha256"]))
def test_random_signatures_agree(sig: bytes, name: str) -> None:
    hasher = hashlib.new(name, b"z")
    assert both(hasher, sig, spki(2048)) == (False, False)


@pytest.mark.parametrize("algorithm", [b"rsa-sha256", b"rsa-sha1"])
def test_dkim_verify_through_dkimpy(algorithm: bytes) -> None:
    """A whole mail: dkimpy signs, dkimpy (with fast_rsa) verifies; a changed header fails."""
    key = private(2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    txt = b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki(2048))
    mail = (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\n"
            + b"A body line.\r\n" * 50)
    sig = dkim.sign(mail, b"s", b"example.org", pem, include_headers=[b"from", b"subject"],
                    signature_algorithm=algorithm)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        return txt

    assert dkim.verify(sig + mail, dnsfunc=dns)
    assert not dkim.verify(sig + mail.replace(b"Subject: hi", b"Subject: ho"), dnsfunc=dns)
