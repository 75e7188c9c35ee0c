"""poste's RSA verification (OpenSSL, `fast_rsa`) gives dkimpy's pure-Python answers.

Every case is a real mail signed by dkimpy, its key served by a DNS server on
loopback, and verified twice in this process by `poste.dkim.verify.verify`:
once through our hook and once with dkimpy's own functions put back.  The
result word and the reason must be the same, and the expected word too.
"""

from __future__ import annotations

import base64
import itertools
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dkim
import pytest

from poste.dkim import fast_rsa
from poste.dkim.verify import DKIMResult, verify
from poste.dns.resolver import Nameserver, SyncResolver
from support.dkimkit import DOMAIN, mail, rsa_pem_der
from support.fakedns import fake_dns, records_lookup
from support.opendkim import TESTMSG


@contextmanager
def dkimpy_own() -> Iterator[None]:
    """dkimpy's own RSA functions, for the length of the block."""
    ours = {name: getattr(dkim, name) for name in fast_rsa.DKIMPY_OWN}
    for name, fn in fast_rsa.DKIMPY_OWN.items():
        setattr(dkim, name, fn)
    try:
        yield
    finally:
        for name, fn in ours.items():
            setattr(dkim, name, fn)


def _cases() -> tuple[dict[str, list[tuple[str, Any]]], list[tuple[str, bytes, str]]]:
    """(the DNS records, [(name, mail, expected word)])."""
    records: dict[str, list[tuple[str, Any]]] = {}
    cases: list[tuple[str, bytes, str]] = []

    def publish(selector: str, record: bytes) -> None:
        strings = [record[i:i + 255] for i in range(0, len(record), 255)]
        records[f"{selector}._domainkey.{DOMAIN}"] = [("TXT", strings)]

    def sign(selector: str, pem: bytes, algo: bytes, subject: str) -> bytes:
        message = mail(subject)
        field = dkim.sign(
            message,
            selector.encode(),
            DOMAIN.encode(),
            pem,
            signature_algorithm=algo,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[b"from", b"to", b"subject"],
        )
        return bytes(field) + message

    for bits, algo in itertools.product((1024, 2048, 4096), (b"rsa-sha256", b"rsa-sha1")):
        pem, der = rsa_pem_der(bits)
        p = base64.b64encode(der)
        tag = f"k{bits}{algo.decode()[-3:]}"
        publish(tag, b"v=DKIM1; k=rsa; p=" + p)
        good = sign(tag, pem, algo, f"good {tag}")
        cases.append((f"{tag}-good", good, "pass"))
        cases.append((f"{tag}-body", good.replace(b"Hi there.", b"Hi there!"), "fail"))
        cases.append((f"{tag}-subject", good.replace(b"Subject: good", b"Subject: bad"), "fail"))
        b_at = good.index(b" b=") + 3
        flipped = good[:b_at] + (b"B" if good[b_at:b_at + 1] != b"B" else b"C") + good[b_at + 1:]
        cases.append((f"{tag}-sig", flipped, "fail"))
        publish(f"{tag}-cut", b"v=DKIM1; k=rsa; p=" + p[: len(p) // 2])
        cases.append((f"{tag}-cut", sign(f"{tag}-cut", pem, algo, "cut"), "permerror"))
        publish(f"{tag}-ed", b"v=DKIM1; k=ed25519; p=" + p)
        cases.append((f"{tag}-ed", sign(f"{tag}-ed", pem, algo, "ed"), "permerror"))
        publish(f"{tag}-h", b"v=DKIM1; k=rsa; h=sha256; p=" + p)
        cases.append((f"{tag}-h", sign(f"{tag}-h", pem, algo, "h"), "pass"))
    pem, der = rsa_pem_der(768)  # below dkimpy's minkey (1024)
    publish("small", b"v=DKIM1; k=rsa; p=" + base64.b64encode(der))
    cases.append(("small", sign("small", pem, b"rsa-sha256", "small"), "permerror"))
    publish("garbage", b"v=DKIM1; k=rsa; p=" + base64.b64encode(b"\x30\x03\x02\x01\x05"))
    cases.append(("garbage", sign("small", pem, b"rsa-sha256", "x").replace(
        b"s=small", b"s=garbage"), "permerror"))
    return records, cases


RECORDS, CASES = _cases()


@pytest.fixture(scope="module")
def resolver() -> Iterator[SyncResolver]:
    with fake_dns(records_lookup(RECORDS)) as server:
        yield SyncResolver([Nameserver(server.host, server.port)], timeout=5.0)


@pytest.mark.parametrize(("name", "message", "want"), CASES, ids=[c[0] for c in CASES])
def test_same_answer_as_dkimpy(
    resolver: SyncResolver, name: str, message: bytes, want: str
) -> None:
    ours = verify(message, resolver)
    with dkimpy_own():
        theirs = verify(message, resolver)
    assert [(r.result, r.reason) for r in ours] == [(r.result, r.reason) for r in theirs]
    assert [r.result for r in ours] == [want], ours


def test_hook_is_installed_and_keys_cached(resolver: SyncResolver) -> None:
    assert dkim.RSASSA_PKCS1_v1_5_verify is not fast_rsa.DKIMPY_OWN["RSASSA_PKCS1_v1_5_verify"]
    message = next(m for n, m, _ in CASES if n == "k2048256-good")
    first: list[DKIMResult] = verify(message, resolver)
    again = verify(message, resolver)
    assert first == again and first[0].result == "pass"
    assert any(k.crypto is not None for k in fast_rsa._keys.values())
    assert len(fast_rsa._keys) <= fast_rsa.KEY_CACHE_SIZE


def test_odd_signatures_go_to_dkimpy() -> None:
    """A signature not of the modulus' length, or not below it: dkimpy's own answer."""
    _pem, der = rsa_pem_der(1024)
    key = dkim.parse_public_key(der)
    assert isinstance(key, fast_rsa.RSAPublic)
    hasher = dkim.HASH_ALGORITHMS[b"rsa-sha256"]()
    assert key.verify(hasher, b"\x01" * 127) is None
    assert key.verify(hasher, b"\xff" * 128) is None
    assert key.verify(hasher, b"\x01" * 128) is False
    assert dkim.RSASSA_PKCS1_v1_5_verify(hasher, b"\xff" * 128, key) is False


@pytest.mark.skipif(not Path(TESTMSG).exists(), reason="opendkim-testmsg is not installed")
def test_opendkim_signed_mail(tmp_path: Path) -> None:
    """A mail libopendkim signed (rsa-sha1, relaxed/simple) passes; tampered, it fails as dkimpy says."""
    pem, der = rsa_pem_der(2048)
    (tmp_path / "key.pem").write_bytes(pem)
    r = subprocess.run(
        [TESTMSG, "-C", "-d", DOMAIN, "-s", "od", "-k", str(tmp_path / "key.pem"),
         "-t", str(tmp_path)],
        input=mail("opendkim signed"), capture_output=True, timeout=30, check=True,
    )
    signed = r.stdout
    assert signed.startswith(b"DKIM-Signature:"), r.stderr
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    strings = [record[i:i + 255] for i in range(0, len(record), 255)]
    lookup = records_lookup({f"od._domainkey.{DOMAIN}": [("TXT", strings)]})
    with fake_dns(lookup) as server:
        res = SyncResolver([Nameserver(server.host, server.port)], timeout=5.0)
        for message, want in (
            (signed, "pass"),
            (signed.replace(b"Hi there.", b"Hi there!"), "fail"),
            (signed.replace(b"Subject: opendkim", b"Subject: Opendkim"), "fail"),
        ):
            ours = verify(message, res)
            with dkimpy_own():
                theirs = verify(message, res)
            assert [(o.result, o.reason) for o in ours] == [(t.result, t.reason) for t in theirs]
            assert [o.result for o in ours] == [want], ours
            assert ours[0].algorithm == "rsa-sha1"
