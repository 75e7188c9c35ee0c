"""MX delivery against a real DNS server (knot) and real SMTP servers on 127.0.0.x."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from poste.dns.resolver import make_resolver
from poste.relay.delivery import Deliverer
from poste.smtp.server import SMTPService
from poste.smtp.stage import Envelope, Reply, Stage
from poste.smtp.tls import self_signed, server_context
from poste.tools.srv import Mailbox, MailboxHop
from support.knot import KnotServer, knot_factory  # noqa: F401
from support.relay_env import common_port, header, mx_zones, return_path

MSG = b"From: a@example.org\r\nTo: b@gmail.test\r\nSubject: t\r\n\r\nbody \xc3\xa9\r\n"
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
    def __init__(self, ns: KnotServer, port: int, tmp: Path) -> None:
        self.ns, self.port, self.tmp = ns, port, tmp
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
        await svc.start()
        self.services.append(svc)
        return folder

    def deliverer(self) -> Deliverer:
        resolver = make_resolver([self.ns.nameserver])
        return Deliverer(resolver, helo="relay.our.test", port=self.port, timeout=10,
                         connect_timeout=3)


@pytest.fixture
async def world(knot_factory: Callable[..., KnotServer], tmp_path: Path) -> AsyncIterator[World]:  # noqa: F811
    ns = knot_factory(mx_zones())
    w = World(ns, common_port(HOSTS), tmp_path)
    yield w
    for svc in w.services:
        await svc.stop()


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
    assert mail.endswith(MSG)  # the bytes, unchanged


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
