"""ARC (RFC 8617) through two poste domains, judged by dkimpy's arc_verify and authheaders.

sender.test (SPF, DKIM, DMARC p=reject) writes to alice@fwd.test, whose
target is bob@two.test, whose target is carol@final.test:

    client --> verifier fwd.test --> relay fwd.test (seals i=1)
           --> verifier two.test --> relay two.test (seals i=2) --> final.test (a stand-in)

Every hop is a `poste verifier` or `poste relay` process; knot serves the
zones; the final mail is judged by validators that are not ours (dkimpy's
`arc_verify`, authheaders), by one written from the RFC for the tests
(support/arcref.py, no dkimpy in it) and by `poste arc verify`.
"""

from __future__ import annotations

import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import authheaders
import dkim
import pytest

from poste.dkim.sign import Signer, SigningKey
from support import arcref
from support.authkit import check, receiver, txt_func
from support.cli import run_poste
from support.dkimkit import dkim_zone_records, make_key
from support.knot import KnotServer, knot_server, simple_zone
from support.relay_env import Relay, header, make_users
from support.service import listening_ports, stop
from support.standin import StandIns

FINAL_IP = "127.0.0.23"
TWO_MX_IP = "127.0.0.22"


def _mail(key: SigningKey) -> bytes:
    body = (
        b"From: Sam <sam@sender.test>\r\nTo: alice@fwd.test\r\nSubject: forwarded twice\r\n"
        b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <arc-1@sender.test>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nHello through two forwarders.\r\n"
    )
    return Signer([key]).sign(body) + body


@dataclass
class World:
    ns: KnotServer
    tmp: Path
    sender_key: SigningKey
    verifier_port: int  # fwd.test's MX, on 127.0.0.1
    final: object  # the final.test stand-in (support.standin.StandIn)
    elsewhere_key: Path  # another sealer's key (selector old, published)


def _verifier(poste_bin: str, tmp: Path, name: str, host: str, dest: int, ns: str
              ) -> tuple[subprocess.Popen[bytes], int]:
    log = tmp / f"verifier-{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [poste_bin, "verifier", "--domain", name, "--listen", f"{host}:0",
             "--destination", f"127.0.0.1:{dest}", "--hostname", f"mx.{name}",
             "--nameserver", ns], stdout=out, stderr=subprocess.STDOUT)
    return proc, listening_ports(log, host, 1, proc)[0]


@pytest.fixture
def world(tmp_path: Path, poste_bin: str) -> Iterator[World]:
    for name in ("fwd.test", "two.test", "elsewhere.test"):
        (tmp_path / name).mkdir()
    e_path, e_key = make_key(tmp_path / "elsewhere.test", "rsa", "old")
    _, s_key = make_key(tmp_path, "rsa", "s1")
    f_path, f_key = make_key(tmp_path / "fwd.test", "rsa", "arc")
    t_path, t_key = make_key(tmp_path / "two.test", "rsa", "arc")
    spf = '@ TXT "v=spf1 ip4:127.0.0.1 -all"\n'
    dmarc = '_dmarc TXT "v=DMARC1; p=reject"\n'
    zones = {
        "sender.test": simple_zone("sender.test", spf + dmarc + dkim_zone_records([("s1", s_key)])),
        "fwd.test": simple_zone("fwd.test", "@ MX 10 mx.fwd.test.\nmx A 127.0.0.1\n" + spf
                                + dmarc + dkim_zone_records([("arc", f_key)])),
        "two.test": simple_zone("two.test", f"@ MX 10 mx.two.test.\nmx A {TWO_MX_IP}\n" + spf
                                + dmarc + dkim_zone_records([("arc", t_key)])),
        "final.test": simple_zone("final.test", f"@ MX 10 mx.final.test.\nmx A {FINAL_IP}\n"),
        "elsewhere.test": simple_zone("elsewhere.test", dkim_zone_records([("old", e_key)])),
    }
    procs: list[subprocess.Popen[bytes]] = []
    relays: list[Relay] = []
    with knot_server(tmp_path / "knot", zones) as ns, StandIns([FINAL_IP]) as mx:
        try:
            final = mx.start(FINAL_IP, tmp_path / "final")

            def relay(name: str, key: Path, targets: dict[str, list[str]], port: int) -> Relay:
                work = tmp_path / name
                make_users(poste_bin, work / "users", targets)
                r = Relay(poste_bin, work, ns.nameserver, port, "--dkim-selector", "arc",
                          "--dkim-key", str(key), "--arc-authserv-id", f"mx.{name}",
                          domain=name).start()
                relays.append(r)
                return r

            two = relay("two.test", t_path, {"bob": ["carol@final.test"]}, mx.port)
            proc, two_mx = _verifier(poste_bin, tmp_path, "two.test", TWO_MX_IP, two.port,
                                     ns.nameserver)
            procs.append(proc)
            fwd = relay("fwd.test", f_path, {"alice": ["bob@two.test"]}, two_mx)
            proc, fwd_mx = _verifier(poste_bin, tmp_path, "fwd.test", "127.0.0.1", fwd.port,
                                     ns.nameserver)
            procs.append(proc)
            yield World(ns, tmp_path, SigningKey("sender.test", "s1", s_key), fwd_mx, final,
                        e_path)
        finally:
            for p in procs:
                stop(p)
            for r in relays:
                r.stop()


def _send(world: World, mail: bytes) -> bytes:
    with smtplib.SMTP("127.0.0.1", world.verifier_port, timeout=30) as s:
        s.ehlo("out.sender.test")
        assert s.sendmail("sam@sender.test", ["alice@fwd.test"], mail) == {}
    [got] = world.final.wait(1)  # type: ignore[attr-defined]
    return got


def _instances(mail: bytes, name: str) -> list[str]:
    return [v.split(";")[0].strip() for v in header(mail, name)]


def test_two_forwards_give_a_chain_that_passes(world: World, tmp_path: Path) -> None:
    got = _send(world, _mail(world.sender_key))
    # two sets, newest on top, each field prepended only (the original header stays below)
    assert _instances(got, "ARC-Seal") == ["i=2", "i=1"]
    assert _instances(got, "ARC-Message-Signature") == ["i=2", "i=1"]
    assert _instances(got, "ARC-Authentication-Results") == ["i=2", "i=1"]
    seals = header(got, "ARC-Seal")
    assert "cv=pass" in seals[0] and "d=two.test" in seals[0]
    assert "cv=none" in seals[1] and "d=fwd.test" in seals[1]
    assert got.index(b"ARC-Seal: i=2") < got.index(b"ARC-Seal: i=1") < got.index(b"From: Sam")
    # i=1 carries fwd.test's verifier results: SPF, DKIM and DMARC of sender.test passed
    aar1 = header(got, "ARC-Authentication-Results")[1]
    assert "mx.fwd.test" in aar1 and "spf=pass" in aar1 and "dkim=pass" in aar1, aar1
    assert "dmarc=pass" in aar1 and "arc=none" in aar1, aar1
    # two.test's verifier found the chain of fwd.test valid, and said so in i=2
    ar_two = next(v for v in header(got, "Authentication-Results") if v.startswith("mx.two.test"))
    assert "arc=pass header.oldest-pass=0" in ar_two, ar_two
    assert "arc=pass" in header(got, "ARC-Authentication-Results")[0]

    # independent validators: dkimpy's arc_verify and authheaders
    txt = txt_func(world.ns.nameserver)
    cv, sets, why = dkim.arc_verify(got, dnsfunc=txt)
    assert cv == dkim.CV_Pass, why
    assert [s["instance"] for s in sets] == [2, 1] and all(s["as-valid"] for s in sets)
    ar = authheaders.authenticate_message(got, "mx.final.test", arc=True, dnsfunc=txt)
    assert "arc=pass" in ar and "dkim=pass" in ar and "dmarc=pass" in ar, ar
    # both are dkimpy (authheaders calls it); a validator written from RFC 8617 agrees
    assert arcref.validate(got, txt) == "pass"
    # and the original DKIM signature of sender.test survived both forwards
    report = check(receiver(world.ns.nameserver), FINAL_IP, "", "mx.two.test", got)
    assert report.arc is not None and report.arc.result == "pass"
    assert report.arc.instance == 2 and report.arc.domain == "two.test"
    assert "pass" in [r.result for r in report.dkim if r.domain == "sender.test"]

    path = tmp_path / "got.eml"
    path.write_bytes(got)
    r = run_poste(["arc", "verify", "--nameserver", world.ns.nameserver, str(path)])
    assert r.returncode == 0 and r.stdout == "pass i=2 d=two.test oldest-pass=0\n", r.stderr

    # tampered after sealing: the body, or a signed field
    for tampered in (got.replace(b"two forwarders.", b"two forwarders!"),
                     got.replace(b"Subject: forwarded twice", b"Subject: forwarded thrice")):
        cv, _, why = dkim.arc_verify(tampered, dnsfunc=txt)
        assert cv == dkim.CV_Fail, why
        assert arcref.validate(tampered, txt) == "fail"
        ar = authheaders.authenticate_message(tampered, "mx.final.test", arc=True, dnsfunc=txt)
        assert "arc=fail" in ar, ar
        report = check(receiver(world.ns.nameserver), FINAL_IP, "", "mx.two.test", tampered)
        assert report.arc is not None and report.arc.result == "fail", report.arc
        path.write_bytes(tampered)
        r = run_poste(["arc", "verify", "--nameserver", world.ns.nameserver, str(path)])
        assert r.returncode == 1 and r.stdout.startswith("fail i=2 d=two.test: ")


def test_a_broken_chain_is_reported_and_sealed_as_failed(world: World, tmp_path: Path) -> None:
    """A mail sealed once, then changed: the next verifier says arc=fail, the next seal cv=fail."""
    signed = _mail(world.sender_key)
    auth = (b"Authentication-Results: mx.elsewhere.test;\r\n\tdkim=pass header.d=sender.test;"
            b"\r\n\tarc=none\r\n")
    sealed = run_poste(["arc", "sign", "-d", "elsewhere.test", "-s", "old", "-k",
                        str(world.elsewhere_key), "--authserv-id", "mx.elsewhere.test", "-"],
                       input=auth + signed, text=False)
    assert sealed.returncode == 0, sealed.stderr
    assert sealed.stdout.startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=elsewhere.test")
    path = tmp_path / "sealed.eml"
    path.write_bytes(sealed.stdout)
    r = run_poste(["arc", "verify", "--nameserver", world.ns.nameserver, str(path)])
    assert r.returncode == 0 and r.stdout == "pass i=1 d=elsewhere.test oldest-pass=0\n"
    # changed in transit after elsewhere.test sealed it
    got = _send(world, sealed.stdout.replace(b"two forwarders.", b"two forwarders, changed."))
    ar_fwd = next(v for v in header(got, "Authentication-Results") if v.startswith("mx.fwd.test"))
    assert "arc=fail" in ar_fwd, ar_fwd
    seals = header(got, "ARC-Seal")
    assert "cv=fail" in seals[1] and "i=2" in seals[1] and "d=fwd.test" in seals[1]
    # a chain that failed stays failed: two.test says so and seals i=3 with cv=fail
    assert "i=3" in seals[0] and "cv=fail" in seals[0]
    cv, _, _ = dkim.arc_verify(got, dnsfunc=txt_func(world.ns.nameserver))
    assert cv != dkim.CV_Pass


def test_mail_without_our_results_is_forwarded_unsealed(world: World, tmp_path: Path) -> None:
    """`poste arc sign` refuses a mail without the authserv-id's results, in one line."""
    path = tmp_path / "plain.eml"
    path.write_bytes(_mail(world.sender_key))
    key_path, _ = make_key(tmp_path, "rsa", "k")
    r = run_poste(["arc", "sign", "-d", "x.test", "-s", "k", "-k", str(key_path),
                   "--authserv-id", "mx.x.test", str(path)])
    assert r.returncode == 1 and r.stderr.strip() == (
        "Error: cannot seal: no Authentication-Results of mx.x.test")
    ed_path, _ = make_key(tmp_path, "ed25519", "e")
    r = run_poste(["arc", "sign", "-d", "x.test", "-s", "e", "-k", str(ed_path),
                   "--authserv-id", "mx.x.test", str(path)])
    assert r.returncode == 2 and "rsa-sha256 only" in r.stderr and "Traceback" not in r.stderr


def test_dmarc_check_judges_a_file_as_the_verifier(world: World, tmp_path: Path) -> None:
    """`poste dmarc check FILE --ip --helo --sender`: the word, or the verifier's fields."""
    path = tmp_path / "m.eml"
    path.write_bytes(_mail(world.sender_key))
    ns = ["--nameserver", world.ns.nameserver]

    def dmarc(*args: str) -> str:
        r = run_poste(["dmarc", "check", str(path), *ns, *args])
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert dmarc("--ip", "127.0.0.1", "--helo", "out.sender.test",
                 "--sender", "sam@sender.test") == "pass\n"
    fields = dmarc("--ip", "192.0.2.1", "--helo", "out.sender.test", "--sender",
                   "sam@sender.test", "--header", "--receiver", "mx.test")
    assert fields.startswith("Received-SPF: fail (mx.test: ")
    assert "Authentication-Results: mx.test;" in fields and "spf=fail" in fields
    assert "dkim=pass header.d=sender.test" in fields and "arc=none" in fields
    assert "dmarc=pass (p=reject dis=none) header.from=sender.test" in fields  # DKIM aligns
    path.write_bytes(path.read_bytes().replace(b"two forwarders.", b"two forwarders!"))
    assert dmarc("--ip", "192.0.2.1", "--helo", "x.test", "--sender", "sam@sender.test") == (
        "fail\n")
    r = run_poste(["dmarc", "check", str(path), "--ip", "nope", "--helo", "h", "--sender", ""])
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "not an IP" in r.stderr


def test_malformed_mail_is_forwarded_unsealed(world: World) -> None:
    """A From that Python's parser rejects: no seal, the mail goes on as it came."""
    bad = (b"From: <\r\nTo: alice@fwd.test\r\nSubject: odd\r\nMessage-ID: <odd@sender.test>\r\n"
           b"\r\nStill delivered.\r\n")
    got = _send(world, bad)
    assert header(got, "ARC-Seal") == [] and got.endswith(bad)
    assert b"arc=none" in got  # both verifiers looked, and found no chain
