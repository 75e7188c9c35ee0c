"""TLS contexts: TLS 1.2 or newer only, and self-signed certificates for tests and `poste init`."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class TLSConfigError(ValueError):
    pass


def bare_server_context() -> ssl.SSLContext:
    """A server context that refuses anything older than TLS 1.2, its chain loaded later
    (an ACME certificate not obtained yet)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server context that refuses anything older than TLS 1.2."""
    ctx = bare_server_context()
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except OSError as exc:
        raise TLSConfigError(f"cannot read TLS certificate {cert} or key {key}: {exc.strerror}") from None
    except ssl.SSLError as exc:
        raise TLSConfigError(f"bad TLS certificate or key ({cert}, {key}): {exc.reason}") from None
    return ctx


def client_context(cafile: str | Path | None = None) -> ssl.SSLContext:
    """Verifying context when a CA file is given; otherwise opportunistic (no checks).

    Opportunistic TLS between MTAs (RFC 7435) encrypts without authenticating:
    refusing a self-signed certificate would only make the sender fall back
    to plain text.
    """
    if cafile:
        ctx = ssl.create_default_context(cafile=str(cafile))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def self_signed(
    cert_path: str | Path, key_path: str | Path, hostname: str, days: int = 825
) -> None:
    """Write a self-signed ECDSA certificate for `hostname` (and 127.0.0.1 / ::1)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(hostname)]
    alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(str(key_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
