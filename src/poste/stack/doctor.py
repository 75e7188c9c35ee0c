"""`poste doctor --domain D`: what a receiving provider will check, checked from outside.

Each check prints `ok`, `missing` or `wrong` (or `skip` when not enough was
given to check it, `warn` for a certificate with less than 14 days left) and, when not ok, the record to publish, built by the same
code as `poste dns records` so the advice matches what `poste init` printed.
The exit status is 0 only when nothing is missing or wrong.

SPF is evaluated with poste's own SPF code (the verifier's), for the
address given with --address (default: the MX host's addresses), as a
receiver would for mail from postmaster@D, and for each HELO name our relay
greets with (--helo, default the MX host) as a receiver would for a bounce,
which is sent from `<>` and so has only the HELO name to be checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import dns.exception
import dns.resolver
import dns.reversename

from poste.dns.records import DEFAULT_TTL, Record
from poste.dns.resolver import SyncResolver
from poste.smtp.address import domain_key
from poste.smtp.client import ProbeError, probe_starttls

OK, MISSING, WRONG, SKIP, WARN = "ok", "missing", "wrong", "skip", "warn"
EXPIRY_WARNING_DAYS = 14  # ACME renews at 30 days left: under 14, renewal has been failing


@dataclass
class Check:
    status: str
    name: str
    text: str
    publish: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.status:<8} {self.name:<6} {self.text}"]
        for i, line in enumerate(self.publish):
            out.append(f"{'':<15} {'publish:' if i == 0 else '        '} {line}")
        return out


def _txt(resolver: dns.resolver.Resolver, name: str) -> list[str] | None:
    """Joined TXT strings at name; None when the name has none (NXDOMAIN/NODATA)."""
    try:
        answer = resolver.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]


def _addresses(resolver: dns.resolver.Resolver, host: str) -> list[str]:
    out: list[str] = []
    for kind in ("A", "AAAA"):
        try:
            out += [r.to_text() for r in resolver.resolve(host, kind)]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            pass
    return out


def _record_lines(record: Record) -> list[str]:
    return [line.lstrip("; ") for line in record.zone_lines()]


class Doctor:
    def __init__(
        self,
        domain: str,
        resolver: SyncResolver,
        *,
        addresses: Sequence[str] = (),
        hostname: str | None = None,
        dkim: Sequence[tuple[str, object | None]] = (),
        smtp_port: int = 25,
        cafile: str | None = None,
        timeout: float = 10.0,
        helo_names: Sequence[str] = (),
        https_port: int = 443,
    ) -> None:
        self.domain = domain_key(domain)
        self.helo_names = [domain_key(h) for h in helo_names]
        self.resolver = resolver
        self.addresses = list(addresses)
        self.hostname = domain_key(hostname) if hostname else None
        self.dkim = list(dkim)
        self.smtp_port = smtp_port
        self.cafile = cafile
        self.timeout = timeout
        self.mx_hosts: list[str] = []
        self.https_port = https_port

    # -- the checks --------------------------------------------------------

    def run(self) -> list[Check]:
        checks: list[Check] = []
        for fn in (self.mx, self.spf, self.helo, self.dkim_checks, self.dmarc, self.ptr,
                   self.tls, self.sts):
            try:
                got = fn()
            except dns.exception.DNSException as exc:
                got = [Check(WRONG, fn.__name__.split("_")[0].upper(), f"DNS error: {exc}")]
            checks += got
        return checks

    def _mx_record(self) -> Record:
        host = self.hostname or (self.mx_hosts[0] if self.mx_hosts else f"mail.{self.domain}")
        return Record(self.domain + ".", "MX", (f"10 {host}.",), DEFAULT_TTL)

    def mx(self) -> list[Check]:
        try:
            answer = self.resolver.resolve(self.domain, "MX")  # type: ignore[no-untyped-call]
        except dns.resolver.NXDOMAIN:
            return [Check(MISSING, "MX", f"{self.domain} does not exist",
                          _record_lines(self._mx_record()))]
        except dns.resolver.NoAnswer:
            return [Check(MISSING, "MX", f"no MX record for {self.domain}",
                          _record_lines(self._mx_record()))]
        records = sorted((r.preference, r.exchange.to_text(omit_final_dot=True).lower())
                         for r in answer)
        self.mx_hosts = [h for _, h in records if h not in ("", ".")]
        shown = ", ".join(f"{h or '.'} ({p})" for p, h in records)
        if not self.mx_hosts:
            return [Check(WRONG, "MX", f"null MX: {self.domain} says it takes no mail",
                          _record_lines(self._mx_record()))]
        if self.hostname and self.hostname not in self.mx_hosts:
            return [Check(WRONG, "MX", f"{self.domain} -> {shown}, not {self.hostname}",
                          _record_lines(self._mx_record()))]
        found = {h: _addresses(self.resolver, h) for h in self.mx_hosts}
        if not self.addresses:
            self.addresses = [a for h in self.mx_hosts[:1] for a in found[h]]
            if not self.addresses:
                return [Check(WRONG, "MX", f"{self.domain} -> {shown}, which has no address")]
            return [Check(OK, "MX", f"{self.domain} -> {shown} [{', '.join(self.addresses)}]")]
        ours = [h for h, addrs in found.items() if set(addrs) & set(self.addresses)]
        if not ours:
            where = "; ".join(f"{h} is {', '.join(a) or 'no address'}" for h, a in found.items())
            fix = [f"{h}. {DEFAULT_TTL} IN {'AAAA' if ':' in a else 'A'} {a}"
                   for h in self.mx_hosts[:1] for a in self.addresses]
            return [Check(WRONG, "MX", f"{self.domain} -> {shown}, not us: {where}", fix)]
        return [Check(OK, "MX", f"{self.domain} -> {shown} [{', '.join(self.addresses)}]")]

    def spf(self) -> list[Check]:
        from poste.services.verifier.spf import check_sync

        records = [t for t in _txt(self.resolver, self.domain) or []
                   if t.lower().startswith("v=spf1")]
        mech = " ".join(f"ip6:{a}" if ":" in a else f"ip4:{a}" for a in self.addresses)
        if not records:
            value = "v=spf1 mx -all" if self.mx_hosts else f"v=spf1 {mech} -all"
            return [Check(MISSING, "SPF", f"no v=spf1 record at {self.domain}",
                          self._txt_lines(self.domain, value))]
        if len(records) > 1:
            return [Check(WRONG, "SPF", f"{len(records)} v=spf1 records (permerror): keep one",
                          self._txt_lines(self.domain, records[0]))]
        current = records[0]
        if not self.addresses:
            return [Check(SKIP, "SPF", f"{current!r} (give --address to evaluate it)")]
        bad: list[str] = []
        helo = self.hostname or (self.mx_hosts[0] if self.mx_hosts else self.domain)
        for ip in self.addresses:
            result = check_sync(ip, f"postmaster@{self.domain}", helo, self.resolver)
            if result.result != "pass":
                why = f" {result.problem}" if result.problem else ""
                bad.append(f"{ip}: {result.result}{why}")
        if bad:
            missing_ips = [a for a in self.addresses if any(b.startswith(a + ":") for b in bad)]
            add = " ".join(f"ip6:{a}" if ":" in a else f"ip4:{a}" for a in missing_ips)
            words = current.split()
            tail = [w for w in words[1:] if w.lower().lstrip("+-~?") in ("all",)
                    or w.lower().startswith("redirect=")]
            head = [w for w in words[1:] if w not in tail]
            fixed = " ".join(["v=spf1", *head, add, *(tail or ["-all"])])
            return [Check(WRONG, "SPF", f"{current!r} does not allow {'; '.join(bad)}",
                          self._txt_lines(self.domain, fixed))]
        return [Check(OK, "SPF", f"{current!r} allows {', '.join(self.addresses)}")]

    def helo(self) -> list[Check]:
        """SPF of each HELO name, for the null sender (a DSN): RFC 7208 2.3."""
        from poste.dns.records import helo_spf_records
        from poste.services.verifier.spf import check_sync

        host = self.hostname or (self.mx_hosts[0] if self.mx_hosts else f"mail.{self.domain}")
        names = self.helo_names or [host]
        if not self.addresses:
            return [Check(SKIP, "HELO", f"SPF of {', '.join(names)}: no address to evaluate "
                          "(give --address)")]
        addrs = [ipaddress.ip_address(a) for a in self.addresses]
        out: list[Check] = []
        for name in names:
            if name == self.domain:
                continue  # the domain's own record, checked above
            [want] = helo_spf_records(self.domain + ".", host + ".", [name], addrs, DEFAULT_TTL)
            publish = _record_lines(want)
            records = [t for t in _txt(self.resolver, name) or []
                       if t.lower().startswith("v=spf1")]
            if not records:
                out.append(Check(MISSING, "HELO", f"no v=spf1 record at {name}: bounces "
                                 "(sent from <>) fail SPF", publish))
                continue
            bad = []
            for ip in self.addresses:
                result = check_sync(ip, "", name, self.resolver)
                if result.result != "pass":
                    bad.append(f"{ip}: {result.result}")
            if bad:
                out.append(Check(WRONG, "HELO", f"{name} {records[0]!r} does not allow "
                                 f"{'; '.join(bad)}", publish))
            else:
                out.append(Check(OK, "HELO", f"{name} {records[0]!r} allows "
                                 f"{', '.join(self.addresses)}"))
        return out

    def _txt_lines(self, name: str, value: str) -> list[str]:
        return _record_lines(Record(name.rstrip(".") + ".", "TXT", (value,), DEFAULT_TTL))

    def dkim_checks(self) -> list[Check]:
        from poste.dkim.keys import DKIMKey, dkim_record

        if not self.dkim:
            return [Check(SKIP, "DKIM", "give --selector (and --dkim-key) to check the key record")]
        out: list[Check] = []
        for selector, key in self.dkim:
            name = f"{selector}._domainkey.{self.domain}"
            want = dkim_record(self.domain, selector, key) if isinstance(key, DKIMKey) else None
            publish = _record_lines(want) if want else []
            found = [t for t in _txt(self.resolver, name) or [] if "p=" in t]
            if not found:
                out.append(Check(MISSING, "DKIM", f"no key record at {name}", publish))
                continue
            tags = _tags(found[0])
            if len(found) > 1:
                out.append(Check(WRONG, "DKIM", f"{len(found)} key records at {name}", publish))
            elif not tags.get("p"):
                out.append(Check(WRONG, "DKIM", f"{name}: empty p= (key revoked)", publish))
            elif isinstance(key, DKIMKey) and tags["p"] != key.public_b64():
                out.append(Check(WRONG, "DKIM", f"{name} holds another key than ours", publish))
            elif isinstance(key, DKIMKey) and tags.get("k", "rsa") != key.algorithm:
                out.append(Check(WRONG, "DKIM", f"{name}: k={tags.get('k', 'rsa')}, our key is "
                                 f"{key.algorithm}", publish))
            else:
                what = "matches our key" if key is not None else "present (no --dkim-key to compare)"
                out.append(Check(OK, "DKIM", f"{name} {what} (k={tags.get('k', 'rsa')})"))
        return out

    def dmarc(self) -> list[Check]:
        name = f"_dmarc.{self.domain}"
        want = self._txt_lines(
            name, f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{self.domain}"
        )
        found = [t for t in _txt(self.resolver, name) or [] if t.lower().startswith("v=dmarc1")]
        if not found:
            return [Check(MISSING, "DMARC", f"no v=DMARC1 record at {name}", want)]
        if len(found) > 1:
            return [Check(WRONG, "DMARC", f"{len(found)} v=DMARC1 records at {name}", want)]
        policy = _tags(found[0]).get("p", "")
        if policy not in ("none", "quarantine", "reject"):
            return [Check(WRONG, "DMARC", f"{found[0]!r}: p= must be none, quarantine or reject",
                          want)]
        return [Check(OK, "DMARC", f"{name}: p={policy}")]

    def ptr(self) -> list[Check]:
        if not self.addresses:
            return [Check(SKIP, "PTR", "no address to check (give --address)")]
        host = self.hostname or (self.mx_hosts[0] if self.mx_hosts else f"mail.{self.domain}")
        out: list[Check] = []
        for ip in self.addresses:
            rev = dns.reversename.from_address(ip).to_text()
            publish = [f"{rev} {DEFAULT_TTL} IN PTR {host}.",
                       f"(the reverse zone is your hosting provider's: ask them to set it for {ip})"]
            try:
                names = [r.to_text().rstrip(".").lower() for r in self.resolver.resolve(rev, "PTR")]  # type: ignore[no-untyped-call]
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                out.append(Check(MISSING, "PTR", f"no reverse DNS for {ip}", publish))
                continue
            except dns.resolver.NoNameservers:  # e.g. REFUSED: receivers see no name either
                out.append(Check(MISSING, "PTR", f"no reverse DNS for {ip} (no server answers "
                                 f"for {rev})", publish))
                continue
            if host not in names:
                out.append(Check(WRONG, "PTR", f"{ip} -> {', '.join(names)}, not {host}", publish))
                continue
            if ip not in _addresses(self.resolver, host):
                out.append(Check(WRONG, "PTR", f"{ip} -> {host}, but {host} does not resolve "
                                 f"back to {ip}", publish))
                continue
            out.append(Check(OK, "PTR", f"{ip} -> {host} -> {ip}"))
        return out

    def tls(self) -> list[Check]:
        host = self.hostname or (self.mx_hosts[0] if self.mx_hosts else None)
        if host is None or not self.addresses:
            return [Check(SKIP, "TLS", "no MX host to connect to")]
        ip = self.addresses[0]
        try:
            text, days = starttls_certificate(ip, self.smtp_port, host, self.cafile, self.timeout)
        except ProbeError as exc:
            return [Check(WRONG, "TLS", f"{host} [{ip}]:{self.smtp_port}: {exc}")]
        if days < EXPIRY_WARNING_DAYS:
            return [Check(WARN, "TLS", f"{host} [{ip}]:{self.smtp_port}: {text}: expires in"
                          f" {days:.1f} days (`poste cert show`, `poste cert renew`)")]
        return [Check(OK, "TLS", f"{host} [{ip}]:{self.smtp_port}: {text}")]


    def sts(self) -> list[Check]:
        from poste.stack.doctor_sts import sts_checks

        return [Check(*c) for c in sts_checks(
            self.domain, self.resolver, self.mx_hosts, cafile=self.cafile,
            port=self.https_port, timeout=self.timeout)]


def _tags(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in value.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            out[k.strip().lower()] = "".join(v.split())
    return out


def starttls_certificate(
    ip: str, port: int, name: str, cafile: str | None, timeout: float = 10.0
) -> tuple[str, float]:
    """EHLO, STARTTLS, verify the certificate for `name`: a one-line summary and the days it
    has left, or ProbeError."""
    import time

    ctx = ssl.create_default_context(cafile=cafile)
    version, cert = asyncio.run(probe_starttls(ip, port, name, ctx, timeout))
    not_after = str(cert.get("notAfter", ""))
    try:
        days = (ssl.cert_time_to_seconds(not_after) - time.time()) / 86400
    except ValueError:
        days = float("inf")
    return f"{version}, certificate valid for {name} until {not_after or '?'}", days


