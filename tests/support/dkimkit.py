"""Helpers for the DKIM, DNS and signer tests: keys, zones, mails, service processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from poste.dkim import keys as dkim_keys
from poste.dns.records import zone_txt
from support.net import wait_path, wait_port

DOMAIN = "example.test"


def rsa_pem_der(bits: int) -> tuple[bytes, bytes]:
    """A new RSA key as (PKCS#1 PEM private key, SubjectPublicKeyInfo DER)."""
    if bits < 1024:  # cryptography makes none this small; openssl still does
        out = subprocess.run(["openssl", "genrsa", "-traditional", str(bits)],
                             capture_output=True, check=True, timeout=30).stdout
        key: Any = serialization.load_pem_private_key(out, None, unsafe_skip_rsa_key_validation=True)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, der


def mail(subject: str = "Hello", body: str = "Hi there.\r\n") -> bytes:
    """A complete RFC 5322 mail (opendkim's strict checks want Date and Message-ID)."""
    return (
        f"From: Alice <alice@{DOMAIN}>\r\n"
        f"To: Bob <bob@remote.test>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@{DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n" + body
    ).encode()


def make_key(tmp: Path, algorithm: str, selector: str) -> tuple[Path, dkim_keys.DKIMKey]:
    path = tmp / f"{selector}.pem"
    key = dkim_keys.generate(algorithm)
    dkim_keys.write_key(key, path)
    return path, key


def dkim_zone_records(keys: Sequence[tuple[str, dkim_keys.DKIMKey]]) -> str:
    """Zone-file lines publishing `(selector, key)` pairs under DOMAIN."""
    return "".join(
        f"{sel}._domainkey TXT {zone_txt(key.txt_strings())}\n" for sel, key in keys
    )


def without_signatures_except(message: bytes, keep: str) -> bytes:
    """The message with every DKIM-Signature field removed but the one whose a= is `keep`.

    DKIM-Signature fields are not covered by other signatures, so this leaves
    the kept signature valid: a way to check each of a dual signature alone.
    """
    head, sep, body = message.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    out = []
    for f in fields:
        if f.lower().startswith(b"dkim-signature:"):
            compact = b"".join(f.split())
            if f"a={keep};".encode() not in compact:
                continue
        out.append(f)
    return b"\r\n".join(out) + sep + body


@contextlib.contextmanager
def service(
    args: Sequence[str], host: str, port: int, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a `poste ...` service in the background until the block ends (SIGTERM)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_port(host, port, timeout=15)
        except TimeoutError:
            proc.kill()
            raise AssertionError(f"{args[1]} did not start:\n{log.read_text()}") from None
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def srv_mailbox(poste_bin: str, box: Path, log: Path) -> Iterator[int]:
    """A `poste srv` on loopback writing every mail into `box/N.eml`; yields its port.

    It listens on port 0; the port is read from its `listening on` line.
    """
    from support.service import started

    with started([poste_bin, "srv", "127.0.0.1:0", "-o", f"{box}/", "--count", "0"], log) as (
        _,
        [port],
    ):
        yield port


def wait_file(path: Path, timeout: float = 20.0) -> bytes:
    wait_path(path, Path.exists, "never appeared", timeout)
    return path.read_bytes()
