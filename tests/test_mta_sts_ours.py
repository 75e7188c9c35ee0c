"""Our own domain's MTA-STS and TLS-RPT (RFC 8461, RFC 8460): the records `poste dns records`
prints, the policy the verifier's HTTPS listener serves, and `poste doctor` agreeing on both.

knot serves exactly what `poste dns records --mta-sts enforce` printed; the
policy server is the one `[verifier] mta-sts = "enforce"` runs, with a
certificate of a private test CA; the policy is then fetched as a sending
relay would (poste's own MTA-STS client), and checked by `poste doctor`.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from poste.dns.resolver import make_resolver
from poste.runtime.settings import defaults
from poste.runtime.tls import TLSFiles
from poste.services.relay.tls_policy.https import request
from poste.services.relay.tls_policy.mta_sts import MTASTS
from poste.services.relay.tls_policy.policy import verifying_context
from poste.services.verifier.mta_sts import PolicyServer
from poste.services.verifier.service import mta_sts_server, with_mta_sts_names
from poste.services.verifier.settings import SETTINGS
from poste.smtp.tls import server_context
from support.knot import KnotServer, knot_server
from support.net import free_port
from support.testca import TestCA

IP = "127.0.0.90"


def records(poste_bin: str) -> str:
    ran = subprocess.run(
        [poste_bin, "dns", "records", "-d", "our.test", "--mx-host", "mx.our.test", "--ip", IP,
         "--mta-sts", "enforce", "--mta-sts-max-age", "86400",
         "--tlsrpt-rua", "mailto:tls@our.test"],
        capture_output=True, text=True, check=True)
    return ran.stdout


class World:
    ns: KnotServer
    server: PolicyServer
    ca: TestCA
    printed: str


@pytest.fixture
async def world(tmp_path: Path, poste_bin: str) -> AsyncIterator[World]:
    w = World()
    w.printed = await asyncio.to_thread(records, poste_bin)
    zone = ("$TTL 60\nour.test. SOA ns.our.test. hostmaster.our.test. 1 3600 600 86400 60\n"
            "our.test. NS ns.our.test.\nns.our.test. A 127.0.0.1\n" + w.printed)
    w.ca = TestCA(tmp_path / "ca")
    cert, key = w.ca.leaf("mx.our.test", "mta-sts.our.test", file="our")
    values = {**defaults(SETTINGS), "domain": ["our.test"], "mta-sts": "enforce",
              "mta-sts-listen": f"{IP}:{free_port(IP)}", "mta-sts-max-age": 86400.0}
    server = mta_sts_server(values, TLSFiles(server_context(cert, key), str(cert), str(key)),
                            "mx.our.test")
    assert server is not None
    w.server = server
    with knot_server(tmp_path / "knot", {"our.test": zone}) as ns:
        w.ns = ns
        await server.start()
        try:
            yield w
        finally:
            await server.stop()


async def test_printed_records_and_served_policy_agree(world: World) -> None:
    assert '_smtp._tls.our.test. 3600 IN TXT "v=TLSRPTv1; rua=mailto:tls@our.test"' in world.printed
    assert f"mta-sts.our.test. 3600 IN A {IP}" in world.printed
    resolver = make_resolver([world.ns.nameserver])
    sts = MTASTS(resolver, Path("/nonexistent"), verifying_context(str(world.ca.pem)),
                 port=world.server.port)
    policy = await sts.fetch("our.test")  # as a sender fetches it: verified certificate
    assert (policy.mode, policy.mx, policy.max_age) == ("enforce", ("mx.our.test",), 86400)
    txt_id = await sts.txt_id("our.test")
    assert txt_id and f"v=STSv1; id={txt_id}" in world.printed
    status, _, _ = await request(resolver, verifying_context(str(world.ca.pem)),
                                 "mta-sts.our.test", "/elsewhere", port=world.server.port)
    assert status == 404


async def test_doctor_checks_mta_sts_and_tlsrpt(world: World, poste_bin: str) -> None:
    ran = await asyncio.to_thread(
        subprocess.run,
        [poste_bin, "doctor", "--domain", "our.test", "--nameserver", world.ns.nameserver,
         "--https-port", str(world.server.port), "--tls-ca", str(world.ca.pem),
         "--smtp-port", str(free_port(IP)), "--timeout", "2"],
        capture_output=True, text=True, timeout=120)
    lines = ran.stdout.splitlines()
    assert any(line.split()[:2] == ["ok", "STS"] and "mode enforce" in line for line in lines), \
        ran.stdout
    assert any(line.split()[:2] == ["ok", "TLSRPT"] for line in lines), ran.stdout
    assert "Traceback" not in ran.stderr


def test_acme_names_include_mta_sts() -> None:
    values = {**defaults(SETTINGS), "domain": ["our.test", "other.test"], "mta-sts": "testing",
              "acme-directory": "https://acme.test/dir", "hostname": "mx.our.test"}
    assert with_mta_sts_names(values)["acme-name"] == [
        "mx.our.test", "mta-sts.our.test", "mta-sts.other.test"]
    assert with_mta_sts_names({**values, "mta-sts": "off"})["acme-name"] == []


async def test_poste_up_serves_the_policy(tmp_path: Path) -> None:
    """`[verifier] mta-sts` in `poste up`: the policy on its own HTTPS listener, with the
    verifier's certificate (here `poste init`'s self-signed one)."""
    import ssl

    from poste.stack.build import build
    from poste.stack.config import load
    from poste.stack.init import Layout, write_stack

    d = tmp_path / "mail"
    write_stack(d, Layout(domain="our.test", hostname="mail.our.test",
                          postmaster="admin@elsewhere.test", mailbox="box",
                          verifier_listen="127.0.0.1:0"))
    port = free_port(IP)
    text = (d / "poste.toml").read_text().replace(
        "[verifier]", f'[verifier]\nmta-sts = "testing"\nmta-sts-listen = "{IP}:{port}"')
    text = text.replace("[submission]", "[submission]\nenabled = false")
    (d / "poste.toml").write_text(text)
    stack = build(load(d / "poste.toml"))
    await stack.start()
    try:
        ctx = ssl.create_default_context(cafile=str(d / "tls" / "cert.pem"))
        ctx.check_hostname = False  # the self-signed certificate names mail.our.test
        reader, writer = await asyncio.open_connection(IP, port, ssl=ctx,
                                                       server_hostname="mta-sts.our.test")
        writer.write(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.our.test\r\n\r\n")
        reply = await reader.read()
        writer.close()
    finally:
        await stack.stop()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Type: text/plain" in reply
    assert reply.endswith(b"\r\n\r\nversion: STSv1\r\nmode: testing\r\nmx: mail.our.test\r\n"
                          b"max_age: 604800\r\n")
