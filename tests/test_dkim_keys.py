"""`poste dkim keygen` and the key files: PEM, 0600, the TXT record to publish."""

from __future__ import annotations

import base64
import re
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from poste.dkim import keys
from poste.dns.records import split_txt
from support.cli import run_poste


def keygen(poste_bin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [poste_bin, "dkim", "keygen", *args], capture_output=True, text=True, timeout=60
    )


def txt_strings(line: str) -> list[str]:
    return re.findall(r'"([^"]*)"', line)


def test_keygen_rsa_writes_private_pem_and_prints_split_txt(tmp_path: Path, poste_bin: str) -> None:
    out = tmp_path / "k.pem"
    r = keygen(
        poste_bin, "--algorithm", "rsa", "--selector", "s1", "--domain", "ex.test", "-o", str(out)
    )
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    priv = serialization.load_pem_private_key(out.read_bytes(), None)
    assert isinstance(priv, rsa.RSAPrivateKey) and priv.key_size == 2048

    line = r.stdout.strip()
    assert line.startswith("s1._domainkey.ex.test. IN TXT ")
    strings = txt_strings(line)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)  # 2048-bit: > 255 bytes
    value = "".join(strings)
    assert value.startswith("v=DKIM1; k=rsa; p=")
    spki = base64.b64decode(value.split("p=")[1])
    assert spki == priv.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_keygen_ed25519_publishes_the_raw_public_key(tmp_path: Path, poste_bin: str) -> None:
    out = tmp_path / "e.pem"
    r = keygen(poste_bin, "-a", "ed25519", "-s", "e1", "-d", "ex.test", "-o", str(out))
    assert r.returncode == 0, r.stderr
    priv = serialization.load_pem_private_key(out.read_bytes(), None)
    assert isinstance(priv, ed25519.Ed25519PrivateKey)
    (value,) = txt_strings(r.stdout)
    assert value.startswith("v=DKIM1; k=ed25519; p=")
    raw = base64.b64decode(value.split("p=")[1])
    assert raw == priv.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["-a", "rsa", "--bits", "1024"], "at least 2048"),
        (["-a", "dsa"], "Invalid value"),
        (["-a", "rsa", "-o", "/nonexistent/dir/k.pem"], "cannot write"),
    ],
)
def test_keygen_bad_input_is_one_line(
    tmp_path: Path, poste_bin: str, args: list[str], needle: str
) -> None:
    if "-o" not in args:
        args = [*args, "-o", str(tmp_path / "k.pem")]
    r = run_poste(["dkim", "keygen", "-s", "s", "-d", "ex.test", *args])  # in this process
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert needle in r.stderr.strip().splitlines()[-1]


def test_loads_rsa_pkcs1_and_dkimpy_ed25519_seed(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pkcs1 = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert keys.parse_key(pkcs1).algorithm == "rsa"
    # dkimpy's dknewkey writes an ed25519 key as the base64 of its 32-byte seed
    ed = ed25519.Ed25519PrivateKey.generate()
    seed = base64.b64encode(
        ed.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )
    loaded = keys.parse_key(seed + b"\n")
    assert loaded.algorithm == "ed25519"
    assert loaded.ed25519_seed_b64() == seed


def test_refuses_short_rsa_and_garbage(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = small.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(keys.DKIMKeyError, match="2048"):
        keys.parse_key(pem)
    with pytest.raises(keys.DKIMKeyError, match="neither PEM"):
        keys.parse_key(b"hello")
    with pytest.raises(keys.DKIMKeyError, match="cannot read"):
        keys.load_key(tmp_path / "nope.pem")


def test_split_txt_is_byte_exact() -> None:
    value = "x" * 600
    parts = split_txt(value)
    assert [len(p) for p in parts] == [255, 255, 90]
    assert "".join(parts) == value
