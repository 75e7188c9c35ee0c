"""The forwarding plan's parts: the fwd+ reply token and the decision per mail.

The end-to-end proof (Postfix, OpenDKIM, OpenDMARC judging what we forward)
is tests/test_forward_dmarc.py; here each rule of the decision on its own.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from poste.dns.dmarc import DNSTrouble, Policy
from poste.services.relay.from_rewrite import author_of, decide, dkim_results
from poste.services.relay.fwd_token import FwdTokens, is_fwd
from poste.services.relay.srs import DAY, SRS, SRSDatabase, SRSError

NOW = time.time()


def tokens(secret: bytes = b"s3cret", db: SRSDatabase | None = None) -> FwdTokens:
    return FwdTokens(SRS("our.test", [secret], db=db))


def test_token_maps_back_to_the_author() -> None:
    t = tokens()
    address = t.address("alice@example.org", now=NOW)
    assert address.startswith("fwd+") and address.endswith("@our.test") and is_fwd(address)
    assert len(address.rpartition("@")[0]) <= 64
    assert t.author(address, now=NOW) == "alice@example.org"
    assert not is_fwd("fwd+news@our.test")  # a user `fwd`'s subaddress, not a token
    # a folded case on the way still verifies
    assert t.author(address.upper().replace("OUR.TEST", "our.test"), now=NOW).lower() == (
        "alice@example.org")
    # a relay sharing the secret can route the reply; another cannot
    assert tokens().author(address, now=NOW) == "alice@example.org"
    with pytest.raises(SRSError):
        tokens(b"other").author(address, now=NOW)


@pytest.mark.parametrize("change", [
    lambda a: a.replace("example.org", "evil.test"),  # another author
    lambda a: a.replace("alice@", "mallory@"),
    lambda a: a.replace("fwd+", "fwd+X", 1),  # the hash
    lambda a: a.replace("@our.test", "@other.test"),
    lambda a: "fwd+nothing@our.test",
])
def test_tampered_tokens_are_refused(change) -> None:  # type: ignore[no-untyped-def]
    t = tokens()
    with pytest.raises(SRSError):
        t.author(change(t.address("alice@example.org", now=NOW)), now=NOW)


def test_tokens_expire_and_are_not_srs() -> None:
    t = tokens()
    address = t.address("alice@example.org", now=NOW - 100 * DAY)
    with pytest.raises(SRSError, match="expired"):
        t.author(address, now=NOW)
    # an SRS address of the same author is no token (separate HMAC kinds)
    srs = SRS("our.test", [b"s3cret"]).forward("alice@example.org", now=NOW)
    with pytest.raises(SRSError):
        t.author("fwd+" + srs.split("=", 1)[1], now=NOW)


def test_a_long_author_uses_the_database(tmp_path: Path) -> None:
    t = tokens(db=SRSDatabase(tmp_path / "db"))
    author = "a.very.long.local.part.of.someone@a-long-subdomain.of.some-organisation.example"
    address = t.address(author, now=NOW)
    assert len(address.rpartition("@")[0]) <= 64
    assert t.author(address, now=NOW) == author


HEADER = (b"Authentication-Results: mx.our.test;\r\n spf=pass smtp.mailfrom=sam@sender.test;\r\n"
          b" dkim=%s (a reason; with a semicolon) header.d=%s header.s=s1\r\n"
          b"From: Sam <sam@%s>\r\nSubject: x\r\n\r\n")


def header(result: str = "fail", d: str = "sender.test", author: str = "sender.test") -> bytes:
    return HEADER % (result.encode(), d.encode(), author.encode())


REJECT = Policy(p="reject")


def plan(head: bytes, policy: Policy | None = REJECT, **kw: object) -> tuple[str, str]:
    def policy_of(domain: str) -> Policy | None:
        if isinstance(policy, Exception):
            raise policy
        return policy

    got = decide(head, server="mx.our.test", is_local=lambda d: d == "our.test",
                 policy_of=policy_of, **kw)  # type: ignore[arg-type]
    return got.plan, got.reason


def test_the_decision() -> None:
    assert plan(header("fail")) == ("rewrite", "no-aligned-dkim")
    assert plan(header("pass")) == ("unchanged", "aligned-dkim")
    assert plan(header("pass", d="mail.sender.test")) == ("unchanged", "aligned-dkim")  # relaxed
    assert plan(header("pass", d="mail.sender.test"), Policy(p="reject", adkim="s")) == (
        "rewrite", "no-aligned-dkim")
    assert plan(header("pass", d="other.test")) == ("rewrite", "no-aligned-dkim")
    assert plan(header("fail"), Policy(p="quarantine")) == ("rewrite", "no-aligned-dkim")
    assert plan(header("fail"), Policy(p="none")) == ("unchanged", "policy-none")
    assert plan(header("fail"), Policy(p="none", sp="reject", org_record=True)) == (
        "rewrite", "no-aligned-dkim")
    assert plan(header("fail"), None) == ("unchanged", "no-policy")
    assert plan(header("fail"), DNSTrouble("timeout")) == ("unchanged", "dns-error")  # type: ignore[arg-type]
    assert plan(header("fail", author="our.test")) == ("unchanged", "own-domain")
    assert plan(header("fail"), enabled=False) == ("unchanged", "off")
    # no results of OUR verifier: nothing to go by (another host's field proves nothing)
    other = header("fail").replace(b"mx.our.test", b"mx.elsewhere.test")
    assert plan(other) == ("unchanged", "no-results")
    no_dkim = b"Authentication-Results: mx.our.test; spf=pass smtp.mailfrom=a@sender.test\r\n" \
              b"From: sam@sender.test\r\n\r\n"
    assert plan(no_dkim) == ("rewrite", "no-aligned-dkim")
    two_froms = header("fail").replace(b"Subject: x", b"From: b@sender.test")
    assert plan(two_froms) == ("unchanged", "no-single-from")


def test_our_topmost_results_are_read() -> None:
    head = (b"Authentication-Results: mx.our.test; dkim=pass header.d=sender.test\r\n"
            b"Authentication-Results: mx.our.test; dkim=fail header.d=sender.test\r\n\r\n")
    assert dkim_results(head, "mx.our.test") == [("pass", "sender.test")]
    assert dkim_results(head, "mx.other.test") is None


def test_the_author() -> None:
    a = author_of(b"From: =?utf-8?q?Ren=C3=A9e?=\r\n <renee@example.org>\r\n\r\n")
    assert a is not None and a.name == "Ren\u00e9e" and a.address == "renee@example.org"
    assert a.field == b"=?utf-8?q?Ren=C3=A9e?=\r\n <renee@example.org>"
    assert author_of(b"From: a@x.test, b@y.test\r\n\r\n") is None
    assert author_of(b"Subject: none\r\n\r\n") is None


async def test_a_spilled_mail_is_rewritten_over_its_file_and_signed(tmp_path: Path) -> None:
    """Forwarding.apply on a mail in a file: From replaced, Reply-To added, our DKIM
    signature valid over the rewritten mail (keys and the author's DMARC from knot)."""
    from poste.dkim.sign import Signer, SigningKey
    from poste.dkim.verify import verify
    from poste.dns.resolver import make_sync_resolver
    from poste.services.relay.from_rewrite import Forwarding
    from poste.smtp.message import BodyWriter
    from poste.smtp.stage import Envelope
    from support.dkimkit import dkim_zone_records, make_key
    from support.knot import knot_server, simple_zone

    _, key = make_key(tmp_path, "rsa", "poste")
    zones = {"sender.test": simple_zone("sender.test", '_dmarc TXT "v=DMARC1; p=reject"\n'),
             "our.test": simple_zone("our.test", dkim_zone_records([("poste", key)]))}
    body = BodyWriter(64 * 1024, str(tmp_path))
    for line in [header("fail"), *[b"line %d of a long body\r\n" % i for i in range(20000)]]:
        body.write(line)
    message = body.finish()
    assert not message.in_memory
    with knot_server(tmp_path / "knot", zones) as ns:
        resolver = make_sync_resolver([ns.nameserver])
        targets = {"alice@our.test": ["dave@example.org"],
                   "bob@our.test": ["b1@example.org", "b2@example.org"]}
        fwd = Forwarding(domain="our.test", server="mx.our.test", tokens=tokens(),
                         resolver=resolver, signer=Signer([SigningKey("our.test", "poste", key)]),
                         is_local=lambda d: d == "our.test", targets=lambda r: targets[r])
        got = await fwd.apply(Envelope(rcpt_tos=["alice@our.test"]), message)
        assert got.message is not None and not got.message.in_memory  # still the file
        mail = got.prepend + got.message.to_bytes()
        results = verify(mail, resolver)
        assert [(r.result, r.domain) for r in results] == [("pass", "our.test")], results
        several = await fwd.apply(Envelope(rcpt_tos=["bob@our.test"]), message)
        assert several.prepend == b""  # two targets: no X-Forwarded-* naming each to the other
    assert got.prepend == (b"X-Forwarded-To: dave@example.org\r\n"
                           b"X-Forwarded-For: alice@our.test dave@example.org\r\n")
    head = mail.split(b"\r\n\r\n", 1)[0]
    assert b'\r\nFrom: "Sam via our.test" <fwd+' in head
    assert b"\r\nReply-To: Sam <sam@sender.test>\r\n" in head
    assert mail.endswith(b"line 19999 of a long body\r\n")
    assert message.to_bytes().startswith(header("fail"))  # the received view is untouched
    # not forwarded (no local recipient): nothing at all
    alone = await fwd.apply(Envelope(rcpt_tos=["x@example.org"]), message)
    assert alone.prepend == b"" and alone.message is None
    message.close()
