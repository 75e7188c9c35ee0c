"""`poste signer --dns-server --dns-key` publishes its keys into a real primary (knot)."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import dns.message
import dns.query

from support.cli import run_poste
from support.dkimkit import DOMAIN, make_key
from support.knot import knot_server, simple_zone
from support.service import started


def served_txt(host: str, port: int, name: str) -> list[bytes]:
    r = dns.query.udp(dns.message.make_query(name, "TXT"), host, port=port, timeout=3)
    return [b"".join(rd.strings) for rrset in r.answer for rd in rrset]


def soa_serial(host: str, port: int) -> int:
    r = dns.query.udp(dns.message.make_query(DOMAIN + ".", "SOA"), host, port=port, timeout=3)
    return int(r.answer[0][0].serial)


def test_signer_publishes_its_keys_once(tmp_path: Path, poste_bin: str) -> None:
    secret = base64.b64encode(os.urandom(32)).decode()
    rsa_path, rsa_key = make_key(tmp_path, "rsa", "s1")
    ed_path, ed_key = make_key(tmp_path, "ed25519", "s2")
    with knot_server(
        tmp_path / "knot",
        {DOMAIN: simple_zone(DOMAIN)},
        tsig=("update.example.test", "hmac-sha256", secret),
    ) as ns:
        assert served_txt(ns.host, ns.port, f"s1._domainkey.{DOMAIN}.") == []
        serial0 = soa_serial(ns.host, ns.port)

        def start(n: int) -> str:
            args = [
                poste_bin,
                "signer",
                "--domain",
                DOMAIN,
                "--selector",
                "s1",
                "--private-key",
                str(rsa_path),
                "--selector",
                "s2",
                "--private-key",
                str(ed_path),
                "--destination",
                "127.0.0.1:9",
                "--listen",
                "127.0.0.1:0",
                "--dns-server",
                ns.nameserver,
                "--dns-key",
                f"update.example.test:sha256:{secret}",
            ]
            log = tmp_path / f"signer{n}.log"
            with started(args, log):
                pass  # it listens only after publishing
            return log.read_text()

        first = start(1)
        assert "published: s1._domainkey.example.test. TXT" in first
        assert "published: s2._domainkey.example.test. TXT" in first
        assert served_txt(ns.host, ns.port, f"s1._domainkey.{DOMAIN}.") == [
            rsa_key.txt_value().encode()
        ]
        assert served_txt(ns.host, ns.port, f"s2._domainkey.{DOMAIN}.") == [
            ed_key.txt_value().encode()
        ]
        serial1 = soa_serial(ns.host, ns.port)
        assert serial1 > serial0
        assert ns.log().count("DDNS, processing 1 updates") == 1  # both keys, one UPDATE

        second = start(2)
        assert "unchanged: s1._domainkey.example.test. TXT" in second
        assert "published" not in second
        assert soa_serial(ns.host, ns.port) == serial1  # the zone did not change
        assert ns.log().count("DDNS, processing") == 1  # and knot received no new update


def test_signer_refuses_to_start_with_a_wrong_dns_key(tmp_path: Path, poste_bin: str) -> None:
    secret = base64.b64encode(os.urandom(32)).decode()
    wrong = base64.b64encode(os.urandom(32)).decode()
    key_path, _ = make_key(tmp_path, "ed25519", "s1")
    with knot_server(
        tmp_path / "knot",
        {DOMAIN: simple_zone(DOMAIN)},
        tsig=("update.example.test", "hmac-sha256", secret),
    ) as ns:
        r = subprocess.run(
            [
                poste_bin,
                "signer",
                "--domain",
                DOMAIN,
                "--selector",
                "s1",
                "--private-key",
                str(key_path),
                "--destination",
                "127.0.0.1:9",
                "--listen",
                "127.0.0.1:0",
                "--dns-server",
                ns.nameserver,
                "--dns-key",
                f"update.example.test:sha256:{wrong}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "cannot publish the DKIM keys" in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_signer_flag_errors_are_one_line(tmp_path: Path, poste_bin: str) -> None:
    key_path, _ = make_key(tmp_path, "rsa", "s1")
    base = ["signer", "--domain", DOMAIN, "--destination", "127.0.0.1:9"]
    cases = [
        ["--selector", "a", "--selector", "b", "--private-key", str(key_path)],
        ["--selector", "a", "--private-key", str(tmp_path / "missing.pem")],
        ["--selector", "a", "--private-key", str(key_path), "--dns-server", "127.0.0.1"],
        [
            "--selector",
            "a",
            "--private-key",
            str(key_path),
            "--dns-server",
            "127.0.0.1",
            "--dns-key",
            "k:nosuchalg:AAAA",
        ],
        ["--selector", "a", "--private-key", str(key_path), "--sign-headers", "To,Subject"],
    ]
    for extra in cases:
        r = run_poste(base + extra)  # poste.cli.main in this process
        assert r.returncode != 0, extra
        assert "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("Error:"), r.stderr
