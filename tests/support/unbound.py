"""A validating resolver (unbound) on loopback in front of knot, for DNSSEC tests (DANE).

Its own config, pid file and port in a temporary folder; every zone it is
given is a stub zone pointing at knot.  The trust anchors are the DNSKEY
records of the signed zones, read from knot itself, so the chain of trust is
exactly "the anchored zone": a signed zone validates (AD), an unsigned one
is insecure, and a bad signature is bogus (SERVFAIL).  `local-zone: "test."
nodefault` lifts unbound's RFC 6761 block of the .test names.

    with unbound_server(tmp_path / "unbound", ns, signed=["dane.test"]) as ub:
        resolver = make_resolver([ub.nameserver])
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from support.daemon import Daemon
from support.knot import KnotServer
from support.net import free_port

UNBOUND = "/usr/sbin/unbound"


def require_unbound() -> None:
    if not os.path.exists(UNBOUND):
        if os.environ.get("POSTE_REQUIRE_ALL") == "1":
            pytest.fail("unbound is not installed (apt install unbound)")
        pytest.skip("unbound is not installed (apt install unbound)")


def trust_anchors(ns: KnotServer, zone: str) -> list[str]:
    """The zone's DNSKEY records as knot serves them (one line each, for trust-anchor:)."""
    q = dns.message.make_query(zone.rstrip(".") + ".", dns.rdatatype.DNSKEY, want_dnssec=True)
    deadline = time.monotonic() + 15
    while True:
        r = dns.query.tcp(q, ns.host, port=ns.port, timeout=2)
        keys = [rr for rr in r.answer if rr.rdtype == dns.rdatatype.DNSKEY]
        if keys:
            return [f"{keys[0].name} DNSKEY {rd.to_text()}" for rd in keys[0]]
        if time.monotonic() > deadline:
            raise TimeoutError(f"knot does not sign {zone}:\n{ns.log()}")
        time.sleep(0.1)


class UnboundServer(Daemon):
    name = "unbound"

    def __init__(self, workdir: Path, ns: KnotServer, *, signed: Iterable[str] = (),
                 host: str = "127.0.0.1") -> None:
        self.workdir, self.ns, self.host = Path(workdir), ns, host
        self.signed = [z.rstrip(".").lower() for z in signed]
        self.port = free_port(host)
        super().__init__(self.workdir / "unbound.log")

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    def _config(self) -> str:
        wd = self.workdir
        lines = [
            "server:",
            f"    interface: {self.host}@{self.port}",
            f"    port: {self.port}",
            "    do-daemonize: no",
            '    username: ""',
            '    chroot: ""',
            f'    directory: "{wd}"',
            f'    pidfile: "{wd / "unbound.pid"}"',
            "    use-syslog: no",
            f'    logfile: "{self.log_path}"',
            "    verbosity: 1",
            "    val-log-level: 2",
            "    num-threads: 1",
            "    do-ip6: no",
            "    do-not-query-localhost: no",
            "    access-control: 127.0.0.0/8 allow",
            '    local-zone: "test." nodefault',
            "    qname-minimisation: no",
            "    cache-max-negative-ttl: 1",
            '    module-config: "validator iterator"',
        ]
        lines += [f'    trust-anchor: "{a}"' for z in self.signed
                  for a in trust_anchors(self.ns, z)]
        lines.append("remote-control:\n    control-enable: no")
        for zone in self.ns.zones:
            lines += ["stub-zone:", f'    name: "{zone}."',
                      f"    stub-addr: {self.ns.host}@{self.ns.port}"]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "unbound.conf"
        conf.write_text(self._config())
        self.proc = subprocess.Popen([UNBOUND, "-d", "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self._wait_ready()
        except Exception:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        zone = next(iter(self.signed or self.ns.zones))
        q = dns.message.make_query(zone + ".", dns.rdatatype.SOA, want_dnssec=True)
        q.flags |= dns.flags.AD
        while True:
            self.check_alive()
            try:
                r = dns.query.udp(q, self.host, port=self.port, timeout=0.5)
                if r.rcode() == dns.rcode.NOERROR and (not self.signed or r.flags & dns.flags.AD):
                    return
            except (OSError, dns.exception.Timeout):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"unbound does not validate {zone}:\n{self.log()}")
            time.sleep(0.1)



@contextlib.contextmanager
def unbound_server(workdir: Path, ns: KnotServer, *, signed: Iterable[str] = ()
                   ) -> Iterator[UnboundServer]:
    require_unbound()
    server = UnboundServer(workdir, ns, signed=signed)
    server.start()
    try:
        yield server
    finally:
        server.stop()
