"""SPF on both identities (RFC 7208 2.3 HELO, 2.4 MAIL FROM) and what the fields say.

The Authenticator runs against a fake DNS server on loopback; the fields are
read the way a mail administrator reads them: which identity decided the
`Received-SPF:`, one `spf=` resinfo per identity in `Authentication-Results:`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from poste.services.verifier import spf
from poste.services.verifier.authenticate import Authenticator, Report
from poste.services.verifier.service import VerifierStage
from poste.smtp.message import Message
from poste.smtp.stage import Envelope
from support.fakedns import FakeDNS, fake_dns, records_lookup

IP_OK, IP_OTHER = "192.0.2.10", "192.0.2.11"

RECORDS: dict[str, list[tuple[str, str | bytes]]] = {
    "sender.test": [("TXT", f"v=spf1 ip4:{IP_OK} -all")],
    "_dmarc.sender.test": [("TXT", "v=DMARC1; p=reject")],
    "client.sender.test": [("TXT", f"v=spf1 ip4:{IP_OK} -all")],
    "bad.helo.test": [("TXT", "v=spf1 -all")],
    "open.helo.test": [("TXT", "v=spf1 +all")],
    "attacker.test": [("TXT", "v=spf1 +all")],
    "_dmarc.victim.test": [("TXT", "v=DMARC1; p=reject")],
}


@pytest.fixture
def dns() -> Iterator[FakeDNS]:
    with fake_dns(records_lookup(RECORDS)) as server:
        yield server


def auth(ns: FakeDNS) -> Authenticator:
    return Authenticator(spf.resolver_for([ns.nameserver], 2), "mx.our.test")


def message(from_addr: str = "someone@sender.test") -> Message:
    text = f"From: <{from_addr}>\r\nTo: <user@our.test>\r\nSubject: hi\r\n\r\nhello\r\n"
    return Message.of(text.encode())


def fields(a: Authenticator, report: Report) -> tuple[str, str]:
    """(Received-SPF value, Authentication-Results value), unfolded."""
    text = a.fields(report).decode()
    parts: dict[str, str] = {}
    last = ""
    for block in text.split("\r\n"):
        if block[:1] in (" ", "\t"):
            parts[last] += " " + block.strip()
        elif block:
            last, _, value = block.partition(": ")
            parts[last] = value
    return parts.get("Received-SPF", ""), parts["Authentication-Results"]


async def test_both_identities_pass_mailfrom_reported(dns: FakeDNS) -> None:
    a = auth(dns)
    report = await a.check(IP_OK, "someone@sender.test", "client.sender.test", message())
    rspf, ar = fields(a, report)
    assert rspf.startswith("pass (mx.our.test: domain of sender.test designates 192.0.2.10")
    assert "identity=mailfrom" in rspf
    assert "spf=pass smtp.mailfrom=someone@sender.test;" in ar
    assert "spf=pass smtp.helo=client.sender.test;" in ar
    assert "dmarc=pass" in ar


async def test_helo_fail_decides_even_when_mailfrom_passes(dns: FakeDNS) -> None:
    a = auth(dns)
    report = await a.check(IP_OK, "someone@sender.test", "bad.helo.test", message())
    rspf, ar = fields(a, report)
    assert rspf.startswith("fail (mx.our.test: helo bad.helo.test does not designate 192.0.2.10")
    assert "identity=helo" in rspf and "helo=bad.helo.test" in rspf
    assert 'envelope-from="someone@sender.test"' in rspf  # the reader still sees the sender
    assert "spf=pass smtp.mailfrom=someone@sender.test;" in ar
    assert "spf=fail smtp.helo=bad.helo.test;" in ar
    assert "dmarc=pass" in ar  # DMARC uses the MAIL FROM identity (RFC 7489 4.1)


async def test_mailfrom_fail_decides_when_helo_passes(dns: FakeDNS) -> None:
    a = auth(dns)
    report = await a.check(IP_OTHER, "someone@sender.test", "open.helo.test", message())
    rspf, ar = fields(a, report)
    assert rspf.startswith("fail (mx.our.test: domain of sender.test does not designate")
    assert "identity=mailfrom" in rspf
    assert "spf=fail smtp.mailfrom=someone@sender.test;" in ar
    assert "spf=pass smtp.helo=open.helo.test;" in ar


@pytest.mark.parametrize("helo", ["[192.0.2.10]", "[IPv6:2001:db8::1]", "localhost", "192.0.2.10"])
async def test_helo_that_is_not_a_name_is_not_checked(dns: FakeDNS, helo: str) -> None:
    a = auth(dns)
    report = await a.check(IP_OK, "someone@sender.test", helo, message())
    _, ar = fields(a, report)
    assert report.helo_spf is None
    assert ar.count("spf=") == 1 and "spf=pass smtp.mailfrom=" in ar
    assert all(name == "sender.test" or "sender.test" in name for name, _ in dns.queries)


async def test_null_sender_uses_helo_once(dns: FakeDNS) -> None:
    a = auth(dns)
    bounce = message("mailer-daemon@sender.test")
    report = await a.check(IP_OK, "", "client.sender.test", bounce)
    rspf, ar = fields(a, report)
    assert report.helo_spf is None and report.spf is not None
    assert rspf.startswith("pass ") and "identity=helo" in rspf and "envelope-from" not in rspf
    assert ar.count("spf=") == 1 and "spf=pass smtp.helo=client.sender.test;" in ar
    assert [q for q in dns.queries if q == ("client.sender.test", "TXT")] == [
        ("client.sender.test", "TXT")
    ]


async def test_sender_without_at_is_not_aligned_through_helo(dns: FakeDNS) -> None:
    """`MAIL FROM:<attacker.test>` + `HELO victim.test`: pyspf evaluates attacker.test.

    Reporting the HELO name as the SPF domain made attacker.test's pass count
    for victim.test in DMARC alignment, bypassing its p=reject.
    """
    a = auth(dns)
    report = await a.check(IP_OTHER, "attacker.test", "victim.test", message("ceo@victim.test"))
    assert report.spf is not None
    assert (report.spf.result, report.spf.domain) == ("pass", "attacker.test")
    assert report.dmarc is not None and report.dmarc.result == "fail"
    assert report.dmarc.wants_reject()


async def test_quoted_local_part_with_at_evaluates_the_real_domain(dns: FakeDNS) -> None:
    a = auth(dns)
    report = await a.check(IP_OK, '"a@b"@sender.test', "client.sender.test", message())
    assert report.spf is not None
    assert (report.spf.result, report.spf.domain) == ("pass", "sender.test")


async def test_reject_failures_refuses_helo_fail(dns: FakeDNS) -> None:
    env = Envelope(peer_ip=IP_OK, helo="bad.helo.test", mail_from="someone@sender.test")
    env.rcpt_tos.append("user@our.test")
    strict = VerifierStage(["our.test"], auth(dns), reject_failures=True)
    verdict = await strict.on_data(env, message())
    assert verdict.reply is not None and verdict.reply.code == 550
    assert verdict.reply.text.startswith("5.7.23 HELO bad.helo.test:")
    labelling = VerifierStage(["our.test"], auth(dns))
    verdict = await labelling.on_data(env, message())
    assert verdict.reply is None
    assert b"spf=fail smtp.helo=bad.helo.test" in verdict.prepend


@pytest.mark.parametrize(
    ("helo", "ok"),
    [
        ("mail.example.com", True),
        ("mail.example.com.", True),
        ("xn--bcher-kva.example", True),
        ("example", False),
        ("[192.0.2.1]", False),
        ("192.0.2.1", False),
        ("-bad.example.com", False),
        ("a..b", False),
        ("", False),
        ("under_score.example", False),
    ],
)
def test_helo_checkable(helo: str, ok: bool) -> None:
    assert spf.helo_checkable(helo) is ok


async def test_null_sender_with_address_literal_helo_is_none_without_dns(dns: FakeDNS) -> None:
    a = auth(dns)
    report = await a.check("::ffff:192.0.2.10", "", "[192.0.2.10]", message())
    rspf, ar = fields(a, report)
    assert report.spf is not None and report.spf.result == "none"
    assert rspf.startswith("none ") and "client-ip=192.0.2.10;" in rspf
    assert 'helo="[192.0.2.10]"' in rspf and "identity=helo" in rspf
    assert 'spf=none smtp.helo="[192.0.2.10]"' in ar
    assert not any("[" in name for name, _ in dns.queries)


async def test_a_mail_whose_answers_are_cached_is_checked_on_the_loop_alike() -> None:
    """The second mail of a sender: every lookup cached, so `check` runs on the loop
    (authenticate.py INLINE_BYTES) without a query, and reports what the pool did."""
    asked: list[tuple[str, int]] = []
    answer = records_lookup(RECORDS)

    def counting(qname: str, qtype: int):  # type: ignore[no-untyped-def]
        asked.append((qname, qtype))
        return answer(qname, qtype)

    with fake_dns(counting) as server:
        a = auth(server)
        first = await a.check(IP_OK, "someone@sender.test", "client.sender.test", message())
        assert a.checked_inline == 0 and asked  # nothing cached yet: in the pool
        seen = len(asked)
        second = await a.check(IP_OK, "someone@sender.test", "client.sender.test", message())
        assert a.checked_inline == 1 and len(asked) == seen
        assert fields(a, second) == fields(a, first) and second.summary() == first.summary()
        # another sender's domain is not cached: the loop's try is dropped, the pool asks
        other = await a.check(IP_OTHER, "x@attacker.test", "victim.test",
                              message("ceo@victim.test"))
        assert a.checked_inline == 1 and len(asked) > seen
        assert "spf=pass smtp.mailfrom=x@attacker.test" in fields(a, other)[1]
