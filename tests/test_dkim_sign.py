"""DKIM signing: cryptography's RSA gives dkimpy's exact signature; headers; unsignable mail."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from poste.dkim import keys
from poste.dkim.sign import (
    DEFAULT_HEADERS,
    SIMPLE_ADDRESSES,
    SIMPLE_MSG_ID,
    Signer,
    SigningKey,
    Unsignable,
    check_parsable,
    sign_or_pass,
    strict_parse,
)
from support.dkimkit import DOMAIN, mail


@pytest.fixture(scope="module")
def rsa_key() -> keys.DKIMKey:
    return keys.generate("rsa")


@pytest.fixture(scope="module")
def ed_key() -> keys.DKIMKey:
    return keys.generate("ed25519")


def dns_of(*pairs: tuple[str, keys.DKIMKey]):  # type: ignore[no-untyped-def]
    table = {f"{s}._domainkey.{DOMAIN}.".encode(): k.txt_value().encode() for s, k in pairs}
    return lambda name, timeout=5: table.get(name)


def tags(field: bytes) -> dict[bytes, bytes]:
    value = b"".join(field.split(b":", 1)[1].split())
    return dict(t.split(b"=", 1) for t in value.split(b";") if t)


def test_rsa_through_cryptography_equals_dkimpy_pure_python(
    rsa_key: keys.DKIMKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PKCS#1 v1.5 is deterministic: both paths must give the same bytes."""
    monkeypatch.setattr(time, "time", lambda: 1700000000.0)
    msg = mail()
    ours = Signer([SigningKey(DOMAIN, "s", rsa_key)]).sign(msg)
    pem = rsa_key.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    d = dkim.DKIM(msg)
    d.should_sign = {h.lower().encode() for h in DEFAULT_HEADERS}
    theirs = d.sign(
        b"s",
        DOMAIN.encode(),
        pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=d.default_sign_headers(),
    )
    assert ours == theirs


def test_dual_signature_both_verify(rsa_key: keys.DKIMKey, ed_key: keys.DKIMKey) -> None:
    msg = mail()
    signer = Signer([SigningKey(DOMAIN, "r", rsa_key), SigningKey(DOMAIN, "e", ed_key)])
    fields = signer.sign(msg)
    assert fields.endswith(b"\r\n") and fields.count(b"DKIM-Signature: ") == 2
    first, second = fields.split(b"DKIM-Signature: ")[1:]
    assert tags(b"x:" + first)[b"a"] == b"rsa-sha256"
    assert tags(b"x:" + second)[b"a"] == b"ed25519-sha256"
    for t in (tags(b"x:" + first), tags(b"x:" + second)):
        assert t[b"c"] == b"relaxed/relaxed" and t[b"d"] == DOMAIN.encode()
    signed = fields + msg
    lookup = dns_of(("r", rsa_key), ("e", ed_key))
    assert dkim.DKIM(signed).verify(0, dnsfunc=lookup)
    assert dkim.DKIM(signed).verify(1, dnsfunc=lookup)
    # relaxed header canonicalisation: refolding a signed field keeps it valid
    refolded = signed.replace(b"Subject: Hello", b"Subject:   Hello")
    assert dkim.DKIM(refolded).verify(0, dnsfunc=lookup)
    # and a changed value breaks it
    changed = signed.replace(b"Subject: Hello", b"Subject: Hellp")
    assert not dkim.DKIM(changed).verify(0, dnsfunc=lookup)


def test_default_headers_and_from_oversigned(ed_key: keys.DKIMKey) -> None:
    msg = (
        b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"X-Mailer: test\r\nReply-To: r@example.test\r\nCc: c@example.test\r\n"
        b"In-Reply-To: <a@b>\r\nReferences: <a@b>\r\nContent-Transfer-Encoding: 7bit\r\n"
    ) + mail()
    fields = Signer([SigningKey(DOMAIN, "e", ed_key)]).sign(msg)
    h = tags(fields)[b"h"].split(b":")
    assert sorted(set(h)) == sorted(
        [
            b"from",
            b"to",
            b"cc",
            b"subject",
            b"date",
            b"message-id",
            b"mime-version",
            b"content-type",
            b"content-transfer-encoding",
            b"reply-to",
            b"in-reply-to",
            b"references",
        ]
    )
    assert h.count(b"from") == 2  # over-signed: no second From can be added
    assert b"received" not in h and b"x-mailer" not in h
    # an added From breaks it
    lookup = dns_of(("e", ed_key))
    signed = fields + msg
    assert dkim.DKIM(signed).verify(0, dnsfunc=lookup)
    assert not dkim.DKIM(fields + b"From: evil@attacker.test\r\n" + msg).verify(0, dnsfunc=lookup)


def test_configured_headers(ed_key: keys.DKIMKey) -> None:
    signer = Signer([SigningKey(DOMAIN, "e", ed_key)], headers=("From", "Subject"), oversign=())
    h = tags(signer.sign(mail()))[b"h"].split(b":")
    assert h == [b"from", b"subject"]
    with pytest.raises(ValueError, match="From"):
        Signer([SigningKey(DOMAIN, "e", ed_key)], headers=("Subject",))
    with pytest.raises(ValueError, match="received"):
        Signer([SigningKey(DOMAIN, "e", ed_key)], headers=("From", "Received"))


@pytest.mark.parametrize(
    "broken",
    [
        mail().replace(b"From: Alice <alice@example.test>", b"From: <"),
        mail().replace(b"To: Bob", b"not a header line\r\nTo: Bob"),
        mail().replace(b"From: Alice <alice@example.test>\r\n", b""),
        b" continued\r\n" + mail(),
        mail().replace(b"To: Bob <bob@remote.test>", b"To: Bob <bob@remote.test>,\r\n <"),
    ],
    ids=["from-unparsable", "non-field-line", "no-from", "starts-folded", "folded-to-unparsable"],
)
def test_unsignable_mail_passes_with_a_log_line(
    broken: bytes, ed_key: keys.DKIMKey, caplog: pytest.LogCaptureFixture
) -> None:
    signer = Signer([SigningKey(DOMAIN, "e", ed_key)])
    with pytest.raises(Unsignable):
        signer.sign(broken)
    with caplog.at_level(logging.WARNING, logger="poste.dkim"):
        assert sign_or_pass(signer, broken, "Q1") == b""
    assert "Q1: not signed" in caplog.text


def test_cli_sign_then_verify_round_trip_with_missing_key_reported(
    tmp_path: Path, poste_bin: str, ed_key: keys.DKIMKey
) -> None:
    key_path = tmp_path / "e.pem"
    keys.write_key(ed_key, key_path)
    r = subprocess.run(
        [poste_bin, "dkim", "sign", "-d", DOMAIN, "-s", "e", "-k", str(key_path)],
        input=mail(),
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"DKIM-Signature: ") and r.stdout.endswith(mail())
    r = subprocess.run(
        [poste_bin, "dkim", "sign", "-d", DOMAIN, "-s", "e", "-k", str(key_path)],
        input=b"garbage without header\r\n",
        capture_output=True,
        text=False,
    )
    assert r.returncode != 0 and b"cannot sign" in r.stderr and b"Traceback" not in r.stderr


def test_cli_keeps_bare_lf_files_in_lf(
    tmp_path: Path, poste_bin: str, ed_key: keys.DKIMKey
) -> None:
    key_path = tmp_path / "e.pem"
    keys.write_key(ed_key, key_path)
    lf_mail = mail().replace(b"\r\n", b"\n")
    r = subprocess.run(
        [poste_bin, "dkim", "sign", "-d", DOMAIN, "-s", "e", "-k", str(key_path)],
        input=lf_mail,
        capture_output=True,
    )
    assert r.returncode == 0, r.stderr
    assert b"\r" not in r.stdout and r.stdout.endswith(lf_mail)
    assert dkim.DKIM(r.stdout).verify(0, dnsfunc=dns_of(("e", ed_key)))


@settings(max_examples=400, deadline=None)
@given(value=st.from_regex(SIMPLE_ADDRESSES, fullmatch=True),
       name=st.sampled_from(["From", "To", "Cc", "Reply-To", "Sender"]))
def test_every_simple_address_field_the_parser_accepts_too(name: str, value: str) -> None:
    """The shapes check_parsable lets pass unparsed: the strict parser never rejects one."""
    strict_parse(name, value)


@settings(max_examples=200, deadline=None)
@given(value=st.from_regex(SIMPLE_MSG_ID, fullmatch=True))
def test_every_simple_message_id_the_parser_accepts_too(value: str) -> None:
    strict_parse("Message-ID", value)


@pytest.mark.parametrize("value", ["<", "a@", "Alice <a@>", "<@>", "a@b <"])
def test_what_the_parser_rejects_is_not_simple(value: str) -> None:
    assert not SIMPLE_ADDRESSES.fullmatch(value)
    with pytest.raises(Unsignable):
        check_parsable([(b"From", value.encode())], ["From"])
