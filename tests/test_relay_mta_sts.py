"""The relay honours MTA-STS (RFC 8461) and reports TLS outcomes (RFC 8460).

The world: knot serves the destinations' zones (MX, `_mta-sts`, `_smtp._tls`,
`mta-sts.D`); each destination's policy is served by poste's own policy
server (`services/verifier/mta_sts.py`, what `[verifier] mta-sts` runs for
our domain) over HTTPS with a certificate of a private test CA; its MX is a
poste SMTP listener with STARTTLS and a certificate of the same CA (for the
right name or a wrong one).  The relay's Deliverer trusts that CA alone
(`tls-ca-file`).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from poste.dns.records import mta_sts_id, mta_sts_policy
from poste.dns.resolver import make_resolver
from poste.services.relay.delivery import Deliverer
from poste.services.relay.spool import Spool
from poste.services.relay.tls_policy.policy import TransportPolicy
from poste.services.relay.tls_policy.tlsrpt import RESULT_TYPES, Reporter
from poste.services.verifier.mta_sts import PolicyServer
from poste.smtp.message import Message
from poste.smtp.server import SMTPService
from poste.smtp.stage import Stage
from poste.smtp.tls import server_context
from poste.tools.srv import Mailbox, MailboxHop
from support.knot import KnotServer, knot_server, simple_zone
from support.standin import reserve_common_port
from support.testca import TestCA

RAW = b"From: a@our.test\r\nTo: b@good.test\r\nSubject: t\r\n\r\nbody\r\n"

# domain: (policy server IP, MX IP, mode, mx: pattern, MX certificate name, STARTTLS)
DESTS = {
    "good.test": ("127.0.0.50", "127.0.0.60", "enforce", "mx.good.test", "mx.good.test", True),
    "wild.test": ("127.0.0.55", "127.0.0.65", "enforce", "*.wild.test", "mx.wild.test", True),
    "bad.test": ("127.0.0.51", "127.0.0.61", "enforce", "mx.bad.test", "wrong.test", True),
    "testing.test": ("127.0.0.52", "127.0.0.62", "testing", "mx.testing.test", "wrong.test",
                     True),
    "nomatch.test": ("127.0.0.53", "127.0.0.63", "enforce", "other.nomatch.test",
                     "mx.nomatch.test", True),
    "plain.test": ("127.0.0.54", "127.0.0.64", "enforce", "mx.plain.test", "mx.plain.test",
                   False),
}
MAX_AGE = 86400


def policy_of(dom: str) -> str:
    _, _, mode, pattern, _, _ = DESTS[dom]
    return mta_sts_policy(mode, [pattern], MAX_AGE)


def zones() -> dict[str, str]:
    out = {}
    for dom, (pip, mip, *_rest) in DESTS.items():
        out[dom] = simple_zone(dom, (
            f"@ MX 10 mx.{dom}.\nmx A {mip}\nmta-sts A {pip}\n"
            f'_mta-sts TXT "v=STSv1; id={mta_sts_id(policy_of(dom))}"\n'
            f'_smtp._tls TXT "v=TLSRPTv1; rua=mailto:tls-reports@reports.test"\n'))
    return out


@pytest.fixture(scope="module")
def ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnotServer]:
    with knot_server(tmp_path_factory.mktemp("knot"), zones()) as server:
        yield server


class World:
    def __init__(self, ns: KnotServer, tmp: Path) -> None:
        self.ns, self.tmp = ns, tmp
        self.ca = TestCA(tmp / "ca")
        self.web_ports = reserve_common_port([d[0] for d in DESTS.values()])
        self.mx_ports = reserve_common_port([d[1] for d in DESTS.values()])
        self.policies: dict[str, PolicyServer] = {}
        self.services: list[SMTPService] = []
        self.boxes: dict[str, Path] = {}
        self.spool = tmp / "spool"
        self.state = self.spool / "tls"  # where the relay keeps it: SPOOL/tls

    async def start(self) -> None:
        web_cert, web_key = self.ca.leaf(*(f"mta-sts.{d}" for d in DESTS), file="mta-sts")
        web_ctx = server_context(web_cert, web_key)
        for dom, (pip, mip, _, _, cert_name, tls) in DESTS.items():
            server = PolicyServer(pip, self.web_ports.port, web_ctx, [dom], policy_of(dom))
            self.web_ports.release(pip)
            await server.start()
            self.policies[dom] = server
            ctx = None
            if tls:
                cert, key = self.ca.leaf(cert_name, file=f"mx-{dom}")
                ctx = server_context(cert, key)
            folder = self.tmp / dom
            svc = SMTPService(Stage(), MailboxHop(Mailbox(f"{folder}/", 0, True)), host=mip,
                              port=self.mx_ports.port, hostname=f"mx.{dom}", tls_context=ctx)
            self.mx_ports.release(mip)
            await svc.start()
            self.services.append(svc)
            self.boxes[dom] = folder

    async def stop(self) -> None:
        for p in self.policies.values():
            await p.stop()
        for svc in self.services:
            await svc.stop()
        self.web_ports.close()
        self.mx_ports.close()

    def transport(self) -> TransportPolicy:
        return TransportPolicy(make_resolver([self.ns.nameserver]), self.state,
                               ca_file=str(self.ca.pem), mta_sts_port=self.web_ports.port)

    def deliverer(self, transport: TransportPolicy | None = None) -> Deliverer:
        return Deliverer(make_resolver([self.ns.nameserver]), helo="relay.our.test",
                         port=self.mx_ports.port, timeout=10, connect_timeout=3,
                         reuse_idle=0, transport=transport or self.transport())

    def mails(self, dom: str) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.boxes[dom].glob("*.eml"))]

    async def send(self, dom: str, d: Deliverer | None = None) -> tuple[int, str]:
        got = await (d or self.deliverer()).deliver(dom, "a@our.test", [f"b@{dom}"],
                                                    Message.of(RAW))
        reply = got[f"b@{dom}"]
        return reply.code, reply.text


@pytest.fixture
async def world(ns: KnotServer, tmp_path: Path) -> AsyncIterator[World]:
    w = World(ns, tmp_path)
    try:
        await w.start()
        yield w
    finally:
        await w.stop()


async def test_enforce_with_a_valid_certificate_delivers(world: World) -> None:
    assert (await world.send("good.test"))[0] == 250
    assert (await world.send("wild.test"))[0] == 250  # mx: *.wild.test
    assert len(world.mails("good.test")) == 1 and len(world.mails("wild.test")) == 1
    cached = json.loads((world.state / "mta-sts" / "good.test.json").read_text())
    assert cached["id"] == mta_sts_id(policy_of("good.test"))


async def test_enforce_with_a_wrong_certificate_defers(world: World) -> None:
    code, text = await world.send("bad.test")
    assert code == 451 and text.startswith("4.7.5") and "mx.bad.test" in text, text
    assert world.mails("bad.test") == []  # not in clear, not unchecked


async def test_enforce_without_starttls_defers(world: World) -> None:
    code, text = await world.send("plain.test")
    assert code == 451 and text.startswith("4.7.5") and "STARTTLS" in text, text
    assert world.mails("plain.test") == []


async def test_enforce_mx_not_in_the_policy_is_never_contacted(world: World) -> None:
    code, text = await world.send("nomatch.test")
    assert code == 451 and text.startswith("4.7.5") and "not in the MTA-STS policy" in text
    assert world.mails("nomatch.test") == []


async def test_testing_mode_delivers_despite_a_wrong_certificate(world: World) -> None:
    assert (await world.send("testing.test"))[0] == 250
    assert len(world.mails("testing.test")) == 1


async def test_cached_policy_holds_when_the_policy_server_is_gone(world: World) -> None:
    d = world.deliverer()
    assert (await world.send("bad.test", d))[0] == 451  # fetched and cached
    await world.policies["bad.test"].stop()
    code, text = await world.send("bad.test", world.deliverer())  # a new relay, same cache
    assert code == 451 and text.startswith("4.7.5"), text
    assert world.mails("bad.test") == []


async def test_without_a_policy_server_no_policy_is_enforced(world: World) -> None:
    """No policy could ever be fetched (and none cached): opportunistic, as RFC 8461 says."""
    await world.policies["bad.test"].stop()
    assert (await world.send("bad.test"))[0] == 250


def _read_report(path: str | Path) -> dict:  # type: ignore[type-arg]
    return json.loads(gzip.decompress(Path(path).read_bytes()))  # type: ignore[no-any-return]


def _check_report(report: dict) -> None:  # type: ignore[type-arg]
    """The fields RFC 8460 4.4 makes mandatory, with their types."""
    assert isinstance(report["organization-name"], str)
    assert isinstance(report["contact-info"], str) and isinstance(report["report-id"], str)
    for key in ("start-datetime", "end-datetime"):
        assert report["date-range"][key].endswith("Z")
    for p in report["policies"]:
        assert p["policy"]["policy-type"] in ("sts", "tlsa", "no-policy-found")
        assert isinstance(p["policy"]["policy-domain"], str)
        for key in ("total-successful-session-count", "total-failure-session-count"):
            assert isinstance(p["summary"][key], int)
        for d in p.get("failure-details", []):
            assert d["result-type"] in RESULT_TYPES
            assert isinstance(d["failed-session-count"], int)


async def test_tls_report_is_rfc8460_json(world: World) -> None:
    transport = world.transport()
    d = world.deliverer(transport)
    for dom in ("good.test", "good.test", "testing.test", "bad.test"):
        await world.send(dom, d)
    sent: list[tuple[str, bytes]] = []

    async def mail(to: str, msg: bytes) -> None:
        sent.append((to, msg))

    reporter = Reporter(transport.recorder.folder, make_resolver([world.ns.nameserver]),
                        transport.verify_ctx, submitter="our.test",
                        sender="postmaster@our.test", mail=mail)
    files = await reporter.send_due(now=True)
    assert {to for to, _ in sent} == {"tls-reports@reports.test"}
    reports = {}
    for f in files:
        report = json.loads(gzip.decompress(f.read_bytes()))
        _check_report(report)
        [p] = report["policies"]
        reports[p["policy"]["policy-domain"]] = p
    good, testing, bad = reports["good.test"], reports["testing.test"], reports["bad.test"]
    assert good["policy"]["policy-type"] == "sts"
    assert good["policy"]["policy-string"] == policy_of("good.test").split("\r\n")[:-1]
    assert good["policy"]["mx-host"] == ["mx.good.test"]
    assert good["summary"] == {"total-successful-session-count": 2,
                               "total-failure-session-count": 0}
    assert testing["summary"]["total-failure-session-count"] == 1
    assert [x["result-type"] for x in testing["failure-details"]] == ["certificate-host-mismatch"]
    assert bad["failure-details"][0]["receiving-mx-hostname"] == "mx.bad.test"
    assert bad["failure-details"][0]["receiving-ip"] == DESTS["bad.test"][1]
    assert bad["failure-details"][0]["sending-mta-ip"].startswith("127.")
    # the mail of 5.3: multipart/report; report-type=tlsrpt, the gzip'd JSON attached
    msg = sent[0][1]
    assert b'report-type="tlsrpt"' in msg and b"application/tlsrpt+gzip" in msg
    assert b"TLS-Report-Submitter: our.test" in msg
    # reported days move on: nothing to report twice
    assert await reporter.send_due(now=True) == []


async def test_tls_report_command_queues_the_report_mail(world: World, poste_bin: str) -> None:
    spool = Spool(world.spool)  # the relay's spool, where the sessions were recorded
    await world.send("testing.test")
    ran = await asyncio.to_thread(
        subprocess.run, [poste_bin, "tls-report", "--spool", str(world.spool), "--domain", "our.test",
         "--nameserver", world.ns.nameserver, "--now"],
        capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    [path] = ran.stdout.split()
    report = _read_report(path)
    _check_report(report)
    assert report["policies"][0]["policy"]["policy-domain"] == "testing.test"
    [entry] = list(spool.entries())
    assert [r.address for r in entry.recipients] == ["tls-reports@reports.test"]
    assert entry.return_path == "" and entry.is_dsn  # a report is never bounced
    assert b"application/tlsrpt+gzip" in spool.read_message(entry.id)


async def test_poste_relay_enforces_mta_sts(world: World, poste_bin: str) -> None:
    """The same through `poste relay` and its flags: --tls-ca-file, --mta-sts-port."""
    from poste.smtp.client import send_message
    from support.relay_env import Relay, make_users

    work = world.tmp / "relay"
    work.mkdir()
    make_users(poste_bin, work / "users", {"someone": ["x@elsewhere.test"]})
    relay = Relay(poste_bin, work, world.ns.nameserver, world.mx_ports.port,
                  "--granted", "127.0.0.0/8", "--tls-ca-file", str(world.ca.pem),
                  "--mta-sts-port", str(world.web_ports.port))
    await asyncio.to_thread(relay.start)
    try:
        sent = await send_message(relay.host, relay.port, "a@our.test",
                                  ["b@good.test", "c@bad.test"], RAW)
        assert sent.data_reply is not None and sent.data_reply.code == 250
        for _ in range(300):
            pending = [r for e in Spool(relay.spool).entries() for r in e.recipients
                       if r.address == "c@bad.test" and r.last_reply]
            if world.mails("good.test") and pending:
                break
            await asyncio.sleep(0.05)
        assert len(world.mails("good.test")) == 1 and world.mails("bad.test") == []
        [bad] = pending
        assert bad.address == "c@bad.test" and bad.state == "pending", bad
        assert bad.last_reply.startswith("4.7.5 certificate of mx.bad.test refused"), bad
    finally:
        await asyncio.to_thread(relay.stop)


async def test_tls_report_posted_to_an_https_rua(tmp_path: Path) -> None:
    """rua=https://...: the gzip'd report is POSTed as application/tlsrpt+gzip (RFC 8460 5.4)."""
    from poste.services.relay.tls_policy.tlsrpt import Outcome, Recorder

    ip = "127.0.0.56"
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.leaf("reports.posting.test")
    got: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        got.append(head + await reader.readexactly(length))
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, ip, 0, ssl=server_context(cert, key))
    port = server.sockets[0].getsockname()[1]
    zone = simple_zone("posting.test", f"reports A {ip}\n_smtp._tls TXT \"v=TLSRPTv1; "
                                       f'rua=https://reports.posting.test:{port}/v1/tlsrpt"\n')
    async with server:
        with knot_server(tmp_path / "knot", {"posting.test": zone}) as ns:
            recorder = Recorder(tmp_path / "tlsrpt")
            recorder.record(Outcome("posting.test", "no-policy-found", (), "mx.posting.test",
                                    "192.0.2.1", "starttls-not-supported"))
            reporter = Reporter(recorder.folder, make_resolver([ns.nameserver]),
                                TransportPolicy(make_resolver([ns.nameserver]), tmp_path,
                                                ca_file=str(ca.pem)).verify_ctx,
                                submitter="our.test", sender="postmaster@our.test",
                                mail=None)  # type: ignore[arg-type]
            [written] = await reporter.send_due(now=True)
    [request] = got
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/tlsrpt HTTP/")
    assert b"Content-Type: application/tlsrpt+gzip" in head
    assert body == written.read_bytes()
    report = json.loads(gzip.decompress(body))
    _check_report(report)
    [p] = report["policies"]
    assert p["policy"] == {"policy-type": "no-policy-found", "policy-domain": "posting.test"}
    assert p["failure-details"][0]["result-type"] == "starttls-not-supported"
