"""SRS: what we rewrite comes back to the original sender; forged or old addresses do not."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from poste.services.relay.srs import SRS, SRSDatabase, SRSError, is_srs

NOW = time.time()


def make(secret: bytes = b"s3cret", **kw: object) -> SRS:
    return SRS("our.test", [secret], **kw)  # type: ignore[arg-type]


def test_forward_and_reverse() -> None:
    srs = make()
    rewritten = srs.forward("bob@example.org", now=NOW)
    assert rewritten.startswith("SRS0=") and rewritten.endswith("@our.test")
    assert "example.org" in rewritten and "bob" in rewritten
    assert is_srs(rewritten)
    assert srs.reverse(rewritten, now=NOW) == "bob@example.org"
    # MTAs may fold the case of local parts: still valid.
    assert srs.reverse(rewritten.upper().replace("OUR.TEST", "our.test"), now=NOW).lower() == (
        "bob@example.org"
    )


@pytest.mark.parametrize("sender", ["", "alice@our.test", "ALICE@Our.Test"])
def test_no_rewrite_for_null_or_own_sender(sender: str) -> None:
    assert make().forward(sender) == sender


def test_forged_hash_refused() -> None:
    srs = make()
    rewritten = srs.forward("bob@example.org", now=NOW)
    local, _, dom = rewritten.partition("@")
    parts = local.split("=")
    parts[1] = "AAAAAA" if parts[1] != "AAAAAA" else "BBBBBB"
    with pytest.raises(SRSError):
        srs.reverse("=".join(parts) + "@" + dom, now=NOW)
    # Changing the original address under a valid hash is refused too.
    with pytest.raises(SRSError):
        srs.reverse(rewritten.replace("=bob@", "=mallory@"), now=NOW)
    # Another secret does not verify it.
    with pytest.raises(SRSError):
        make(b"other").reverse(rewritten, now=NOW)


def test_expired_refused() -> None:
    srs = make(max_age_days=21)
    old = srs.forward("bob@example.org", now=NOW - 30 * 86400)
    with pytest.raises(SRSError, match="expired"):
        srs.reverse(old, now=NOW)
    recent = srs.forward("bob@example.org", now=NOW - 20 * 86400)
    assert srs.reverse(recent, now=NOW) == "bob@example.org"


def test_secret_rotation() -> None:
    old = make(b"old")
    signed = old.forward("bob@example.org", now=NOW)
    both = SRS("our.test", [b"new", b"old"])
    assert both.reverse(signed, now=NOW) == "bob@example.org"
    assert both.forward("bob@example.org", now=NOW) != signed


def test_srs1_for_already_forwarded_sender() -> None:
    first = SRS("hop1.test", [b"k1"])
    srs0 = first.forward("bob@example.org", now=NOW)
    ours = make()
    srs1 = ours.forward(srs0, now=NOW)
    assert srs1.startswith("SRS1=") and srs1.endswith("@our.test") and "hop1.test" in srs1
    back = ours.reverse(srs1, now=NOW)
    assert back == srs0  # to the first forwarder, which reverses it in turn
    assert first.reverse(back, now=NOW) == "bob@example.org"
    # An SRS1 re-forwarded keeps the first hop.
    third = SRS("hop3.test", [b"k3"])
    again = third.forward(srs1, now=NOW)
    assert again.startswith("SRS1=") and "hop1.test" in again
    assert third.reverse(again, now=NOW) == srs0


@pytest.mark.parametrize(
    "address",
    ["SRS0=x@our.test", "SRS0=AAAA=AA=@our.test", "SRS1=abc@our.test", "plain@our.test"],
)
def test_malformed_refused(address: str) -> None:
    with pytest.raises(SRSError):
        make().reverse(address, now=NOW)


@pytest.mark.parametrize("alg", ["sha1", "sha256"])
def test_algorithms(alg: str) -> None:
    srs = make(algorithm=alg, hash_length=8)
    assert srs.reverse(srs.forward("x@y.test", now=NOW), now=NOW) == "x@y.test"


# -- local parts over 64 octets (RFC 5321 4.5.3.1.1) ---------------------------------------

LONG = "bounces+1234567-abcdef0123456789=subscriber.example.net@newsletters.example.com"


def test_long_sender_without_database_stays_long() -> None:
    rewritten = make().forward(LONG, now=NOW)
    assert len(rewritten.partition("@")[0]) > 64  # the documented stateless limit
    assert make().reverse(rewritten, now=NOW) == LONG


def test_long_sender_uses_the_database_form(tmp_path: Path) -> None:
    srs = make(db=SRSDatabase(tmp_path / "db"))
    short = srs.forward("bob@example.org", now=NOW)
    assert "example.org" in short  # short addresses keep the stateless form
    rewritten = srs.forward(LONG, now=NOW)
    local = rewritten.partition("@")[0]
    assert rewritten.startswith("SRS0=") and rewritten.endswith("@our.test")
    assert len(local.encode()) <= 64 and is_srs(rewritten)
    assert srs.forward(LONG, now=NOW) == rewritten  # one entry per sender, not per mail
    assert len(list((tmp_path / "db").iterdir())) == 1
    # After a restart (a new SRS on the same folder), even case-folded by some MTA.
    again = make(db=SRSDatabase(tmp_path / "db"))
    assert again.reverse(rewritten, now=NOW) == LONG
    assert again.reverse(rewritten.lower(), now=NOW) == LONG
    # Forged hash, expired, or unknown to this relay: refused.
    hh = local.split("=")[1]
    with pytest.raises(SRSError):
        again.reverse(rewritten.replace(hh, "AAAAAA" if hh != "AAAAAA" else "BBBBBB"), now=NOW)
    with pytest.raises(SRSError, match="expired"):
        again.reverse(rewritten, now=NOW + 30 * 86400)
    other = make(db=SRSDatabase(tmp_path / "other"))
    with pytest.raises(SRSError, match="unknown"):
        other.reverse(rewritten, now=NOW)
    # An SRS1 chain that grows too long takes the same way back.
    first = SRS("a-rather-long-forwarder-name.example.net", [b"k1"])
    srs1 = srs.forward(first.forward("someone.with.a.long.name@example.org", now=NOW), now=NOW)
    assert len(srs1.partition("@")[0]) <= 64
    assert first.reverse(srs.reverse(srs1, now=NOW), now=NOW) == (
        "someone.with.a.long.name@example.org"
    )


def test_database_prune(tmp_path: Path) -> None:
    import os

    db = SRSDatabase(tmp_path)
    make(db=db).forward(LONG, now=NOW)
    [entry] = list(tmp_path.iterdir())
    assert db.prune(22 * 86400) == 0
    os.utime(entry, (NOW - 23 * 86400, NOW - 23 * 86400))
    assert db.prune(22 * 86400) == 1 and list(tmp_path.iterdir()) == []


def test_needs_db_says_when_forward_writes_the_database(tmp_path: Path) -> None:
    """The relay routes a recipient on the event loop only when no database file is touched."""
    srs = make(db=SRSDatabase(tmp_path / "db"))
    assert not srs.needs_db("bob@example.org")
    assert not srs.needs_db("") and not srs.needs_db("someone@our.test")
    assert srs.needs_db(LONG)
    assert not list((tmp_path / "db").iterdir())  # asking wrote nothing
    srs.forward("bob@example.org", now=NOW)
    assert not list((tmp_path / "db").iterdir())  # as said: the short form writes nothing
    assert not make().needs_db(LONG)  # no database: the long form stays long
