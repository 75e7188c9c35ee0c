"""Let's Encrypt's test CA (pebble, Debian package `pebble`) on loopback, for tests.

pebble speaks real ACME (RFC 8555) and validates DNS-01 challenges by asking
the DNS server given with `-dnsserver`: the tests point it at their knot, so
the TXT records poste publishes by RFC 2136 are what pebble checks.  Its own
HTTPS certificate is made here (a throwaway CA whose file the ACME client
trusts); the root that signs the certificates it issues is new at every start
and comes from its management API (`/roots/0`).

    with pebble_server(tmp_path / "pebble", dns=ns.nameserver) as ca:
        run(["poste", "cert", "issue", "--acme-directory", ca.directory,
             "--acme-ca", ca.https_ca, ...])
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from support.daemon import Daemon
from support.net import free_port

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"


def require_pebble() -> None:
    if not os.path.exists(PEBBLE):
        if os.environ.get("POSTE_REQUIRE_ALL") == "1":
            pytest.fail("pebble is not installed (apt install pebble)")
        pytest.skip("pebble is not installed (apt install pebble)")


def _https_pair(folder: Path, host: str) -> tuple[Path, Path, Path]:
    """A CA and a certificate for `host` signed by it: pebble's own HTTPS listener."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble https test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = folder / "https-ca.pem", folder / "https.pem", folder / "https.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return ca_path, cert_path, key_path


class PebbleServer(Daemon):
    name = "pebble"

    """One pebble process: ACME at `directory`, trusted through `https_ca`."""

    def __init__(self, workdir: Path, dns: str, host: str = "127.0.0.1") -> None:
        self.workdir = Path(workdir)
        self.dns = dns
        self.host = host
        self.port = free_port(host)
        self.mgmt_port = free_port(host)
        self.http_port = free_port(host)  # where pebble fetches HTTP-01 answers from
        super().__init__(self.workdir / "pebble.log")
        self.https_ca = str(self.workdir / "https-ca.pem")

    @property
    def directory(self) -> str:
        return f"https://{self.host}:{self.port}/dir"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        _, cert, key = _https_pair(self.workdir, self.host)
        conf = self.workdir / "pebble-config.json"
        conf.write_text(json.dumps({"pebble": {
            "listenAddress": f"{self.host}:{self.port}",
            "managementListenAddress": f"{self.host}:{self.mgmt_port}",
            "certificate": str(cert), "privateKey": str(key),
            # the ports pebble dials on a name's address for HTTP-01 and TLS-ALPN-01
            "httpPort": self.http_port, "tlsPort": free_port(self.host),
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
        }}))
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
               "PEBBLE_AUTHZREUSE": "0"}
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [PEBBLE, "-config", str(conf), "-dnsserver", self.dns],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        log.close()
        try:
            self._wait_ready()
        except Exception:
            self.stop()
            raise

    def _get(self, url: str) -> bytes:
        ctx = ssl.create_default_context(cafile=self.https_ca)
        with urllib.request.urlopen(url, context=ctx, timeout=3) as resp:
            return bytes(resp.read())

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                self._get(self.directory)
                self._get(f"https://{self.host}:{self.mgmt_port}/roots/0")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pebble does not answer:\n{self.log()}") from None
                time.sleep(0.05)

    def root(self, path: Path) -> str:
        """The root that signs what pebble issues, written to `path` (for openssl/swaks)."""
        path.write_bytes(self._get(f"https://{self.host}:{self.mgmt_port}/roots/0"))
        return str(path)



@contextlib.contextmanager
def pebble_server(workdir: Path, dns: str, host: str = "127.0.0.1") -> Iterator[PebbleServer]:
    require_pebble()
    server = PebbleServer(workdir, dns, host)
    server.start()
    try:
        yield server
    finally:
        server.stop()
