"""Every DNS record a mail domain needs, as data and as zone-file text.

MX says where mail for the domain goes, the A/AAAA of that host make it
reachable, SPF (`v=spf1 mx -all`) says only the MX hosts send for it, an SPF
record at each HELO name poste greets with (by default the MX host) lets a
bounce pass too (it is sent from `<>`, so SPF checks only the HELO name,
RFC 7208 2.3), one DKIM
TXT per signing key publishes the public keys, and DMARC tells receivers what
to do with mail that fails both.  With MTA-STS on, `_mta-sts` (RFC 8461) says a
policy is served at mta-sts.DOMAIN, and `_smtp._tls` (RFC 8460) where senders
report how their TLS sessions to us went.  The PTR (reverse DNS of the server's IP)
lives in the address owner's zone, not ours: we print it for the user to ask
their hosting provider, and never try to publish it.

A TXT record is compared by its joined strings and, where records share a
name (SPF at the apex next to other TXT records), only the records that start
with the same tag (`v=spf1`, `v=DKIM1`, `v=DMARC1`) count as "ours".
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

import dns.reversename

DEFAULT_TTL = 3600
TXT_CHUNK = 255  # the most one TXT string holds (RFC 1035 3.3.14)
DMARC_POLICIES = ("none", "quarantine", "reject")


def split_txt(value: str, size: int = TXT_CHUNK) -> list[str]:
    """Cut an ASCII value into TXT strings of at most `size` bytes."""
    data = value.encode("ascii")
    return [data[i : i + size].decode("ascii") for i in range(0, len(data), size)] or [""]


def zone_txt(strings: list[str]) -> str:
    """TXT strings as zone-file text: `"..." "..."` (the values hold no quotes)."""
    return " ".join(f'"{s}"' for s in strings)


@dataclass(frozen=True)
class Record:
    """One record: absolute name, type, and its values (TXT: one str per record)."""

    name: str
    rtype: str
    values: tuple[str, ...]
    ttl: int = DEFAULT_TTL
    # TXT only: the tag that makes a record at `name` ours, e.g. "v=spf1"
    txt_tag: str | None = None
    # Not ours to publish (PTR): printed with this note instead.
    ask: str | None = field(default=None, compare=False)

    def rdata_texts(self) -> list[str]:
        """Values in zone-file presentation (TXT split into 255-byte strings)."""
        if self.rtype == "TXT":
            return [zone_txt(split_txt(v)) for v in self.values]
        return list(self.values)

    def zone_lines(self) -> list[str]:
        lines = [f"{self.name} {self.ttl} IN {self.rtype} {rd}" for rd in self.rdata_texts()]
        if self.ask:
            lines = [f"; {self.ask}"] + [f"; {line}" for line in lines]
        return lines


def _abs(name: str) -> str:
    return name.rstrip(".").lower() + "."


def domain_records(
    domain: str,
    *,
    mx_host: str | None = None,
    ips: Sequence[str] = (),
    dkim: Sequence[Record] = (),
    dmarc_policy: str = "quarantine",
    dmarc_rua: str | None = None,
    ttl: int = DEFAULT_TTL,
    helo_names: Sequence[str] = (),
) -> list[Record]:
    """The records for `domain`; `mx_host` defaults to mail.<domain>, `helo_names` to it."""
    apex = _abs(domain)
    mx = _abs(mx_host) if mx_host else "mail." + apex
    addrs = [ipaddress.ip_address(ip) for ip in ips]
    if dmarc_policy not in DMARC_POLICIES:
        raise ValueError(f"DMARC policy must be one of {', '.join(DMARC_POLICIES)}")
    out = [Record(apex, "MX", (f"10 {mx}",), ttl)]
    v4 = tuple(str(a) for a in addrs if a.version == 4)
    v6 = tuple(str(a) for a in addrs if a.version == 6)
    in_zone = mx == apex or mx.endswith("." + apex)
    if in_zone and v4:
        out.append(Record(mx, "A", v4, ttl))
    if in_zone and v6:
        out.append(Record(mx, "AAAA", v6, ttl))
    out.append(Record(apex, "TXT", ("v=spf1 mx -all",), ttl, "v=spf1"))
    out.extend(helo_spf_records(apex, mx, helo_names or [mx], addrs, ttl))
    out.extend(dkim)  # DKIM's own records (poste.dkim.keys.dkim_record)
    rua = dmarc_rua or f"mailto:postmaster@{apex.rstrip('.')}"
    dmarc = f"v=DMARC1; p={dmarc_policy}; rua={rua}"
    out.append(Record("_dmarc." + apex, "TXT", (dmarc,), ttl, "v=DMARC1"))
    for a in addrs:
        ptr = dns.reversename.from_address(str(a)).to_text()
        out.append(
            Record(
                ptr,
                "PTR",
                (mx,),
                ttl,
                ask=f"reverse DNS: ask the owner of {a} (your hosting provider) to set",
            )
        )
    return out


MTA_STS_MODES = ("testing", "enforce")


def mta_sts_policy(mode: str, mx: Sequence[str], max_age: int) -> str:
    """The policy file served at https://mta-sts.DOMAIN/.well-known/mta-sts.txt (RFC 8461 3.2)."""
    if mode not in MTA_STS_MODES:
        raise ValueError(f"MTA-STS mode must be one of {', '.join(MTA_STS_MODES)}")
    lines = ["version: STSv1", f"mode: {mode}"]
    lines += [f"mx: {name.rstrip('.').lower()}" for name in dict.fromkeys(mx)]
    lines.append(f"max_age: {int(max_age)}")
    return "\r\n".join(lines) + "\r\n"


def mta_sts_id(policy: str) -> str:
    """The TXT record's id: a digest of the policy, so it changes exactly when the policy does
    (senders fetch again only then, 3.1) and `poste dns records` agrees with the server."""
    return hashlib.sha256(policy.encode("ascii")).hexdigest()[:20]


def mta_sts_records(
    domain: str, policy: str, ips: Sequence[str] = (), ttl: int = DEFAULT_TTL
) -> list[Record]:
    """`_mta-sts.DOMAIN` TXT and the policy host `mta-sts.DOMAIN` (our IPs: poste serves it)."""
    apex = _abs(domain)
    out = [Record("_mta-sts." + apex, "TXT", (f"v=STSv1; id={mta_sts_id(policy)}",), ttl,
                  "v=STSv1")]
    addrs = [ipaddress.ip_address(ip) for ip in ips]
    v4 = tuple(str(a) for a in addrs if a.version == 4)
    v6 = tuple(str(a) for a in addrs if a.version == 6)
    if v4:
        out.append(Record("mta-sts." + apex, "A", v4, ttl))
    if v6:
        out.append(Record("mta-sts." + apex, "AAAA", v6, ttl))
    return out


def tlsrpt_record(domain: str, rua: str | None = None, ttl: int = DEFAULT_TTL) -> Record:
    """`_smtp._tls.DOMAIN` TXT (RFC 8460 3): where senders send TLS reports about us."""
    apex = _abs(domain)
    where = rua or f"mailto:postmaster@{apex.rstrip('.')}"
    return Record("_smtp._tls." + apex, "TXT", (f"v=TLSRPTv1; rua={where}",), ttl, "v=TLSRPTv1")


def helo_spf_records(
    apex: str, mx: str, names: Sequence[str], addrs: Sequence[ipaddress.IPv4Address
                                                        | ipaddress.IPv6Address], ttl: int
) -> list[Record]:
    """`v=spf1 a -all` at the MX host (its own A/AAAA), our addresses at another HELO name.

    The apex already has its record; a name outside the zone is printed as a
    note, for whoever owns that zone.
    """
    out = []
    for name in dict.fromkeys(_abs(n) for n in names):
        if name == apex:
            continue
        if name == mx or not addrs:
            value = "v=spf1 a -all"
        else:
            value = "v=spf1 " + " ".join(f"ip{a.version}:{a}" for a in addrs) + " -all"
        ask = None if name.endswith("." + apex) else f"SPF of the HELO name {name}: not in {apex}, publish it in its own zone"
        out.append(Record(name, "TXT", (value,), ttl, "v=spf1", ask=ask))
    return out


def zone_text(records: Sequence[Record]) -> str:
    return "".join(line + "\n" for r in records for line in r.zone_lines())
