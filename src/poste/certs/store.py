"""The ACME state folder: account key, account URL, the certificate and its key.

One folder holds one certificate (every name it covers) and the account that
obtained it, so a stack and `poste cert` share it by pointing at the same
folder.  Keys are 0600 and the certificate 0640 in a 0700 folder, owned by
whoever runs poste (the poste user): the TLS listeners read them as that user,
nobody else can.  A new certificate and its key replace the old pair by
rename, key first, so a reader sees either the old pair or the new one; a
lock file serialises issuers (a stack's renewal and `poste cert renew`, or
two services sharing the folder) across processes.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtensionOID

KEY_MODE = 0o600
CERT_MODE = 0o640
DIR_MODE = 0o700
RENEW_AT = 2 / 3  # of the lifetime: Let's Encrypt's 90 days -> 30 days before the end


class StoreError(Exception):
    """The state folder or a file in it cannot be used (one line)."""


@dataclass(frozen=True)
class CertInfo:
    """What a certificate says about itself, for renewal, `poste cert show` and /metrics."""

    names: tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime
    issuer: str
    serial: int

    @property
    def renew_at(self) -> datetime.datetime:
        return self.not_before + (self.not_after - self.not_before) * RENEW_AT

    def expires_in(self, now: datetime.datetime | None = None) -> float:
        now = now or datetime.datetime.now(datetime.UTC)
        return (self.not_after - now).total_seconds()

    def covers(self, names: Sequence[str]) -> bool:
        return {n.lower() for n in names} <= {n.lower() for n in self.names}


def cert_info(pem: bytes) -> CertInfo:
    """The first certificate of a PEM chain, read."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise StoreError(f"not a PEM certificate: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        # sorted: a CA may list the names in any order (pebble does), logs and `show` should not
        names = tuple(sorted(san.value.get_values_for_type(x509.DNSName)))  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(names, cert.not_valid_before_utc, cert.not_valid_after_utc,
                    cert.issuer.rfc4514_string(), cert.serial_number)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write beside, fsync, rename: the file is whole or absent, with its mode from birth."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is cut by the umask; this is not
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Store:
    """The files of one state folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.account_key_path = self.folder / "account.key"
        self.account_path = self.folder / "account.json"
        self.cert_path = self.folder / "cert.pem"  # the full chain, leaf first
        self.key_path = self.folder / "key.pem"

    def ensure(self) -> None:
        try:
            self.folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.chmod(self.folder, DIR_MODE)
        except OSError as exc:
            raise StoreError(f"cannot use the state folder {self.folder}: {exc.strerror}") from None

    def lock(self) -> int:
        """Held while an order runs: one issuer per folder, whichever process it is.
        Blocks (call it off the event loop); `unlock` the descriptor it returns."""
        self.ensure()
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, KEY_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    @staticmethod
    def unlock(fd: int) -> None:
        os.close(fd)

    def account_key(self) -> rsa.RSAPrivateKey:
        """The account key, made on first use (RSA 2048: every ACME server takes RS256)."""
        self.ensure()
        try:
            data = self.account_key_path.read_bytes()
        except FileNotFoundError:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write(self.account_key_path, private_pem(key), KEY_MODE)
            return key
        except OSError as exc:
            raise StoreError(f"cannot read {self.account_key_path}: {exc.strerror}") from None
        try:
            loaded = serialization.load_pem_private_key(data, password=None)
        except ValueError as exc:
            raise StoreError(f"{self.account_key_path} is not a PEM key: {exc}") from None
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise StoreError(f"{self.account_key_path}: the account key must be RSA")
        return loaded

    def account(self, directory: str) -> str | None:
        """The account URL registered with this directory, if any."""
        try:
            data = json.loads(self.account_path.read_text())
        except (OSError, ValueError):
            return None
        uri = data.get(directory) if isinstance(data, dict) else None
        return uri if isinstance(uri, str) else None

    def save_account(self, directory: str, uri: str) -> None:
        try:
            data = json.loads(self.account_path.read_text())
        except (OSError, ValueError):
            data = {}
        data[directory] = uri
        _write(self.account_path, json.dumps(data, indent=1).encode() + b"\n", KEY_MODE)

    def forget_account(self, directory: str) -> None:
        try:
            data = json.loads(self.account_path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and data.pop(directory, None) is not None:
            _write(self.account_path, json.dumps(data, indent=1).encode() + b"\n", KEY_MODE)

    def read(self) -> tuple[bytes, CertInfo] | None:
        """The current certificate chain and what it says, or None when there is none yet."""
        try:
            pem = self.cert_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self.cert_path}: {exc.strerror}") from None
        return pem, cert_info(pem)

    def info(self) -> CertInfo | None:
        current = self.read()
        return current[1] if current else None

    def install(self, chain_pem: bytes, key_pem: bytes) -> CertInfo:
        """The new pair in place: key then chain (a listener loads the two together)."""
        info = cert_info(chain_pem)
        self.ensure()
        _write(self.key_path, key_pem, KEY_MODE)
        _write(self.cert_path, chain_pem, CERT_MODE)
        return info


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
