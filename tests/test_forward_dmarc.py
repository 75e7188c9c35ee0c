"""DMARC-aware forwarding (issue 12, item 3), judged by a real receiving MX.

sender.test (SPF, DKIM s1, DMARC p=reject) writes to alice@our.test, whose
target is dave@example.org; example.org's MX is Postfix with the OpenDKIM
and OpenDMARC milters (support/mta.py), delivering to a stand-in behind it:

    client --> poste verifier our.test --> poste relay our.test --> Postfix MX --> stand-in

A mail whose DKIM signature broke in transit (signed, then its body altered
before it reaches us) would fail DMARC at example.org once forwarded: the
relay rewrites its From to a fwd+ address of ours, signs it, and OpenDMARC
passes it for our.test; a reply to that address, sent to our MX, reaches
the author's stand-in MX.  The same mail with its signature intact goes on
unchanged, byte for byte below the fields the hops prepend.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from poste.dkim.sign import Signer, SigningKey
from support import mta, opendkim
from support.dkimkit import dkim_zone_records, make_key
from support.knot import knot_server, simple_zone
from support.loop_world import metrics, sample
from support.net import free_port, wait_port
from support.relay_env import Relay, header, make_users, return_path
from support.service import listening_ports, stop
from support.standin import StandIn, StandIns

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not mta.available(), reason="postfix, opendkim or opendmarc missing"),
]

PFX_IP, BEHIND_IP, SENDER_MX_IP = "127.0.0.31", "127.0.0.32", "127.0.0.33"
BODY = b"Hello, this text is signed.\r\n"


@dataclass
class World:
    verifier_port: int
    behind: StandIn  # what the Postfix MX of example.org delivered
    sender_mx: StandIn  # sender.test's MX: where replies to the author arrive
    sender_key: SigningKey
    maillog: Path
    relay_log: Path  # the relay's log (`poste up`'s, which has everyone's)
    metrics: str  # the relay's --metrics address


@pytest.fixture(params=["separate", "up"])
def world(request: pytest.FixtureRequest, tmp_path: Path, poste_bin: str) -> Iterator[World]:
    """The forwarder as `poste verifier` + `poste relay` processes, or as one `poste up`."""
    _, s_key = make_key(tmp_path, "rsa", "s1")
    key_path, our_key = make_key(tmp_path, "rsa", "poste")
    spf = '@ TXT "v=spf1 ip4:127.0.0.1 -all"\n'
    zones = {
        "sender.test": simple_zone("sender.test", (
            f"@ MX 10 mx.sender.test.\nmx A {SENDER_MX_IP}\n" + spf
            + '_dmarc TXT "v=DMARC1; p=reject"\n' + dkim_zone_records([("s1", s_key)]))),
        "our.test": simple_zone("our.test", (
            "@ MX 10 mx.our.test.\nmx A 127.0.0.1\n" + spf
            + 'relay TXT "v=spf1 ip4:127.0.0.1 -all"\n'  # the relay's HELO name
            + '_dmarc TXT "v=DMARC1; p=reject"\n' + dkim_zone_records([("poste", our_key)]))),
        "example.org": simple_zone("example.org", f"@ MX 10 mx.example.org.\nmx A {PFX_IP}\n"),
    }
    make_users(poste_bin, tmp_path / "users", {"alice": ["dave@example.org"]})
    metrics_addr = f"127.0.0.1:{free_port('127.0.0.1')}"
    # one port for every MX the relay delivers to (its --smtp-port): Postfix and a stand-in
    with knot_server(tmp_path / "knot", zones, host=opendkim.port53_host(), port=53) as ns, \
            StandIns([BEHIND_IP, SENDER_MX_IP, PFX_IP]) as mx:
        behind = mx.start(BEHIND_IP, tmp_path / "behind")
        sender_mx = mx.start(SENDER_MX_IP, tmp_path / "sender-mx")
        mx.release(PFX_IP)
        with mta.receiving_mta(tmp_path / "pfx", "example.org", PFX_IP, mx.port,
                               (BEHIND_IP, mx.port), ns.host) as maillog:
            if request.param == "up":
                with _up(poste_bin, tmp_path, ns.nameserver, mx.port, key_path,
                         metrics_addr) as (port, log):
                    yield World(port, behind, sender_mx, SigningKey("sender.test", "s1", s_key),
                                maillog, log, metrics_addr)
                return
            relay = Relay(poste_bin, tmp_path, ns.nameserver, mx.port,
                          "--dkim-selector", "poste", "--dkim-key", str(key_path),
                          "--arc-authserv-id", "mx.our.test", "--metrics", metrics_addr).start()
            log = tmp_path / "verifier.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [poste_bin, "verifier", "--domain", "our.test", "--listen", "127.0.0.1:0",
                     "--destination", f"127.0.0.1:{relay.port}", "--hostname", "mx.our.test",
                     "--nameserver", ns.nameserver], stdout=out, stderr=subprocess.STDOUT)
            try:
                port = listening_ports(log, "127.0.0.1", 1, proc)[0]
                yield World(port, behind, sender_mx, SigningKey("sender.test", "s1", s_key),
                            maillog, relay.log_path, metrics_addr)
            finally:
                stop(proc)
                relay.stop()


@contextlib.contextmanager
def _up(poste_bin: str, tmp: Path, nameserver: str, smtp_port: int, key: Path,
        metrics_addr: str) -> Iterator[tuple[int, Path]]:
    """verifier -> spamfilter -> relay in one `poste up` (no sending path)."""
    port = free_port("127.0.0.1")
    config = tmp / "poste.toml"
    config.write_text(f"""
domain = ["our.test"]
postmaster = "admin@example.org"
users = "{tmp / 'users'}"
nameserver = ["{nameserver}"]
metrics = "{metrics_addr}"

[verifier]
listen = "127.0.0.1:{port}"
hostname = "mx.our.test"

[spamfilter]
hostname = "spamfilter.our.test"

[relay]
spool = "{tmp / 'spool'}"
hostname = "relay.our.test"
smtp-port = {smtp_port}
no-ipv6 = true
dkim-selector = ["poste"]
dkim-key = ["{key}"]

[submission]
enabled = false

[signer]
enabled = false
""")
    log = tmp / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([poste_bin, "up", "--config", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_port("127.0.0.1", port, timeout=30)
        except TimeoutError:
            raise AssertionError(log.read_text()) from None
        yield port, log
    finally:
        stop(proc)


def _mail(world: World, n: int, *, broken: bool, extra: bytes = b"") -> bytes:
    head = (b"From: Sam Sender <sam@sender.test>\r\nTo: alice@our.test\r\n"
            b"Subject: forwarded\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            b"Message-ID: <fwd-%d@sender.test>\r\n" % n + extra
            + b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
    signed = Signer([world.sender_key]).sign(head + BODY) + head + BODY
    # a list footer added on the way, after the author signed: the signature breaks
    return signed + b"-- \r\nadded in transit\r\n" if broken else signed


def _send(world: World, sender: str, rcpt: str, mail: bytes, n: int = 1) -> list[bytes]:
    box = world.behind if rcpt.startswith("alice@") else world.sender_mx
    before = len(box.mails())
    with smtplib.SMTP("127.0.0.1", world.verifier_port, timeout=30) as s:
        s.ehlo("out.sender.test")
        assert s.sendmail(sender, [rcpt], mail) == {}
    try:
        return box.wait(before + n)[before:]
    except TimeoutError:
        raise AssertionError(world.maillog.read_text(errors="replace")[-3000:]
                             + world.relay_log.read_text()[-3000:]) from None


def _results(mail: bytes) -> str:
    """What the Postfix MX's milters concluded (authserv-id mx.example.org)."""
    return " ".join(v for v in header(mail, "Authentication-Results")
                    if v.startswith("mx.example.org"))


def test_broken_dkim_from_a_reject_domain_is_rewritten_and_passes(world: World) -> None:
    sent = _mail(world, 1, broken=True)
    [got] = _send(world, "sam@sender.test", "alice@our.test", sent)
    [from_] = header(got, "From")
    m = re.fullmatch(r'"Sam Sender via our\.test" <(fwd\+[^>]+@our\.test)>', from_)
    assert m, from_
    assert header(got, "Reply-To") == ["Sam Sender <sam@sender.test>"]
    assert header(got, "X-Forwarded-To") == ["dave@example.org"]
    assert header(got, "X-Forwarded-For") == ["alice@our.test dave@example.org"]
    assert return_path(got).startswith("SRS0=") and return_path(got).endswith("@our.test")
    # the body and the other fields as the author wrote them
    assert got.endswith(b"\r\n\r\n" + BODY + b"-- \r\nadded in transit\r\n")
    assert header(got, "Subject") == ["forwarded"]
    results = _results(got)
    assert "dkim=pass" in results and "header.d=our.test" in results, results
    assert "dmarc=pass (p=reject dis=none) header.from=our.test" in results, results
    log = world.relay_log.read_text()
    assert "forward plan=rewrite reason=no-aligned-dkim author-domain=sender.test " \
           "policy=reject" in log, log
    assert sample(metrics(world.metrics), "poste_forward_plans_total", plan="rewrite",
                  reason="no-aligned-dkim") == 1

    # dave replies: to the rewritten From, at our MX; it reaches Sam
    reply = (f"From: dave@example.org\r\nTo: {m.group(1)}\r\nSubject: Re: forwarded\r\n"
             "Message-ID: <re-1@example.org>\r\n\r\nThanks!\r\n").encode()
    [back] = _send(world, "dave@example.org", m.group(1), reply)
    assert header(back, "Delivered-To") == ["sam@sender.test"]
    assert back.endswith(reply)

    # a forged or altered token is refused at RCPT
    forged = m.group(1).replace("fwd+", "fwd+A", 1)
    with smtplib.SMTP("127.0.0.1", world.verifier_port, timeout=30) as s:
        s.ehlo("out.example.org")
        s.mail("dave@example.org")
        code, text = s.rcpt(forged)
    assert code == 550 and b"Invalid forwarding address" in text, (code, text)


def test_intact_dkim_is_forwarded_unchanged(world: World) -> None:
    sent = _mail(world, 2, broken=False)
    [got] = _send(world, "sam@sender.test", "alice@our.test", sent)
    # byte for byte below the fields the hops prepended
    assert got.endswith(sent)
    top = got[: len(got) - len(sent)]
    names = {line.split(b":", 1)[0].lower() for line in top.split(b"\r\n")
             if line and line[:1] not in (b" ", b"\t")}
    assert names <= {b"return-path", b"delivered-to", b"received", b"authentication-results",
                     b"received-spf", b"arc-seal", b"arc-message-signature",
                     b"arc-authentication-results", b"x-forwarded-to", b"x-forwarded-for",
                     b"x-spamtacus"}, names
    assert header(got, "From") == ["Sam Sender <sam@sender.test>"]
    assert header(got, "X-Forwarded-To") == ["dave@example.org"]
    results = _results(got)
    assert "dmarc=pass (p=reject dis=none) header.from=sender.test" in results, results
    assert "forward plan=unchanged reason=aligned-dkim author-domain=sender.test " \
           "policy=reject" in world.relay_log.read_text()
    assert sample(metrics(world.metrics), "poste_forward_plans_total", plan="unchanged",
                  reason="aligned-dkim") == 1


def test_an_own_reply_to_is_kept(world: World) -> None:
    sent = _mail(world, 3, broken=True, extra=b"Reply-To: <list@sender.test>\r\n")
    [got] = _send(world, "sam@sender.test", "alice@our.test", sent)
    assert header(got, "From")[0].startswith('"Sam Sender via our.test" <fwd+')
    assert header(got, "Reply-To") == ["<list@sender.test>"]
    assert header(got, "X-Original-From") == ["Sam Sender <sam@sender.test>"]
    assert "dmarc=pass" in _results(got)
