"""MX delivery against a real DNS server (knot) and real SMTP servers on 127.0.0.x."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from poste.dns.resolver import make_resolver
from poste.services.relay.delivery import Deliverer
from poste.smtp.message import Message
from poste.smtp.server import Limits, SMTPService
from poste.smtp.stage import Envelope, Reply, Stage
from poste.smtp.tls import self_signed, server_context
from poste.tools.srv import Mailbox, MailboxHop
from support.knot import KnotServer, knot_server
from support.relay_env import header, mx_zones, return_path
from support.standin import PortReservation, reserve_common_port

RAW = b"From: a@example.org\r\nTo: b@gmail.test\r\nSubject: t\r\n\r\nbody \xc3\xa9\r\n"
MSG = Message.of(RAW)
HOSTS = [f"127.0.0.{i}" for i in range(21, 31)] + ["::1"]


class Refuse(Stage):
    """A destination that refuses some recipients, like a real MX would."""

    async def on_rcpt(self, env: Envelope, rcpt: str) -> Reply | None:
        if rcpt.startswith("nobody@"):
            return Reply(550, "5.1.1 No such user")
        if rcpt.startswith("later@"):
            return Reply(450, "4.2.1 Mailbox busy")
        return None


class World:
    def __init__(self, ns: KnotServer, ports: PortReservation, tmp: Path) -> None:
        self.ns, self.ports, self.port, self.tmp = ns, ports, ports.port, tmp
        self.services: list[SMTPService] = []
        self.boxes: dict[str, Path] = {}

    async def mx(self, ip: str, *, tls: bool = False, data_reply: Reply | None = None) -> Path:
        folder = self.tmp / ip
        ctx = None
        if tls:
            cert, key = self.tmp / f"{ip}.crt", self.tmp / f"{ip}.key"
            self_signed(cert, key, f"mx-{ip}")
            ctx = server_context(cert, key)
        box = Mailbox(f"{folder}/", 0, True)
        svc = SMTPService(Refuse(), MailboxHop(box, data_reply=data_reply), host=ip,
                          port=self.port, hostname=f"mx-{ip}", tls_context=ctx)
        self.ports.release(ip)  # right before the listener binds the port
        await svc.start()
        self.services.append(svc)
        return folder

    def deliverer(self) -> Deliverer:
        resolver = make_resolver([self.ns.nameserver])
        return Deliverer(resolver, helo="relay.our.test", port=self.port, timeout=10,
                         connect_timeout=3)


@pytest.fixture(scope="module")
def zones_ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnotServer]:
    """knotd serving mx_zones() for the whole module (the tests only read it)."""
    with knot_server(tmp_path_factory.mktemp("knot"), mx_zones()) as ns:
        yield ns


@pytest.fixture
async def world(zones_ns: KnotServer, tmp_path: Path) -> AsyncIterator[World]:
    # One port on every host, held (bound, not listening) for the test: a host
    # without a server refuses connections, and nothing else can take the port.
    ports = reserve_common_port(HOSTS)
    w = World(zones_ns, ports, tmp_path)
    try:
        yield w
    finally:
        for svc in w.services:
            await svc.stop()
        ports.close()


def mails(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.eml"))]


async def test_per_recipient_results(world: World) -> None:
    box = await world.mx("127.0.0.21")
    got = await world.deliverer().deliver(
        "gmail.test", "SRS0=x@our.test",
        ["alice@gmail.test", "nobody@gmail.test", "later@gmail.test"], MSG,
    )
    assert got["alice@gmail.test"].ok and got["alice@gmail.test"].remote_mta == "mx.gmail.test"
    assert got["nobody@gmail.test"].permanent and "5.1.1" in got["nobody@gmail.test"].text
    assert got["later@gmail.test"].code == 450 and not got["later@gmail.test"].permanent
    [mail] = mails(box)
    assert return_path(mail) == "SRS0=x@our.test"
    assert header(mail, "Delivered-To") == ["alice@gmail.test"]
    assert mail.endswith(RAW)  # the bytes, unchanged


async def test_backup_mx_when_primary_down(world: World) -> None:
    box = await world.mx("127.0.0.29")  # mx2 (preference 20); mx1 has no server
    got = await world.deliverer().deliver("backup.test", "a@example.org", ["x@backup.test"], MSG)
    assert got["x@backup.test"].ok and got["x@backup.test"].remote_mta == "mx2.backup.test"
    assert len(mails(box)) == 1


async def test_implicit_mx(world: World) -> None:
    box = await world.mx("127.0.0.27")
    got = await world.deliverer().deliver("implicit.test", "a@example.org", ["x@implicit.test"], MSG)
    assert got["x@implicit.test"].ok
    assert len(mails(box)) == 1


async def test_null_mx_and_missing_domain_are_permanent(world: World) -> None:
    d = world.deliverer()
    got = await d.deliver("nullmx.test", "a@example.org", ["x@nullmx.test"], MSG)
    assert got["x@nullmx.test"].permanent and "5.1.10" in got["x@nullmx.test"].text
    got = await d.deliver("nosuch.gmail.test", "a@example.org", ["x@nosuch.gmail.test"], MSG)
    assert got["x@nosuch.gmail.test"].permanent and "5.1.2" in got["x@nosuch.gmail.test"].text


async def test_down_is_temporary(world: World) -> None:
    got = await world.deliverer().deliver("down.test", "a@example.org", ["x@down.test"], MSG)
    assert got["x@down.test"].code == 451 and not got["x@down.test"].ok


async def test_data_refused_is_per_message(world: World) -> None:
    await world.mx("127.0.0.25", data_reply=Reply(554, "5.7.1 Spam"))
    got = await world.deliverer().deliver(
        "refuse.test", "a@example.org", ["x@refuse.test", "y@refuse.test"], MSG
    )
    assert all(r.permanent and "5.7.1 Spam" in r.text for r in got.values())


async def test_opportunistic_starttls_without_cert_check(world: World) -> None:
    box = await world.mx("127.0.0.22", tls=True)  # self-signed: no check, still TLS
    got = await world.deliverer().deliver("outlook.test", "a@example.org", ["x@outlook.test"], MSG)
    assert got["x@outlook.test"].ok
    [mail] = mails(box)
    assert "ESMTPS" in header(mail, "Received")[0]


async def test_ipv6_first_then_ipv4(world: World) -> None:
    box6 = await world.mx("::1")  # mx.v6.test has AAAA ::1 and A 127.0.0.30
    got = await world.deliverer().deliver("v6.test", "a@example.org", ["x@v6.test"], MSG)
    assert got["x@v6.test"].ok
    assert len(mails(box6)) == 1
    for svc in world.services:
        await svc.stop()
    world.services.clear()
    box4 = await world.mx("127.0.0.30")  # IPv6 down: IPv4 address of the same host
    got = await world.deliverer().deliver("v6.test", "a@example.org", ["y@v6.test"], MSG)
    assert got["y@v6.test"].ok
    assert len(mails(box4)) == 1


# -- mail that would loop back to ourselves (Postfix: "loops back to myself", 5.4.6) --------


async def test_mx_that_is_ourselves_is_a_permanent_loop(world: World) -> None:
    box = await world.mx("127.0.0.21")
    d = world.deliverer()
    d_self = Deliverer(d.resolver, helo="relay.our.test", port=world.port, timeout=10,
                       connect_timeout=3, self_addresses=["127.0.0.21"])
    got = await d_self.deliver("gmail.test", "a@example.org", ["x@gmail.test"], MSG)
    r = got["x@gmail.test"]
    assert r.permanent and r.text == "5.4.6 mail for gmail.test loops back to myself"
    assert mails(box) == []  # never delivered to ourselves
    # The same for an implicit MX (the domain's own A record).
    d_self = Deliverer(d.resolver, helo="h", port=world.port, self_addresses=["127.0.0.27"])
    got = await d_self.deliver("implicit.test", "a@example.org", ["x@implicit.test"], MSG)
    assert "5.4.6" in got["x@implicit.test"].text and got["x@implicit.test"].permanent
    # A wildcard listen address means every address of this machine (127.0.0.21 included).
    d_any = Deliverer(d.resolver, helo="h", port=world.port, self_addresses=["0.0.0.0"])
    got = await d_any.deliver("gmail.test", "a@example.org", ["x@gmail.test"], MSG)
    assert "loops back to myself" in got["x@gmail.test"].text
    assert mails(box) == []


async def test_backup_mx_that_is_ourselves_is_not_tried(world: World) -> None:
    backup = await world.mx("127.0.0.29")  # mx2 (preference 20) is us; mx1 is down
    d = Deliverer(make_resolver([world.ns.nameserver]), helo="h", port=world.port,
                  connect_timeout=3, self_addresses=["127.0.0.29"])
    got = await d.deliver("backup.test", "a@example.org", ["x@backup.test"], MSG)
    r = got["x@backup.test"]
    assert not r.ok and not r.permanent  # mx1 may come back: wait for it
    assert "loops" not in r.text and mails(backup) == []
    # If the primary is us, that is the loop, whatever the backups are.
    d = Deliverer(make_resolver([world.ns.nameserver]), helo="h", port=world.port,
                  connect_timeout=3, self_addresses=["127.0.0.28"])
    got = await d.deliver("backup.test", "a@example.org", ["x@backup.test"], MSG)
    assert got["x@backup.test"].permanent and "5.4.6" in got["x@backup.test"].text
    assert mails(backup) == []


async def test_domain_without_mx_or_address_is_permanent(world: World) -> None:
    got = await world.deliverer().deliver("noaddr.test", "a@example.org", ["x@noaddr.test"], MSG)
    assert got["x@noaddr.test"].permanent and "5.4.4" in got["x@noaddr.test"].text


# -- connection reuse -----------------------------------------------------------------------


class Counting(Refuse):
    def __init__(self) -> None:
        self.connections = 0

    async def on_connect(self, env: Envelope) -> Reply | None:
        self.connections += 1
        return None


async def counting_mx(world: World, ip: str, **limits: float) -> tuple[Counting, Path]:
    stage = Counting()
    folder = world.tmp / f"{ip}-counted"
    svc = SMTPService(stage, MailboxHop(Mailbox(f"{folder}/", 0, True)), host=ip,
                      port=world.port, hostname=f"mx-{ip}",
                      limits=Limits(**limits) if limits else None)  # type: ignore[arg-type]
    world.ports.release(ip)
    await svc.start()
    world.services.append(svc)
    return stage, folder


async def test_messages_to_one_domain_share_a_session(world: World) -> None:
    stage, box = await counting_mx(world, "127.0.0.21")
    d = Deliverer(make_resolver([world.ns.nameserver]), helo="relay.our.test", port=world.port,
                  reuse_limit=3, reuse_idle=30)
    try:
        for i in range(7):
            got = await d.deliver("gmail.test", f"s{i}@example.org",
                                  [f"u{i}@gmail.test", "nobody@gmail.test"], MSG)
            assert got[f"u{i}@gmail.test"].ok, got
            assert got["nobody@gmail.test"].permanent  # per-recipient results on reuse too
    finally:
        await d.aclose()
    got_mails = mails(box)
    assert len(got_mails) == 7
    # RSET/MAIL per message: each mail has its own sender and recipient.
    assert sorted(return_path(m) for m in got_mails) == [f"s{i}@example.org" for i in range(7)]
    assert sorted(header(m, "Delivered-To")[0] for m in got_mails) == [
        f"u{i}@gmail.test" for i in range(7)
    ]
    assert stage.connections == 3  # 3 + 3 + 1 messages (reuse_limit=3)


async def test_kept_session_closed_by_the_server_falls_back(world: World) -> None:
    import asyncio

    stage, box = await counting_mx(world, "127.0.0.21", idle_timeout=0.3)
    d = Deliverer(make_resolver([world.ns.nameserver]), helo="h", port=world.port,
                  reuse_idle=30)
    try:
        assert (await d.deliver("gmail.test", "a@example.org", ["u1@gmail.test"], MSG))[
            "u1@gmail.test"].ok
        # The server drops our idle session meanwhile (idle_timeout=0.3): wait until it did.
        server = world.services[-1]
        for _ in range(1000):
            if not server.connections:
                break
            await asyncio.sleep(0.01)
        assert not server.connections, "the server kept the idle session"
        await asyncio.sleep(0.05)  # and its FIN reaches our side of the kept session
        got = await d.deliver("gmail.test", "a@example.org", ["u2@gmail.test"], MSG)
        assert got["u2@gmail.test"].ok, got
    finally:
        await d.aclose()
    assert len(mails(box)) == 2 and stage.connections == 2


async def test_scheduler_drains_a_queue_over_few_sessions(world: World) -> None:
    import asyncio

    from poste.services.relay.scheduler import Policy, Scheduler
    from poste.services.relay.spool import Entry, Recipient, Spool

    stage, box = await counting_mx(world, "127.0.0.21")
    spool = Spool(world.tmp / "spool")
    for i in range(12):
        spool.put(Entry(id=f"R{i:02}", return_path="", recipients=[
            Recipient(f"u{i}@gmail.test", "a@example.org")]), MSG)
    d = Deliverer(make_resolver([world.ns.nameserver]), helo="h", port=world.port)
    sched = Scheduler(spool, d.deliver, hostname="relay.our.test", domain="our.test",
                      policy=Policy(max_per_domain=2, rescan=3600))
    await sched.start()
    try:
        for _ in range(300):
            if not spool.ids():
                break
            await asyncio.sleep(0.05)
    finally:
        await sched.stop()
        await d.aclose()
    assert spool.ids() == [] and len(mails(box)) == 12
    assert stage.connections <= 2  # at most the per-domain cap, reused
