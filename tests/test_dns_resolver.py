"""The `--nameserver` flag and the resolver built from it."""

from __future__ import annotations

import pytest

from poste.dns.resolver import NameserverError, make_resolver, make_sync_resolver, parse_nameserver


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        ("8.8.8.8", "udp:8.8.8.8:53"),
        ("tcp:127.0.0.1:5353", "tcp:127.0.0.1:5353"),
        ("udp:127.0.0.1", "udp:127.0.0.1:53"),
        ("::1", "udp:[::1]:53"),
        ("tcp:[::1]:5353", "tcp:[::1]:5353"),
    ],
)
def test_parse(spec: str, text: str) -> None:
    assert str(parse_nameserver(spec)) == text


@pytest.mark.parametrize("spec", ["", "example.org", "1.2.3.4:0", "1.2.3.4:x", "[::1", "tcp:1.2.3"])
def test_parse_errors(spec: str) -> None:
    with pytest.raises(NameserverError):
        parse_nameserver(spec)


def test_ports_stay_per_server() -> None:
    r = make_resolver(["127.0.0.1:5301", "tcp:127.0.0.1:5302"])
    assert [(ns.address, ns.port) for ns in r.nameservers] == [("127.0.0.1", 5301), ("127.0.0.1", 5302)]
    assert r.use_tcp
    s = make_sync_resolver(["127.0.0.1:5301"], timeout=2)
    assert not s.use_tcp and s.lifetime == 2


def test_resolve_cached_answers_from_the_cache_alone() -> None:
    """What the event loop may ask (the relay's forward plan): the cache, never the network."""
    from poste.dns.dmarc import find_policy
    from poste.dns.resolver import NotCached
    from support.fakedns import Answer, fake_dns, rrset

    asked: list[str] = []

    def lookup(qname: str, qtype: int) -> Answer | None:
        asked.append(qname.rstrip(".").lower())
        if qname.rstrip(".").lower() == "_dmarc.author.test":
            return Answer([rrset("_dmarc.author.test.", "TXT", "v=DMARC1; p=reject", ttl=300)])
        return Answer(rcode=3)

    with fake_dns(lookup) as dns_server:
        r = make_sync_resolver([dns_server.nameserver], timeout=5)
        with pytest.raises(NotCached):
            r.resolve_cached("_dmarc.author.test", "TXT")
        with pytest.raises(NotCached):
            find_policy(r, "author.test", cached_only=True)
        assert asked == []  # nothing went out
        policy = find_policy(r, "author.test")
        assert policy is not None and policy.p == "reject"
        n = len(asked)
        again = find_policy(r, "author.test", cached_only=True)
        assert again == policy and len(asked) == n  # from the cache, by its TTL
        assert r.resolve_cached("_dmarc.author.test", "TXT").rrset is not None
