"""`poste dns records` and `poste dns publish` (RFC 2136 + TSIG) against a real knot."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import dns.message
import dns.query
import pytest

from poste.dns.update import parse_tsig
from support.dkimkit import DOMAIN, make_key
from support.knot import knot_server, simple_zone


def answer(host: str, port: int, name: str, rtype: str) -> list[str]:
    r = dns.query.udp(dns.message.make_query(name, rtype), host, port=port, timeout=3)
    out = []
    for rrset in r.answer:
        for rd in rrset:
            if rtype == "TXT":
                out.append(b"".join(rd.strings).decode())
            else:
                out.append(rd.to_text())
    return sorted(out)


def run(poste_bin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([poste_bin, "dns", *args], capture_output=True, text=True, timeout=60)


def test_records_lists_what_a_domain_needs(tmp_path: Path, poste_bin: str) -> None:
    key_path, key = make_key(tmp_path, "rsa", "s1")
    r = run(
        poste_bin,
        "records",
        "--domain",
        DOMAIN,
        "--ip",
        "192.0.2.10",
        "--selector",
        "s1",
        "--private-key",
        str(key_path),
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"{DOMAIN}. 3600 IN MX 10 mail.{DOMAIN}." in lines
    assert f"mail.{DOMAIN}. 3600 IN A 192.0.2.10" in lines
    assert f'{DOMAIN}. 3600 IN TXT "v=spf1 mx -all"' in lines
    # the HELO name of our relay (the MX host by default): a bounce from <> is checked there
    assert f'mail.{DOMAIN}. 3600 IN TXT "v=spf1 a -all"' in lines
    assert (
        f'_dmarc.{DOMAIN}. 3600 IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@{DOMAIN}"'
        in lines
    )
    dkim_line = next(x for x in lines if x.startswith(f"s1._domainkey.{DOMAIN}. 3600 IN TXT "))
    assert key.txt_value() == "".join(dkim_line.split('"')[1::2])
    r = run(poste_bin, "records", "--domain", DOMAIN, "--ip", "192.0.2.10",
            "--helo", f"out.{DOMAIN}", "--helo", "relay.elsewhere.test")
    helo = [x for x in r.stdout.splitlines() if "HELO" in x or "v=spf1 ip4" in x]
    assert helo == [
        f'out.{DOMAIN}. 3600 IN TXT "v=spf1 ip4:192.0.2.10 -all"',
        f"; SPF of the HELO name relay.elsewhere.test.: not in {DOMAIN}., publish it in its own zone",
        '; relay.elsewhere.test. 3600 IN TXT "v=spf1 ip4:192.0.2.10 -all"',
    ], r.stdout
    # the PTR is for the address owner: printed as a comment to pass on
    assert f"; 10.2.0.192.in-addr.arpa. 3600 IN PTR mail.{DOMAIN}." in lines
    assert any(x.startswith("; reverse DNS: ask the owner of 192.0.2.10") for x in lines)


def test_publish_sends_only_missing_or_different_records(tmp_path: Path, poste_bin: str) -> None:
    secret = base64.b64encode(os.urandom(32)).decode()
    key_path, key = make_key(tmp_path, "ed25519", "s1")
    zone = simple_zone(
        DOMAIN,
        '@ TXT "google-site-verification=abc"\n@ TXT "v=spf1 a -all"\n@ MX 10 mail\nmail A 192.0.2.10\n',
    )
    common = [
        "--domain",
        DOMAIN,
        "--ip",
        "192.0.2.10",
        "--selector",
        "s1",
        "--private-key",
        str(key_path),
    ]
    with knot_server(
        tmp_path / "knot", {DOMAIN: zone}, tsig=("k.example.test", "hmac-sha512", secret)
    ) as ns:
        dns_flags = [
            "--dns-server",
            ns.nameserver,
            "--dns-key",
            f"k.example.test:hmac-sha512:{secret}",
        ]
        r = run(poste_bin, "publish", *common, *dns_flags)
        assert r.returncode == 0, r.stderr
        out = r.stdout.splitlines()
        # MX and A were right already; SPF differed; DKIM and DMARC were missing
        assert f"unchanged: {DOMAIN}. MX" in out and f"unchanged: mail.{DOMAIN}. A" in out
        assert f"published: {DOMAIN}. TXT" in out
        assert f"published: s1._domainkey.{DOMAIN}. TXT" in out
        assert f"published: _dmarc.{DOMAIN}. TXT" in out
        assert not any("PTR" in x for x in out)  # never ours to publish

        # our SPF replaced theirs; the unrelated TXT at the apex survived
        assert answer(ns.host, ns.port, DOMAIN + ".", "TXT") == [
            "google-site-verification=abc",
            "v=spf1 mx -all",
        ]
        assert answer(ns.host, ns.port, f"s1._domainkey.{DOMAIN}.", "TXT") == [key.txt_value()]

        r = run(poste_bin, "publish", *common, *dns_flags)
        assert r.returncode == 0, r.stderr
        assert all(x.startswith("unchanged: ") for x in r.stdout.splitlines()), r.stdout
        assert ns.log().count("DDNS, processing") == 1

        # a wrong secret: one clear line, nothing changed
        wrong = base64.b64encode(os.urandom(32)).decode()
        r = run(
            poste_bin,
            "publish",
            "--domain",
            DOMAIN,
            "--dmarc-policy",
            "reject",
            "--dns-server",
            ns.nameserver,
            "--dns-key",
            f"k.example.test:sha512:{wrong}",
        )
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1
        assert "p=quarantine" in answer(ns.host, ns.port, f"_dmarc.{DOMAIN}.", "TXT")[0]


@pytest.mark.parametrize(
    "spec, alg",
    [
        ("key.example.org:sha256:c2VjcmV0", "hmac-sha256."),
        ("key.example.org:SHA256:c2VjcmV0", "hmac-sha256."),
        ("key.example.org:hmac-sha384:c2VjcmV0", "hmac-sha384."),
        ("key.example.org:0:sha1:c2VjcmV0", "hmac-sha1."),  # ocaml-dns NAME:FLAGS:ALG:SECRET
    ],
)
def test_tsig_key_formats(spec: str, alg: str) -> None:
    key = parse_tsig(spec)
    assert key.name.to_text() == "key.example.org."
    assert key.algorithm.to_text() == alg
    assert key.secret == b"secret"


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("key.example.org:sha256", "NAME:ALGORITHM"),
        ("key.example.org:rot13:c2VjcmV0", "unknown TSIG algorithm"),
        ("key.example.org:sha256:not base64!", "not base64"),
    ],
)
def test_tsig_key_errors(spec: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_tsig(spec)
