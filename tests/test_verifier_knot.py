"""The shared Knot DNS helper: serves zones over UDP and TCP, takes TSIG-signed updates."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.tsigkeyring
import dns.update

from support.knot import knot_server, simple_zone


def test_knot_serves_zone_and_accepts_signed_update(tmp_path: Path) -> None:
    secret = base64.b64encode(os.urandom(32)).decode()
    zone = simple_zone("sender.test", '@ TXT "v=spf1 ip4:127.0.0.10 -all"\n')
    with knot_server(tmp_path, {"sender.test": zone}, tsig=("k1", "hmac-sha256", secret)) as ns:
        assert ns.nameserver == f"127.0.0.1:{ns.port}"
        q = dns.message.make_query("sender.test.", "TXT")
        for query in (dns.query.udp, dns.query.tcp):
            r = query(q, ns.host, port=ns.port, timeout=3)
            assert b"v=spf1 ip4:127.0.0.10 -all" in r.answer[0][0].strings[0]
        keyring = dns.tsigkeyring.from_text({"k1": ("hmac-sha256", secret)})
        up = dns.update.Update("sender.test", keyring=keyring, keyname="k1")
        up.add("x", 60, "A", "192.0.2.7")
        assert dns.query.tcp(up, ns.host, port=ns.port, timeout=3).rcode() == dns.rcode.NOERROR
        q = dns.message.make_query("x.sender.test.", "A")
        r = dns.query.udp(q, ns.host, port=ns.port, timeout=3)
        assert r.answer[0][0].address == "192.0.2.7"
        unsigned = dns.update.Update("sender.test")
        unsigned.add("y", 60, "A", "192.0.2.8")
        refused = dns.query.tcp(unsigned, ns.host, port=ns.port, timeout=3)
        assert refused.rcode() != dns.rcode.NOERROR
