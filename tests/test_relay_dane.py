"""The relay honours DANE (RFC 7672) through a validating resolver.

knot serves and signs `dane.test` (`dnssec-signing: on`) and serves
`insecure.test` unsigned; unbound validates, with the DNSKEY of dane.test
as its trust anchor, and is the relay's only resolver.  The MX hosts are
poste SMTP listeners with STARTTLS; their certificates come from a private
CA the relay does NOT trust (no tls-ca-file): under DANE only the TLSA
records say which certificate is right.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from poste.dns.resolver import make_resolver
from poste.services.relay.delivery import Deliverer
from poste.services.relay.tls_policy.policy import TransportPolicy
from poste.services.relay.tls_policy.tlsrpt import read_outcomes
from poste.smtp.message import Message
from poste.smtp.server import SMTPService
from poste.smtp.stage import Stage
from poste.smtp.tls import server_context
from poste.tools.srv import Mailbox, MailboxHop
from support.knot import knot_server, simple_zone
from support.standin import reserve_common_port
from support.testca import TestCA, tlsa_of
from support.unbound import UnboundServer, unbound_server

RAW = b"From: a@our.test\r\nTo: b@ok.dane.test\r\nSubject: t\r\n\r\nbody\r\n"

# MX host (in dane.test unless dotted): (IP, certificate names, STARTTLS)
HOSTS = {
    "mx-ok": ("127.0.0.70", ["mx-ok.dane.test"], True),
    "mx-wrong": ("127.0.0.71", ["mx-wrong.dane.test"], True),
    "mx-ta": ("127.0.0.72", ["mx-ta.dane.test"], True),
    "mx-plain": ("127.0.0.73", [], False),
    "mx-taname": ("127.0.0.74", ["elsewhere.test"], True),
    "mx.insecure.test": ("127.0.0.80", ["mx.insecure.test"], True),
}


@dataclass
class Setup:
    ub: UnboundServer
    certs: dict[str, tuple[Path, Path]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("dane")
    ca = TestCA(tmp / "ca")
    certs = {h: ca.leaf(*names, file=h) for h, (_, names, tls) in HOSTS.items() if tls}
    stranger, _ = ca.leaf("stranger.test", file="stranger")  # a cert no MX has
    ee = tlsa_of(certs["mx-ok"][0], 3)  # DANE-EE, SPKI, SHA-256
    dane = "".join(f"{h} A {ip}\n" for h, (ip, _, _) in HOSTS.items() if "." not in h) + (
        "ok MX 10 mx-ok\n"
        f"_25._tcp.mx-ok TLSA {ee}\n"
        f"_25._tcp.mx-ok TLSA {tlsa_of(stranger, 3, 0, 2)}\n"  # a second one, not matching
        "wrong MX 10 mx-wrong\n"
        f"_25._tcp.mx-wrong TLSA {tlsa_of(stranger, 3)}\n"
        "two MX 10 mx-wrong\ntwo MX 20 mx-ok\n"
        "ta MX 10 mx-ta\n"
        f"_25._tcp.mx-ta TLSA {tlsa_of(certs['mx-ta'][0], 2, 0, 1, ca=True)}\n"  # DANE-TA
        "taname MX 10 mx-taname\n"
        f"_25._tcp.mx-taname TLSA {tlsa_of(certs['mx-taname'][0], 2, 1, 1, ca=True)}\n"
        "plain MX 10 mx-plain\n"
        f"_25._tcp.mx-plain TLSA {ee}\n"
        # a signed delegation (DS) to a child that is not signed with that key: bogus
        "bogus NS ns.bogus\nns.bogus A 127.0.0.1\n"
        f"bogus DS 12345 13 2 {'ab' * 32}\n"
        "bogusmx MX 10 mx.bogus\n"
    )
    insecure = (f"@ MX 10 mx\nmx A {HOSTS['mx.insecure.test'][0]}\n"
                f"_25._tcp.mx TLSA {tlsa_of(stranger, 3)}\n")
    bogus = f"mx A {HOSTS['mx-ok'][0]}\n_25._tcp.mx TLSA {ee}\n"
    zones = {"dane.test": simple_zone("dane.test", dane),
             "bogus.dane.test": simple_zone("bogus.dane.test", bogus),
             "insecure.test": simple_zone("insecure.test", insecure)}
    with knot_server(tmp / "knot", zones, signed=["dane.test"]) as ns, \
            unbound_server(tmp / "unbound", ns, signed=["dane.test"]) as ub:
        yield Setup(ub, certs)


class World:
    def __init__(self, setup: Setup, tmp: Path) -> None:
        self.setup, self.tmp = setup, tmp
        self.ports = reserve_common_port([ip for ip, _, _ in HOSTS.values()])
        self.services: list[SMTPService] = []
        self.boxes: dict[str, Path] = {}
        self.state = tmp / "tls"

    async def start(self) -> None:
        for host, (ip, _, tls) in HOSTS.items():
            ctx = server_context(*self.setup.certs[host]) if tls else None
            folder = self.tmp / host
            svc = SMTPService(Stage(), MailboxHop(Mailbox(f"{folder}/", 0, True)), host=ip,
                              port=self.ports.port, hostname=host, tls_context=ctx)
            self.ports.release(ip)
            await svc.start()
            self.services.append(svc)
            self.boxes[host] = folder

    async def stop(self) -> None:
        for svc in self.services:
            await svc.stop()
        self.ports.close()

    def mails(self, host: str) -> int:
        return len(list(self.boxes[host].glob("*.eml")))

    async def send(self, domain: str) -> tuple[int, str, str]:
        resolver = make_resolver([self.setup.ub.nameserver])
        d = Deliverer(resolver, helo="relay.our.test", port=self.ports.port, timeout=10,
                      connect_timeout=3, reuse_idle=0,
                      transport=TransportPolicy(resolver, self.state))
        got = await d.deliver(domain, "a@our.test", [f"b@{domain}"], Message.of(RAW))
        r = got[f"b@{domain}"]
        return r.code, r.text, r.remote_mta


@pytest.fixture
async def world(setup: Setup, tmp_path: Path) -> AsyncIterator[World]:
    w = World(setup, tmp_path)
    try:
        await w.start()
        yield w
    finally:
        await w.stop()


async def test_dane_ee_match_delivers(world: World) -> None:
    code, _, mta = await world.send("ok.dane.test")
    assert (code, mta) == (250, "mx-ok.dane.test")
    assert world.mails("mx-ok") == 1


async def test_dane_mismatch_defers_never_downgrades(world: World) -> None:
    code, text, _ = await world.send("wrong.dane.test")
    assert code == 451 and text.startswith("4.7.5") and "DANE" in text, text
    assert world.mails("mx-wrong") == 0


async def test_wrong_certificate_refused_and_the_right_one_used(world: World) -> None:
    code, _, mta = await world.send("two.dane.test")  # MX 10 mx-wrong, MX 20 mx-ok
    assert (code, mta) == (250, "mx-ok.dane.test")
    assert world.mails("mx-wrong") == 0 and world.mails("mx-ok") == 1
    results = [(o["mx"], o["result"]) for o in _outcomes(world)]
    assert ("mx-wrong.dane.test", "validation-failure") in results
    assert ("mx-ok.dane.test", "success") in results
    assert {o["type"] for o in _outcomes(world)} == {"tlsa"}


async def test_dane_ta_chain_and_name(world: World) -> None:
    assert (await world.send("ta.dane.test"))[0] == 250  # CA's cert in TLSA, leaf names mx-ta
    code, text, _ = await world.send("taname.dane.test")  # same CA, leaf for another name
    assert code == 451 and "does not name mx-taname.dane.test" in text, text
    assert world.mails("mx-taname") == 0


async def test_tlsa_without_starttls_defers(world: World) -> None:
    code, text, _ = await world.send("plain.dane.test")
    assert code == 451 and text.startswith("4.7.5") and "STARTTLS" in text, text
    assert world.mails("mx-plain") == 0


async def test_unsigned_tlsa_is_not_dane(world: World) -> None:
    """TLSA in a zone without DNSSEC proves nothing (no AD bit): opportunistic TLS, delivered."""
    code, _, mta = await world.send("insecure.test")
    assert (code, mta) == (250, "mx.insecure.test")


def _outcomes(world: World) -> list[dict]:  # type: ignore[type-arg]
    return [o for p in sorted(world.state.glob("tlsrpt/*.jsonl")) for o in read_outcomes(p)]


async def test_bogus_tlsa_defers(world: World) -> None:
    """The TLSA answer fails validation (SERVFAIL): DANE status unknown, the mail waits."""
    code, text, _ = await world.send("bogusmx.dane.test")
    assert code == 451 and text.startswith("4.7.5") and "DANE status unknown" in text, text
    assert world.mails("mx-ok") == 0
    assert any(o["result"] == "dnssec-invalid" for o in _outcomes(world))
