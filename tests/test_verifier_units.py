"""The verifier's pieces on their own: recipients, DMARC alignment, the fields' syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

from poste.dkim.verify import DKIMResult
from poste.services.verifier import dmarc
from poste.services.verifier.authenticate import Authenticator
from poste.services.verifier.results import authentication_results
from poste.services.verifier.service import VerifierStage
from poste.services.verifier.spf import SPFResult, resolver_for
from poste.smtp.message import Message
from poste.smtp.stage import Envelope


def stage() -> VerifierStage:
    auth = Authenticator(resolver_for(["127.0.0.1:9"], 0.5), "mx.our.test")
    return VerifierStage(["our.test", "Other.Test."], auth, postmaster="hostmaster@our.test")


@pytest.mark.parametrize(
    ("rcpt", "accepted"),
    [
        ("user@our.test", True),
        ("User@OUR.TEST", True),
        ("x@other.test", True),
        ("postmaster@our.test", True),
        ("Postmaster", True),  # RFC 5321 4.5.1: without a domain too
        ("hostmaster@our.test", True),
        ("someone@elsewhere.test", False),
        ("postmaster@elsewhere.test", False),
        ("user@sub.our.test", False),
        ("user@our.test.evil.test", False),
        ("user", False),
        ("user@our.test@elsewhere.test", False),
    ],
)
async def test_recipients(rcpt: str, accepted: bool) -> None:
    reply = await stage().on_rcpt(Envelope(), rcpt)
    if accepted:
        assert reply is None
    else:
        assert reply is not None and reply.code == 550 and reply.text.startswith("5.7.1")


async def test_null_sender_accepted() -> None:
    assert await stage().on_mail(Envelope(), "") is None


def test_org_domain_and_alignment() -> None:
    assert dmarc.org_domain("mail.example.co.uk") == "example.co.uk"
    assert dmarc.org_domain("a.b.sender.test") == "sender.test"
    assert dmarc.aligned("bounce.example.com", "example.com", "r")
    assert not dmarc.aligned("bounce.example.com", "example.com", "s")
    assert not dmarc.aligned("example.co.uk", "other.co.uk", "r")
    assert not dmarc.aligned("", "example.com", "r")


def test_psl_file(tmp_path: Path) -> None:
    from publicsuffixlist import PSLFILE

    psl = dmarc.load_psl(PSLFILE)  # the packaged file itself is a valid --psl
    assert dmarc.org_domain("mail.example.co.uk", psl) == "example.co.uk"
    fresh = tmp_path / "psl.dat"
    fresh.write_text("// ===BEGIN ICANN DOMAINS===\nuk\nco.uk\nnewsuffix.example\n")
    psl = dmarc.load_psl(fresh)
    assert dmarc.org_domain("a.b.newsuffix.example", psl) == "b.newsuffix.example"
    assert dmarc.org_domain("a.b.newsuffix.example") == "newsuffix.example"  # packaged list
    assert not dmarc.aligned("a.newsuffix.example", "b.newsuffix.example", "r", psl)
    assert dmarc.aligned("a.newsuffix.example", "b.newsuffix.example", "r")
    for bad in ("", "just some text\n", "// ===BEGIN ICANN DOMAINS===\n// nothing\n"):
        fresh.write_text(bad)
        with pytest.raises(dmarc.PSLError, match="does not look like"):
            dmarc.load_psl(fresh)
    fresh.write_bytes(b"\xff\xfe")
    with pytest.raises(dmarc.PSLError, match="not UTF-8"):
        dmarc.load_psl(fresh)
    with pytest.raises(dmarc.PSLError, match="cannot read"):
        dmarc.load_psl(tmp_path / "missing.dat")


def test_dmarc_record_parsing() -> None:
    pol = dmarc.parse_record("v=DMARC1; p=reject; sp=none; adkim=s; pct=50")
    assert pol is not None and (pol.p, pol.sp, pol.adkim, pol.aspf, pol.pct) == (
        "reject",
        "none",
        "s",
        "r",
        50,
    )
    assert dmarc.parse_record("v=DMARC1; p=bogus") is None
    rua_only = dmarc.parse_record("v=DMARC1; rua=mailto:a@b.test")
    assert rua_only is not None and rua_only.p == "none"
    assert dmarc.parse_record("v=spf1 -all") is None


@pytest.mark.parametrize(
    ("message", "domain"),
    [
        (b"From: A <a@Example.COM>\r\n\r\nx", "example.com"),
        (b"From: a@x.test, b@y.test\r\n\r\nx", None),
        (b"From: a@x.test\r\nFrom: b@x.test\r\n\r\nx", None),
        (b"Subject: no from\r\n\r\nx", None),
        (b"From: <\r\n\r\nx", None),
        (b"From: undisclosed\r\n\r\nx", None),
    ],
)
def test_from_domain(message: bytes, domain: str | None) -> None:
    assert dmarc.from_domain(message)[0] == domain


def spf_result(**kw: str) -> SPFResult:
    base = dict(
        result="pass",
        identity="mailfrom",
        domain="sender.test",
        client_ip="192.0.2.1",
        sender="a@sender.test",
        helo="mail.sender.test",
    )
    base.update(kw)
    return SPFResult(**base)  # type: ignore[arg-type]


def test_received_spf_quotes_what_is_not_a_dot_atom() -> None:
    field = spf_result(sender='we"ird(x)@sender.test', helo="[192.0.2.1]").field("mx.our.test")
    head, _, tail = field.partition("\r\n\t")
    assert head.startswith("Received-SPF: pass (mx.our.test: domain of sender.test designates")
    assert tail == (
        'client-ip=192.0.2.1; envelope-from="we\\"ird(x)@sender.test"; helo="[192.0.2.1]"; '
        "receiver=mx.our.test; identity=mailfrom"
    )
    helo = spf_result(identity="helo", domain="mail.sender.test", sender="", result="none")
    text = helo.field("mx.our.test")
    assert "envelope-from" not in text and "identity=helo" in text


def test_authentication_results_syntax() -> None:
    dk = [
        DKIMResult("pass", "sender.test", "s1", "abcdefghijklmnop"),
        DKIMResult("fail", "other.test", "s2", "zzzzzzzzzzzzzzzz", reason="body hash (bad)"),
    ]
    pol = dmarc.Policy(p="reject")
    field = authentication_results(
        "mx.our.test",
        spf_result(sender="a b@sender.test"),
        dk,
        dmarc.DMARCResult("pass", "sender.test", pol),
    )
    assert field == (
        "Authentication-Results: mx.our.test;\r\n"
        "\tspf=pass smtp.mailfrom=sender.test;\r\n"
        "\tdkim=pass header.d=sender.test header.s=s1 header.b=abcdefghijkl;\r\n"
        "\tdkim=fail (body hash \\(bad\\)) header.d=other.test header.s=s2 header.b=zzzzzzzzzzzz;\r\n"
        "\tdmarc=pass (p=reject dis=none) header.from=sender.test"
    )
    assert "dkim=none" in authentication_results("h", None, [], None)


def test_arc_resinfo_and_the_seal_reading_it() -> None:
    """arc= as RFC 8617 shows it, readable by authres (dkimpy's sealer takes cv= from it)."""
    import authres

    from poste.dkim.arc import ARCResult

    def field(arc: ARCResult, ip: str = "192.0.2.7") -> str:
        return authentication_results("mx.our.test", None, [], None, arc=arc, remote_ip=ip)

    passed = field(ARCResult("pass", 2, 0, "fwd.test"))
    assert "\tarc=pass header.oldest-pass=0 smtp.remote-ip=192.0.2.7" in passed
    failed = field(ARCResult("fail", 1, None, "fwd.test", "ARC-Seal[1] did not validate"))
    assert "\tarc=fail (ARC-Seal[1] did not validate) smtp.remote-ip=192.0.2.7" in failed
    assert field(ARCResult("none")).endswith("\tarc=none")
    assert '"2001:db8::1"' in field(ARCResult("pass", 1, 0), "2001:db8::1")
    for text in (passed, failed, field(ARCResult("none"))):
        parsed = authres.AuthenticationResultsHeader.parse(text.replace("\r\n", ""))
        [arc] = [r for r in parsed.results if r.method == "arc"]
        assert arc.result in ("pass", "fail", "none")


async def test_concurrent_spf_checks_use_their_own_nameservers() -> None:
    """pyspf's DNS hook is global; each evaluation must still ask its own servers."""
    import asyncio

    from poste.services.verifier import spf
    from support.fakedns import fake_dns, records_lookup

    allow = records_lookup({"x.test": [("TXT", "v=spf1 ip4:192.0.2.1 -all")]})
    deny = records_lookup({"x.test": [("TXT", "v=spf1 -all")]}, delays={"x.test": 0.05})
    with fake_dns(allow) as a, fake_dns(deny) as b:
        ra, rb = spf.resolver_for([a.nameserver], 2), spf.resolver_for([b.nameserver], 2)
        ra.cache = rb.cache = None
        jobs = [
            spf.check("192.0.2.1", "u@x.test", "h.test", ra if i % 2 else rb) for i in range(40)
        ]
        results = await asyncio.gather(*jobs)
    assert [r.result for r in results] == ["fail", "pass"] * 20


def test_ed25519_and_rsa_signatures_and_missing_key() -> None:
    """dkim=pass for ed25519-sha256 too; a signature whose key is absent is permerror."""
    import base64

    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from poste.dkim import verify as dkim_verify
    from poste.services.verifier import spf
    from support.fakedns import fake_dns, records_lookup

    priv = ed25519.Ed25519PrivateKey.generate()
    raw = priv.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pub = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    record = f"v=DKIM1; k=ed25519; p={base64.b64encode(pub).decode()}"
    msg = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: ed\r\n\r\nhello\r\n"

    def signed(selector: bytes) -> bytes:
        field = dkim.sign(
            msg,
            selector,
            b"x.test",
            base64.b64encode(raw),
            signature_algorithm=b"ed25519-sha256",
            include_headers=[b"from", b"subject"],
            linesep=b"\r\n",
        )
        return bytes(field)

    both = signed(b"gone") + signed(b"ed") + msg
    with fake_dns(records_lookup({"ed._domainkey.x.test": [("TXT", record)]})) as ns:
        results = dkim_verify.verify(both, spf.resolver_for([ns.nameserver], 2))
    assert [(r.result, r.selector) for r in results] == [("permerror", "gone"), ("pass", "ed")]
    assert results[0].reason == "no key for signature"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--nameserver", "not-an-ip"], "--nameserver"),
        (["--postmaster", "nobody"], "--postmaster"),
        (["--require-tls"], "--require-tls"),
        (["--listen", "127.0.0.1:99999"], "port"),
        (["--psl", "/nonexistent/public_suffix_list.dat"], "--psl"),
        (["--psl", "/etc/hostname"], "does not look like public_suffix_list.dat"),
    ],
)
def test_bad_flags_are_one_line(extra: list[str], needle: str) -> None:
    from support.cli import run_poste  # poste.cli.main in this process

    r = run_poste(["verifier", "--domain", "our.test", "--destination", "127.0.0.1:1", *extra])
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and needle in r.stderr


def test_dkim_key_record_problems_are_permerror_not_fail() -> None:
    """A broken key record is the signer's DNS mistake (permerror), not a forged mail (fail).

    And a selector with a stray TXT beside the key still verifies.
    """
    import base64

    import dkim

    from poste.dkim import verify as dkim_verify
    from poste.services.verifier import spf
    from support.dkimkit import rsa_pem_der
    from support.fakedns import fake_dns, records_lookup

    pem, der = rsa_pem_der(2048)
    pub = base64.b64encode(der).decode()

    def txt(text: str) -> list[bytes]:
        raw = text.encode()
        return [raw[i : i + 200] for i in range(0, len(raw), 200)]

    records: dict[str, list[tuple[str, str | bytes | list[bytes]]]] = {
        "good._domainkey.x.test": [("TXT", txt(f"v=DKIM1; k=rsa; p={pub}"))],
        "badv._domainkey.x.test": [("TXT", txt(f"v=DKIM2; k=rsa; p={pub}"))],
        "badk._domainkey.x.test": [("TXT", txt(f"v=DKIM1; k=foo; p={pub}"))],
        "revoked._domainkey.x.test": [("TXT", "v=DKIM1; k=rsa; p=")],
        "junk._domainkey.x.test": [("TXT", "hello world")],
        "two._domainkey.x.test": [
            ("TXT", "google-site-verification=abc"),
            ("TXT", txt(f"v=DKIM1; k=rsa; p={pub}")),
        ],
    }
    msg = b"From: a@x.test\r\nTo: b@y.test\r\nSubject: s\r\n\r\nhello\r\n"

    def signed(selector: str) -> bytes:
        field = dkim.sign(
            msg, selector.encode(), b"x.test", pem, include_headers=[b"from", b"subject"],
            linesep=b"\r\n",
        )
        return bytes(field) + msg

    with fake_dns(records_lookup(records)) as ns:  # type: ignore[arg-type]
        resolver = spf.resolver_for([ns.nameserver], 2)
        got = {
            sel: dkim_verify.verify(signed(sel), resolver)[0]
            for sel in ("good", "badv", "badk", "revoked", "junk", "two")
        }
        forged = signed("good").replace(b"Subject: s", b"Subject: t")
        tampered = dkim_verify.verify(forged, resolver)[0]
    assert {sel: r.result for sel, r in got.items()} == {
        "good": "pass",
        "badv": "permerror",
        "badk": "permerror",
        "revoked": "permerror",
        "junk": "permerror",
        "two": "pass",
    }
    assert got["revoked"].reason == "key revoked (empty p=)"
    assert tampered.result == "fail"  # a usable key and a signature that does not match


async def test_results_counted_once_standalone_and_under_poste_up() -> None:
    """The verifier's stage feeds poste_auth_results itself, once per mail.

    `poste up` builds this same stage with the same builder (nothing meters it
    from outside); tests/test_stack_metrics.py checks the counts through it.
    """
    from prometheus_client import REGISTRY

    from poste.services.verifier.service import build_stage
    from support.fakedns import fake_dns, records_lookup

    def count() -> float:
        labels = {"method": "spf", "result": "pass"}
        return REGISTRY.get_sample_value("poste_auth_results_total", labels) or 0.0

    records = {"x.test": [("TXT", "v=spf1 ip4:192.0.2.1 -all")]}
    msg = b"From: <a@x.test>\r\n\r\nhi\r\n"
    with fake_dns(records_lookup(records)) as ns:  # type: ignore[arg-type]
        stage = build_stage(["our.test"], nameservers=[ns.nameserver], dns_timeout=2,
                            hostname="mx.our.test")
        for _ in range(2):  # each mail once
            env = Envelope(peer_ip="192.0.2.1", helo="[192.0.2.1]", mail_from="a@x.test")
            before = count()
            verdict = await stage.on_data(env, Message.of(msg))
            assert b"spf=pass" in verdict.prepend
            assert count() - before == 1.0


@pytest.mark.parametrize("timeout", ["0", "-1"])
def test_spf_check_timeout_must_be_positive(poste_bin: str, timeout: str) -> None:
    import subprocess

    cmd = [poste_bin, "spf", "check", "--ip", "192.0.2.1", "--sender", "a@x.test"]
    r = subprocess.run([*cmd, "--timeout", timeout], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "--timeout must be positive" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
