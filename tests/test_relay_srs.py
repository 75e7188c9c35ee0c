"""SRS: what we rewrite comes back to the original sender; forged or old addresses do not."""

from __future__ import annotations

import time

import pytest

from poste.relay.srs import SRS, SRSError, is_srs

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
