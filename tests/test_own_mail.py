"""Mail poste writes itself (DSNs) is DKIM-signed and aligned, so it passes DMARC at a receiver.

`poste relay --dkim-selector poste --dkim-key K` bounces a mail refused by
its destination; the DSN that reaches the sender's stand-in MX is judged as a
receiving provider would: SPF of our HELO name (a DSN is sent from `<>`),
DKIM and DMARC, by poste's verifier code, by authheaders (dkimpy), and by
Debian's opendkim-testmsg, with knot serving every zone.  Then the receiver
is a real MX: Postfix with the OpenDKIM and OpenDMARC milters (support/mta.py).
"""

from __future__ import annotations

import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path

import authheaders
import pytest

from support import mta, opendkim
from support.authkit import check, receiver, txt_func
from support.dkimkit import dkim_zone_records, make_key
from support.knot import KnotServer, knot_server, simple_zone
from support.postfix_behind import assert_ours_and_aligned, relay_before_postfix
from support.relay_env import Relay, header, make_users, mx_zones, return_path
from support.standin import StandIns

HOSTS = [f"127.0.0.{i}" for i in range(21, 30)]  # the stand-in MX hosts of relay_env.MX

pytestmark = pytest.mark.skipif(not opendkim.available(), reason="opendkim-testmsg missing")

RELAY_HELO = "relay.our.test"  # the relay's --hostname in support/relay_env.Relay
_MAIL = (b"From: Bob <bob@example.org>\r\nTo: dave@our.test\r\nSubject: refused\r\n"
         b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <refused@example.org>\r\n"
         b"\r\nHello.\r\n")


@pytest.fixture
def world(tmp_path: Path, poste_bin: str) -> Iterator[tuple[KnotServer, Path, StandIns]]:
    key_path, key = make_key(tmp_path, "rsa", "poste")
    ours = (
        "@ MX 10 mx.our.test.\nmx A 127.0.0.10\n"
        '@ TXT "v=spf1 mx -all"\n'
        # what `poste dns records --helo relay.our.test --ip 127.0.0.1` prints
        'relay TXT "v=spf1 ip4:127.0.0.1 -all"\n'
        '_dmarc TXT "v=DMARC1; p=reject; rua=mailto:postmaster@our.test"\n'
        + dkim_zone_records([("poste", key)])
    )
    zones = {**mx_zones(), "our.test": simple_zone("our.test", ours)}
    make_users(poste_bin, tmp_path / "users", {"dave": ["dave@refuse.test"]})
    with knot_server(tmp_path / "knot", zones, host=opendkim.port53_host(), port=53) as ns, \
            StandIns(HOSTS) as mx:
        yield ns, key_path, mx


def test_dsn_passes_dkim_and_dmarc_at_the_receiver(
    world: tuple[KnotServer, Path, StandIns], tmp_path: Path, poste_bin: str
) -> None:
    ns, key_path, mx = world
    from support.relay_env import MX

    mx.start(MX["refuse.test"], tmp_path / "mx" / "refuse.test",
             rcpt_reply="550 5.1.1 No such user here")
    example = mx.start(MX["example.org"], tmp_path / "mx" / "example.org")
    relay = Relay(poste_bin, tmp_path, ns.nameserver, mx.port,
                  "--dkim-selector", "poste", "--dkim-key", str(key_path)).start()
    try:
        with smtplib.SMTP(relay.host, relay.port, timeout=30) as s:
            assert s.sendmail("bob@example.org", ["dave@our.test"], _MAIL) == {}
        [dsn] = example.wait(1)
    finally:
        relay.stop()
    assert return_path(dsn) == ""
    assert header(dsn, "From") == ["Mail Delivery System <MAILER-DAEMON@our.test>"]
    assert "d=our.test" in header(dsn, "DKIM-Signature")[0]
    # what a receiver sees: the stand-in stores the mail as received (Return-Path and
    # Received on top), the relay connected from 127.0.0.1 with HELO relay.our.test
    report = check(receiver(ns.nameserver), "127.0.0.1", "", RELAY_HELO, dsn)
    assert report.spf is not None and report.spf.result == "pass", report.summary()
    assert [r.result for r in report.dkim] == ["pass"] and report.dkim[0].domain == "our.test"
    assert report.dmarc is not None and report.dmarc.result == "pass", report.summary()
    # an independent validator: authheaders (dkimpy's DKIM, its own DMARC)
    ar = authheaders.authenticate_message(dsn, "mx.example.org", dnsfunc=txt_func(ns.nameserver))
    assert "dkim=pass" in ar and "dmarc=pass" in ar and "header.from=our.test" in ar, ar
    # and libopendkim (opendkim-testmsg exits 0, silent, when every signature verifies)
    assert shutil.which(opendkim.TESTMSG) or Path(opendkim.TESTMSG).exists()
    ok = opendkim.testmsg(dsn, ns.host, tmp_path / "odk")
    assert ok.returncode == 0 and not ok.stdout and not ok.stderr, ok.stderr
    tampered = dsn.replace(b"Undelivered Mail Returned", b"Undelivered Mail Kept")
    assert opendkim.testmsg(tampered, ns.host, tmp_path / "odk2").returncode != 0


@pytest.mark.skipif(not mta.available(), reason="postfix, opendkim or opendmarc missing")
def test_dsn_passes_opendkim_and_opendmarc_at_a_postfix_mx(tmp_path: Path, poste_bin: str) -> None:
    """The receiver is a real provider's MX: Postfix with the OpenDKIM and OpenDMARC milters.

    dave@our.test forwards to a domain that takes no mail (null MX), so the
    relay bounces at once; its DSN goes to bob@example.org, whose MX is
    Postfix, and what OpenDKIM and OpenDMARC concluded reaches the stand-in
    behind it in their Authentication-Results.
    """
    make_users(poste_bin, tmp_path / "users", {"dave": ["dave@nullmx.test"]})
    with relay_before_postfix(tmp_path, poste_bin, {"nullmx.test": simple_zone("nullmx.test", "@ MX 0 .\n")}) as w:
        with smtplib.SMTP(w.relay.host, w.relay.port, timeout=30) as s:
            assert s.sendmail("bob@example.org", ["dave@our.test"], _MAIL) == {}
        dsn = w.wait_one()
    assert header(dsn, "From") == ["Mail Delivery System <MAILER-DAEMON@our.test>"]
    assert_ours_and_aligned(dsn)  # spf: libspf2's, in Postfix
