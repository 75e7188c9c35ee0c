"""A real authoritative DNS server (Knot DNS) on loopback, for tests.

Tests that need DNS without the Internet serve their zones from `knotd`
(Debian package `knot`), started with its own config, rundir and storage in a
temporary directory, so several test runs can go side by side.  Optional TSIG
key: the zones then accept dynamic updates (RFC 2136) signed with it.

    with knot_server(tmp_path, {"example.test": ZONE}) as ns:
        run(["poste", "verifier", "--nameserver", ns.nameserver, ...])
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from support.daemon import Daemon
from support.net import free_port

KNOTD = shutil.which("knotd") or "/usr/sbin/knotd"


def _origin(name: str) -> str:
    return name.rstrip(".").lower()


class KnotServer(Daemon):
    name = "knotd"

    """One knotd process serving `zones` (origin -> zone file text) on host:port."""

    def __init__(
        self,
        workdir: Path,
        zones: dict[str, str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        tsig: tuple[str, str, str] | None = None,
        signed: Iterable[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.signed = {_origin(z) for z in signed}  # zones knot signs (DNSSEC, default policy)
        self.zones = {_origin(k): v for k, v in zones.items()}
        self.host = host
        self.port = port or free_port(host)
        self.tsig = tsig
        super().__init__(self.workdir / "knotd.log")
        self._rundir: str | None = None  # short path: a UNIX socket path must fit in 108 bytes

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    def _config(self) -> str:
        wd = self.workdir
        lines = [
            "server:",
            f'    rundir: "{self._rundir}"',
            "    user: root:root",
            f'    listen: "{self.host}@{self.port}"',
            "    background-workers: 1",
            "    udp-workers: 1",
            "    tcp-workers: 1",
            "",
            "log:",
            "  - target: stderr",
            "    any: info",
            "",
            "database:",
            f'    storage: "{wd / "db"}"',
            "",
        ]
        if self.tsig:
            name, alg, secret = self.tsig
            lines += [
                "key:",
                f"  - id: {name}",
                f"    algorithm: {alg}",
                f"    secret: {secret}",
                "",
                "acl:",
                "  - id: update_acl",
                f"    key: {name}",
                "    action: update",
                "",
            ]
        lines += [
            "template:",
            "  - id: default",
            f'    storage: "{wd / "zones"}"',
            '    file: "%s.zone"',
            "    zonefile-sync: -1",
            "    zonefile-load: whole",
            "    journal-content: changes",
            "    semantic-checks: off",
        ]
        if self.tsig:
            lines.append("    acl: update_acl")
        lines += ["", "zone:"]
        for origin in self.zones:
            lines.append(f"  - domain: {origin}.")
            if origin in self.signed:
                lines.append("    dnssec-signing: on")
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        """Write the config and zones, start knotd in the foreground, wait until it answers."""
        self._rundir = tempfile.mkdtemp(prefix="knot-")
        for sub in ("db", "zones"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        for origin, text in self.zones.items():
            (self.workdir / "zones" / f"{origin}.zone").write_text(text)
        conf = self.workdir / "knot.conf"
        conf.write_text(self._config())
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [KNOTD, "-c", str(conf), "-s", os.path.join(self._rundir, "knot.sock")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        try:
            self._wait_ready()
        except Exception:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.zones)
        while pending:
            self.check_alive()
            for origin in list(pending):
                q = dns.message.make_query(origin + ".", dns.rdatatype.SOA)
                try:
                    r = dns.query.udp(q, self.host, port=self.port, timeout=0.3)
                except (OSError, dns.exception.Timeout):
                    continue
                if r.rcode() == dns.rcode.NOERROR and r.answer:
                    pending.discard(origin)
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"knotd does not serve {sorted(pending)}:\n{self.log()}")
                time.sleep(0.05)

    def stop(self) -> None:
        super().stop()
        if self._rundir:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None

    def __enter__(self) -> KnotServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def knot_server(
    workdir: Path,
    zones: dict[str, str],
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    tsig: tuple[str, str, str] | None = None,
    signed: Iterable[str] = (),
) -> Iterator[KnotServer]:
    """Run a KnotServer for the duration of a `with` block (workdir: e.g. tmp_path / "knot");
    the zones in `signed` are DNSSEC-signed by knot (`dnssec-signing: on`)."""
    server = KnotServer(workdir, zones, host=host, port=port, tsig=tsig, signed=signed)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def simple_zone(origin: str, records: str = "", *, ns_ip: str = "127.0.0.1") -> str:
    """A zone file with SOA and NS filled in; `records` are extra lines (relative names ok)."""
    origin = _origin(origin)
    return (
        f"$ORIGIN {origin}.\n$TTL 60\n"
        f"@ SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 60\n"
        f"@ NS ns.{origin}.\nns A {ns_ip}\n" + records + "\n"
    )


@pytest.fixture
def knot_factory(tmp_path: Path) -> Iterator[Callable[..., KnotServer]]:
    """Fixture: `knot_factory(zones, tsig=..., host=...)` starts a KnotServer, stopped at teardown.

    Use it with `from support.knot import knot_factory  # noqa: F401` in a test module.
    """
    servers: list[KnotServer] = []

    def make(zones: dict[str, str], **kwargs: object) -> KnotServer:
        server = KnotServer(tmp_path / f"knot{len(servers)}", zones, **kwargs)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
