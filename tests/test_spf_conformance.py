"""The OpenSPF RFC 7208 test suite, run through poste's SPF entry point and DNS adapter.

The suite is vendored in tests/data/spf/ (rfc7208-tests.yml, release 2014.04, BSD-licensed:
rfc7208-tests.LICENSE beside it), so the tests need nothing beside the clone.  Its zone data is served over
real UDP/TCP sockets by a small DNS server (tests/support/fakedns.py), with
the suite driver's conventions (those of pyspf's own runner): `TIMEOUT`
makes a query for a type with no records listed before it go unanswered;
names under `error.` that are not listed time out; type-SPF records are
also served as TXT when a name lists no TXT record at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dns.rcode
import dns.rdatatype
import pytest
import yaml

from poste.services.verifier import spf
from support.fakedns import DROP, Answer, FakeDNS, rrset

SUITE = Path(__file__).resolve().parent / "data" / "spf" / "rfc7208-tests.yml"


def _load() -> list[tuple[str, dict[str, Any], dict[str, list[Any]]]]:
    cases = []
    with open(SUITE, encoding="utf-8") as f:
        for scenario in yaml.safe_load_all(f):
            zone = {name.lower(): _entries(recs) for name, recs in scenario["zonedata"].items()}
            for name, case in scenario["tests"].items():
                cases.append((name, case, zone))
    return cases


def _entries(recs: list[Any]) -> list[Any]:
    """The driver's view of one name: ordered (type, value) pairs and bare 'TIMEOUT's."""
    out: list[Any] = []
    generated: list[Any] = []
    has_txt = False
    for rec in recs:
        if isinstance(rec, dict):
            for typ, value in rec.items():
                if typ == "TXT":
                    has_txt = True
                elif typ == "SPF":
                    generated.append(("TXT", value))
                if value != "NONE":
                    out.append((typ, value))
        else:
            out.append(rec)
    if not has_txt:
        out += generated
    return out


def _txt_strings(value: Any) -> list[bytes]:
    items = [value] if isinstance(value, str) else list(value)
    return [s.encode("utf-8") for s in items]


def _rrset(name: str, typ: str, value: Any) -> Any:
    owner = name + "."
    if typ in ("TXT", "SPF"):
        return rrset(owner, typ, _txt_strings(value))
    if typ == "MX":
        pref, host = value
        return rrset(owner, typ, f"{pref} {host.rstrip('.') + '.' if host else '.'}")
    if typ in ("PTR", "CNAME"):
        return rrset(owner, typ, value.rstrip(".") + ".")
    return rrset(owner, typ, str(value))


class SuiteZone:
    """The lookup function the fake server calls; `zone` is switched per case."""

    def __init__(self) -> None:
        self.zone: dict[str, list[Any]] = {}

    def __call__(self, qname: str, qtype: int) -> Answer | None:
        return self._lookup(qname.rstrip(".").lower(), dns.rdatatype.to_text(qtype), 0)

    def _lookup(self, name: str, typ: str, depth: int) -> Answer | None:
        entries = self.zone.get(name)
        if entries is None:
            if name.startswith("error."):
                return DROP
            return Answer(rcode=dns.rcode.NXDOMAIN)
        found: list[Any] = []
        cname = None
        for entry in entries:
            if entry == "TIMEOUT":
                if not found and cname is None:
                    return DROP
                break
            etyp, value = entry
            if etyp == typ:
                found.append(value)
            elif etyp == "CNAME" and typ != "CNAME":
                cname = value
        if found:
            merged = _rrset(name, typ, found[0])
            for value in found[1:]:
                merged.union_update(_rrset(name, typ, value))
            return Answer(rrsets=[merged])
        if cname is not None:
            # chase the alias inside our data like an authoritative server would
            answer = Answer(rrsets=[_rrset(name, "CNAME", cname)])
            target = cname.rstrip(".").lower()
            if depth < 8 and target != name:
                rest = self._lookup(target, typ, depth + 1)
                if rest is not None:
                    answer.rrsets += [r for r in rest.rrsets if r not in answer.rrsets]
            return answer
        return Answer()


CASES = _load()


@pytest.fixture(scope="module")
def suite_dns() -> Any:
    zone = SuiteZone()
    server = FakeDNS(zone)
    server.start()
    yield server, zone
    server.stop()


def test_suite_is_complete() -> None:
    assert len(CASES) == 203
    assert (SUITE.parent / "rfc7208-tests.LICENSE").read_text().startswith(
        "The RFC 7208 test-suite (rfc7208-tests.yml) is"
    )


@pytest.mark.parametrize(("name", "case", "zone"), CASES, ids=[c[0] for c in CASES])
def test_rfc7208(name: str, case: dict[str, Any], zone: dict[str, Any], suite_dns: Any) -> None:
    server, lookup = suite_dns
    lookup.zone = zone
    resolver = spf.resolver_for([server.nameserver], timeout=0.5)
    resolver.cache = None  # each case sees its own zone data
    got = spf.check_sync(
        case["host"],
        case["mailfrom"],
        case["helo"],
        resolver,
        default_explanation="DEFAULT",
        strict=case.get("strict", True),
    )
    expected = case["result"]
    allowed = expected if isinstance(expected, list) else [expected]
    assert got.result in allowed, f"{name}: {got}"
    if "explanation" in case:
        assert got.explanation == case["explanation"], f"{name}: {got}"
