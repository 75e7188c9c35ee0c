"""A private test CA and leaf certificates signed by it (cryptography), for verified-TLS tests.

    ca = TestCA(tmp_path)                 # ca.pem: the bundle to trust
    cert, key = ca.leaf("mx.good.test")    # PEM files, signed by the CA
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, folder: Path, name: str = "poste test CA") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = folder / "ca.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, *names: str, file: str | None = None, days: int = 30,
             expired: bool = False) -> tuple[Path, Path]:
        """(chain PEM: leaf then CA, key PEM) for `names`."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start = now - datetime.timedelta(days=days + 2 if expired else 0, hours=1)
        end = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=days)
        cert = (
            x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        stem = file or names[0]
        cert_path, key_path = self.folder / f"{stem}.crt", self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                              + self.cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        return cert_path, key_path


def tlsa_of(cert_pem: Path, usage: int, selector: int = 1, mtype: int = 1,
            ca: bool = False) -> str:
    """TLSA rdata (`3 1 1 HEX`) for the leaf (or, with `ca`, the issuer) of a chain file."""
    certs = x509.load_pem_x509_certificates(cert_pem.read_bytes())
    cert = certs[1] if ca else certs[0]
    data = (cert.public_bytes(serialization.Encoding.DER) if selector == 0 else
            cert.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    digest = {0: data, 1: hashlib.sha256(data).digest(), 2: hashlib.sha512(data).digest()}[mtype]
    return f"{usage} {selector} {mtype} {digest.hex()}"
