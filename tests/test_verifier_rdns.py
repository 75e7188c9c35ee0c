"""Forward-confirmed reverse DNS of the peer, as the verifier names it in `Received:`.

A fake DNS server on loopback serves the PTR and A/AAAA records; the
verifier runs in-process (VerifierStage behind the real SMTP core) so the
`Received:` field the next hop gets is checked, not only the function.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from poste.services.verifier import rdns, spf
from poste.services.verifier.authenticate import Authenticator
from poste.services.verifier.service import VerifierStage
from poste.smtp.server import SMTPService
from poste.smtp.stage import Envelope
from poste.tools.srv import Mailbox, MailboxHop
from support.fakedns import DROP, FakeDNS, fake_dns, records_lookup

RECORDS: dict[str, list[tuple[str, str | bytes]]] = {
    # 192.0.2.10 -> mail.sender.test -> 192.0.2.10: confirmed
    "10.2.0.192.in-addr.arpa": [("PTR", "mail.sender.test.")],
    "mail.sender.test": [("A", "192.0.2.10"), ("AAAA", "2001:db8::25")],
    # 192.0.2.11 -> liar.test, whose address is another one: not confirmed
    "11.2.0.192.in-addr.arpa": [("PTR", "liar.test.")],
    "liar.test": [("A", "192.0.2.99")],
    # 192.0.2.12: two names, the first one does not exist, the second confirms
    "12.2.0.192.in-addr.arpa": [("PTR", "gone.test."), ("PTR", "second.sender.test.")],
    "second.sender.test": [("A", "192.0.2.12")],
    # IPv6 2001:db8::25 -> mail.sender.test (AAAA above)
    "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa": [
        ("PTR", "mail.sender.test.")
    ],
    # 127.0.0.10, the address our in-process test connects from
    "10.0.0.127.in-addr.arpa": [("PTR", "client.sender.test.")],
    "client.sender.test": [("A", "127.0.0.10")],
}


@pytest.fixture
def dns() -> Iterator[FakeDNS]:
    with fake_dns(records_lookup(RECORDS)) as server:
        yield server


def authenticator(nameserver: str, timeout: float = 2.0) -> Authenticator:
    return Authenticator(spf.resolver_for([nameserver], timeout), "mx.our.test")


@pytest.mark.parametrize(
    ("ip", "name"),
    [
        ("192.0.2.10", "mail.sender.test"),
        ("::ffff:192.0.2.10", "mail.sender.test"),  # a v4 peer on a dual-stack socket
        ("2001:db8::25", "mail.sender.test"),
        ("192.0.2.11", None),  # PTR not confirmed by the name's A record
        ("192.0.2.12", "second.sender.test"),
        ("192.0.2.13", None),  # no PTR at all (NXDOMAIN)
        ("not-an-ip", None),
    ],
)
async def test_confirmed_name(dns: FakeDNS, ip: str, name: str | None) -> None:
    assert await authenticator(dns.nameserver).peer_name(ip) == name


async def test_dropped_queries_leave_the_peer_unnamed() -> None:
    with fake_dns(lambda qname, qtype: DROP) as dead:
        auth = authenticator(dead.nameserver, timeout=0.5)
        assert await auth.peer_name("192.0.2.10") is None
        assert dead.queries  # it was asked, and never answered


async def test_confirmed_name_over_tcp(dns: FakeDNS) -> None:
    auth = Authenticator(spf.resolver_for([f"tcp:{dns.nameserver}"], 2), "mx.our.test")
    assert await auth.peer_name("192.0.2.10") == "mail.sender.test"


async def test_on_connect_names_the_peer_and_never_refuses(dns: FakeDNS) -> None:
    stage = VerifierStage(["our.test"], authenticator(dns.nameserver))
    env = Envelope(peer_ip="192.0.2.10")
    assert await stage.on_connect(env) is None
    assert env.peer_name == "mail.sender.test"
    env = Envelope(peer_ip="192.0.2.11")
    assert await stage.on_connect(env) is None
    assert env.peer_name is None


async def test_received_field_names_the_confirmed_peer(dns: FakeDNS, tmp_path: Path) -> None:
    box = Mailbox(f"{tmp_path}/", 0, False)
    stage = VerifierStage(["our.test"], authenticator(dns.nameserver))
    service = SMTPService(
        stage, MailboxHop(box), host="127.0.0.1", port=0, hostname="mx.our.test"
    )
    await service.start()
    try:
        host, port = service.sockname
        msg = b"From: <a@sender.test>\r\nTo: <user@our.test>\r\nSubject: rdns\r\n\r\nhi\r\n"

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP(host, port, source_address=("127.0.0.10", 0)) as client:
                client.ehlo("client.sender.test")
                return client.sendmail("a@sender.test", ["user@our.test"], msg)

        assert await asyncio.to_thread(send) == {}
    finally:
        await service.stop()
    stored = await asyncio.to_thread(lambda: [p.read_bytes() for p in tmp_path.glob("*.eml")])
    assert len(stored) == 1
    assert b"Received: from client.sender.test (client.sender.test [127.0.0.10])" in stored[0]


def test_async_twin_asks_the_same_servers() -> None:
    sync = spf.resolver_for(["127.0.0.1:5300", "tcp:127.0.0.2:5301"], 1.5)
    twin = rdns.async_twin(sync)
    assert [(ns.address, ns.port) for ns in twin.nameservers] == [
        ("127.0.0.1", 5300),
        ("127.0.0.2", 5301),
    ]
    assert twin.lifetime == 1.5


async def test_a_confirmed_name_is_kept_and_asked_again_for_nothing() -> None:
    """rdns.py keeps a name found until its answers' TTL: the next connection from the
    same address gets the same name without a query; an unconfirmed one is kept too."""
    asked: list[str] = []
    answer = records_lookup(RECORDS)

    def counting(qname: str, qtype: int):  # type: ignore[no-untyped-def]
        asked.append(qname)
        return answer(qname, qtype)

    with fake_dns(counting) as server:
        a = authenticator(server.nameserver)
        assert await a.peer_name("192.0.2.10") == "mail.sender.test"
        assert await a.peer_name("192.0.2.11") is None
        seen = len(asked)
        assert await a.peer_name("192.0.2.10") == "mail.sender.test"
        assert await a.peer_name("::ffff:192.0.2.10") == "mail.sender.test"
        assert await a.peer_name("192.0.2.11") is None
        assert len(asked) == seen
        # a name whose first PTR target failed (NXDOMAIN) is not kept; the same answer
        assert await a.peer_name("192.0.2.12") == "second.sender.test"
        assert await a.peer_name("192.0.2.12") == "second.sender.test"
