"""A DNS-01 world on loopback: knot takes TSIG updates for `acme.test`, pebble validates
against it, and a `poste init` folder is turned to ACME (no tls-cert, `acme-*` keys).

    world = AcmeWorld.start(tmp_path)   # then world.stop()
    world.poste("cert", "issue", "--config", world.config)
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from support.knot import KnotServer, simple_zone
from support.pebble import PebbleServer, require_pebble

ZONE = "acme.test"
MX = "mail.acme.test"
SUBMISSION = "smtp.acme.test"
KEY_NAME = "update.acme.test"
USER = f"hostmaster@{ZONE}"
PASSWORD = "correct horse battery staple"


@dataclass
class AcmeWorld:
    tmp: Path
    poste_bin: str
    secret: str = ""
    knot: KnotServer | None = None
    pebble: PebbleServer | None = None
    root: str = ""
    stack: Path = field(default_factory=Path)

    @classmethod
    def start(cls, tmp: Path, poste_bin: str) -> AcmeWorld:
        require_pebble()
        world = cls(tmp, poste_bin, base64.b64encode(os.urandom(32)).decode())
        world.knot = KnotServer(tmp / "knot", {ZONE: simple_zone(ZONE, "mail A 127.0.0.1\n")},
                                tsig=(KEY_NAME, "hmac-sha256", world.secret))
        world.knot.start()
        try:
            world.pebble = PebbleServer(tmp / "pebble", dns=world.knot.nameserver)
            world.pebble.start()
            world.root = world.pebble.root(tmp / "pebble-root.pem")
            world._init_stack()
        except BaseException:
            world.stop()
            raise
        return world

    def stop(self) -> None:
        if self.pebble:
            self.pebble.stop()
        if self.knot:
            self.knot.stop()

    @property
    def tsig(self) -> str:
        return f"{KEY_NAME}:hmac-sha256:{self.secret}"

    def flags(self, state: Path, *, directory: str | None = None, tsig: str | None = None,
              names: tuple[str, ...] = (MX,)) -> list[str]:
        """`poste cert` / service flags for this world (a wrong server or key when given)."""
        assert self.pebble and self.knot
        out = ["--acme-directory", directory or self.pebble.directory,
               "--acme-ca", self.pebble.https_ca, "--acme-state", str(state),
               "--acme-dns-server", self.knot.nameserver, "--acme-dns-key", tsig or self.tsig,
               "--acme-email", USER]
        for n in names:
            out += ["--acme-name", n]
        return out

    def poste(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.poste_bin, *args], capture_output=True, text=True,
                              input=stdin, timeout=120)

    def _init_stack(self) -> None:
        """`poste init`, then what docs/deploy.md says to change for ACME."""
        assert self.pebble and self.knot
        self.stack = self.tmp / "stack"
        done = self.poste("init", str(self.stack), "--domain", ZONE)
        assert done.returncode == 0, done.stderr
        done = self.poste("users", "add", "hostmaster", "--repo", str(self.stack / "users"),
                          "--target", "you@example.org", "--password-stdin", stdin=PASSWORD + "\n")
        assert done.returncode == 0, done.stderr
        text = (self.stack / "poste.toml").read_text()
        text = re.sub(r"^tls-(cert|key) = .*\n", "", text, flags=re.M)
        text = text.replace('listen = "0.0.0.0:25"', 'listen = "127.0.0.1:0"')
        text = text.replace('listen-tls = "0.0.0.0:465"\nlisten = "0.0.0.0:587"',
                            f'listen-tls = "127.0.0.1:0"\nlisten = "127.0.0.1:0"\n'
                            f'hostname = "{SUBMISSION}"')
        text = text.replace('spool = "spool"', 'spool = "spool"\nmailbox = "outbox"')
        top = (f'acme-directory = "{self.pebble.directory}"\n'
               f'acme-ca = "{self.pebble.https_ca}"\n'
               f'acme-email = "{USER}"\n'
               f'acme-dns-server = "{self.knot.nameserver}"\n'
               f'acme-dns-key = "{self.tsig}"\n'
               f'nameserver = ["{self.knot.nameserver}"]\n')
        text = text.replace('users = "users"\n', 'users = "users"\n' + top)
        (self.stack / "poste.toml").write_text(text)

    @property
    def config(self) -> str:
        return str(self.stack / "poste.toml")

    @property
    def state(self) -> Path:
        return self.stack / "acme"


def s_client(port: int, root: str, *, starttls: bool, name: str = MX) -> str:
    """`openssl s_client -verify_return_error` against pebble's root: its output (asserts 0)."""
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-verify_return_error",
            "-CAfile", root, "-verify_hostname", name, "-servername", name]
    if starttls:
        args += ["-starttls", "smtp"]
    done = subprocess.run(args, input="QUIT\r\n", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Verify return code: 0 (ok)" in done.stdout, done.stdout
    return done.stdout


def served_serial(port: int, root: str, *, implicit: bool) -> int:
    """The serial of the certificate served on `port` (verified against `root`)."""
    import smtplib

    ctx = ssl.create_default_context(cafile=root)
    ctx.check_hostname = False  # the names are checked by s_client; here: which certificate
    if implicit:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=30) as smtp:
            der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    else:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.starttls(context=ctx)
            der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    from cryptography import x509

    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


class HoldAtStartTLS:
    """A TCP relay in front of a STARTTLS port that holds the client's `STARTTLS` line until
    `release()`: the session is open (greeted, EHLO answered) and whatever happens
    meanwhile happens under it.  (Held after the line, the server would already have
    made the TLS object of the session: OpenSSL copies the certificate into it then.)"""

    def __init__(self, port: int) -> None:
        import socket

        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.held = threading.Event()
        self._release = threading.Event()
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._serve, daemon=True)
        t.start()
        self._threads.append(t)

    def _serve(self) -> None:
        import socket

        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.upstream))

        def up() -> None:
            with contextlib.suppress(OSError):
                pump()

        def pump() -> None:
            seen = b""
            while True:
                data = client.recv(65536)
                if not data:
                    break
                if not self.held.is_set():
                    seen += data
                    i = seen.upper().find(b"STARTTLS\r\n")
                    if i >= 0:
                        cut = len(data) - (len(seen) - i)
                        server.sendall(data[:cut])
                        self.held.set()
                        self._release.wait(300)
                        data = data[cut:]
                server.sendall(data)
            server.shutdown(socket.SHUT_WR)

        def down() -> None:
            with contextlib.suppress(OSError):
                while True:
                    data = server.recv(65536)
                    if not data:
                        break
                    client.sendall(data)
                client.shutdown(socket.SHUT_WR)

        threads = [threading.Thread(target=f, daemon=True) for f in (up, down)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        client.close()
        server.close()

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._release.set()
        self.listener.close()
        for t in self._threads:
            t.join(10)
