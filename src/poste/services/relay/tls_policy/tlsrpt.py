"""TLS-RPT (RFC 8460): every outbound session's TLS outcome, and the daily reports.

Each session's result (success, or one of the result types of 4.3) goes as
one JSON line into `FOLDER/YYYY-MM-DD.jsonl` (UTC day).  Once a day, and on
`poste tls-report --now`, the lines of past days are summed per policy
domain into a report (4.4) for each domain that publishes
`_smtp._tls.DOMAIN TXT "v=TLSRPTv1; rua=..."`: gzip'd JSON, mailed to the
`mailto:` addresses (5.3, multipart/report; report-type="tlsrpt") and POSTed
to the `https:` ones (5.4).  The day's file then moves to `FOLDER/done/`,
and a copy of each report stays in `FOLDER/reports/`.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import gzip
import json
import logging
import os
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import dns.asyncresolver
import dns.exception
import dns.resolver
from prometheus_client import Counter

from poste.services.relay.tls_policy.https import HTTPSError, request

log = logging.getLogger("poste.relay.tlsrpt")

SUCCESS = "success"
RESULT_TYPES = (
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
)
POLICY_TYPES = ("tlsa", "sts", "no-policy-found")
SESSIONS = Counter(
    "poste_relay_tls_sessions",
    "Outbound TLS outcomes as TLS-RPT counts them, by policy type and result type.",
    ["policy", "result"],
)


@dataclass(frozen=True)
class Outcome:
    """One session (or one attempt that ended before one): what policy, which MX, what result."""

    domain: str  # the policy domain (the recipient domain)
    policy_type: str  # tlsa | sts | no-policy-found
    policy: tuple[str, ...]  # policy-string: the policy's lines or the TLSA records
    mx: str
    ip: str
    result: str  # SUCCESS or a result type
    reason: str = ""
    local_ip: str = ""  # our end of the session (sending-mta-ip)

    def __post_init__(self) -> None:
        assert self.policy_type in POLICY_TYPES and (
            self.result == SUCCESS or self.result in RESULT_TYPES), self


class Recorder:
    """Appends outcomes to the day's file; a write that fails is logged, never fatal."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def record(self, o: Outcome) -> None:
        SESSIONS.labels(o.policy_type, o.result).inc()
        now = time.time()
        line = json.dumps({"t": now, "domain": o.domain, "type": o.policy_type,
                           "policy": list(o.policy), "mx": o.mx, "ip": o.ip,
                           "result": o.result, "reason": o.reason, "from": o.local_ip}) + "\n"
        path = self.folder / (_day(now) + ".jsonl")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError as exc:
            log.warning("TLS-RPT: cannot record to %s: %s", path, exc)


def _day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def _iso(d: dt.datetime) -> str:
    return d.strftime("%Y-%m-%dT%H:%M:%SZ")


_KEYS = ("domain", "type", "policy", "mx", "ip", "result")


def read_outcomes(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(item, dict) and all(k in item for k in _KEYS) and isinstance(
                item["policy"], list):
            out.append(item)
    return out


def build_report(
    domain: str,
    outcomes: Iterable[dict[str, Any]],
    *,
    start: dt.datetime,
    end: dt.datetime,
    organization: str,
    contact: str,
    report_id: str,
) -> dict[str, Any]:
    """The report of 4.4 for one policy domain, one entry per policy seen."""
    policies: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    for o in outcomes:
        if o["domain"] != domain:
            continue
        key = (o["type"], tuple(o["policy"]))
        entry = policies.setdefault(key, {"mx": set(), "ok": 0, "fail": 0, "details": {}})
        if o["mx"] and o["type"] == "sts":
            entry["mx"].add(o["mx"])
        if o["result"] == SUCCESS:
            entry["ok"] += 1
            continue
        entry["fail"] += 1
        dkey = (o["result"], o["mx"], o["ip"], o.get("reason", ""), o.get("from", ""))
        entry["details"][dkey] = entry["details"].get(dkey, 0) + 1
    out = []
    for (ptype, strings), entry in policies.items():
        policy: dict[str, Any] = {"policy-type": ptype, "policy-domain": domain}
        if ptype != "no-policy-found":
            policy["policy-string"] = list(strings)
        if entry["mx"]:
            policy["mx-host"] = sorted(entry["mx"])
        item: dict[str, Any] = {
            "policy": policy,
            "summary": {"total-successful-session-count": entry["ok"],
                        "total-failure-session-count": entry["fail"]},
        }
        details = []
        for (result, mx, ip, reason, local), n in sorted(entry["details"].items()):
            d: dict[str, Any] = {"result-type": result, "failed-session-count": n}
            if local:
                d["sending-mta-ip"] = local
            if mx:
                d["receiving-mx-hostname"] = mx
            if ip:
                d["receiving-ip"] = ip
            if reason:
                d["failure-reason-code"] = reason[:200]
            details.append(d)
        if details:
            item["failure-details"] = details
        out.append(item)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _iso(start), "end-datetime": _iso(end)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": out,
    }


def parse_tlsrpt(strings: list[str]) -> list[str]:
    """The rua URIs of a `v=TLSRPTv1` TXT record ([] if it is not one)."""
    text = "".join(strings)
    tags = [t.strip() for t in text.split(";") if t.strip()]
    if not tags or tags[0].replace(" ", "") != "v=TLSRPTv1":
        return []
    for tag in tags[1:]:
        name, _, value = tag.partition("=")
        if name.strip() == "rua":
            return [u.strip() for u in value.split(",") if u.strip()]
    return []


async def rua_of(resolver: dns.asyncresolver.Resolver, domain: str) -> list[str]:
    """Where `domain` wants its reports; [] when it publishes no (single) TLSRPT record."""
    try:
        answer = await resolver.resolve(f"_smtp._tls.{domain}", "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    found = [u for r in answer
             if (u := parse_tlsrpt([s.decode("ascii", "replace") for s in r.strings]))]
    return found[0] if len(found) == 1 else []


def report_mail(
    report_gz: bytes, filename: str, *, sender: str, to: str, domain: str, submitter: str,
    report_id: str,
) -> bytes:
    """The report as a mail (5.3): multipart/report with the gzip'd JSON attached."""
    msg = MIMEMultipart("report", report_type="tlsrpt")
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>"
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = f"<{report_id}>"
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg.attach(MIMEText(f"This is an aggregate TLS report from {submitter} about the "
                        f"sessions to {domain} (RFC 8460).\n"))
    part = MIMEApplication(report_gz, "tlsrpt+gzip", name=filename)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    msg.attach(part)
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


MailFn = Callable[[str, bytes], Awaitable[None]]  # (recipient, message): queue it


class Reporter:
    """Turns the recorded days into reports and sends them."""

    def __init__(
        self,
        folder: Path,
        resolver: dns.asyncresolver.Resolver,
        ctx: ssl.SSLContext,
        *,
        submitter: str,
        sender: str,
        mail: MailFn,
    ) -> None:
        self.folder, self.resolver, self.ctx = folder, resolver, ctx
        self.submitter, self.sender, self.mail = submitter, sender, mail

    async def send_due(self, *, now: bool = False) -> list[Path]:
        """Report every past day (and today so far with `now`); the reports written."""
        today = _day(time.time())
        try:
            days = sorted(p for p in self.folder.glob("*.jsonl") if now or p.stem < today)
        except OSError:
            return []
        written: list[Path] = []
        for path in days:
            written += await self._report_day(path, until_now=path.stem >= today)
        return written

    async def _report_day(self, path: Path, *, until_now: bool) -> list[Path]:
        try:
            outcomes = read_outcomes(path)
            start = dt.datetime.strptime(path.stem, "%Y-%m-%d").replace(tzinfo=dt.UTC)
        except (OSError, ValueError) as exc:
            log.warning("TLS-RPT: cannot read %s: %s", path, exc)
            return []
        end = dt.datetime.now(dt.UTC) if until_now else start + dt.timedelta(days=1)
        written = []
        for domain in sorted({o["domain"] for o in outcomes}):
            try:
                rua = await rua_of(self.resolver, domain)
            except dns.exception.DNSException as exc:
                log.info("TLS-RPT: no report for %s: lookup failed (%s)", domain,
                         type(exc).__name__)
                continue
            if not rua:
                continue
            report_id = f"{path.stem}.{secrets.token_hex(6)}@{self.submitter}"
            report = build_report(domain, outcomes, start=start, end=end,
                                  organization=self.submitter,
                                  contact=self.sender, report_id=report_id)
            gz = gzip.compress(json.dumps(report, indent=1).encode("utf-8"))
            filename = (f"{self.submitter}!{domain}!{int(start.timestamp())}!"
                        f"{int(end.timestamp())}!{secrets.token_hex(3)}.json.gz")
            keep = self.folder / "reports" / filename
            keep.parent.mkdir(parents=True, exist_ok=True)
            keep.write_bytes(gz)
            written.append(keep)
            for uri in rua:
                await self._send(uri, gz, filename, domain, report_id)
        done = self.folder / "done" / path.name
        done.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, done)
        return written

    async def _send(self, uri: str, gz: bytes, filename: str, domain: str, report_id: str) -> None:
        parts = urlsplit(uri)
        if parts.scheme == "mailto":
            to = unquote(parts.path)
            if "@" not in to:
                log.warning("TLS-RPT of %s: bad rua %r", domain, uri)
                return
            msg = report_mail(gz, filename, sender=self.sender, to=to, domain=domain,
                              submitter=self.submitter, report_id=report_id)
            await self.mail(to, msg)
            log.info("TLS-RPT of %s: report %s queued to <%s>", domain, report_id, to)
        elif parts.scheme == "https" and parts.hostname:
            try:
                status, _, _ = await request(
                    self.resolver, self.ctx, parts.hostname,
                    (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                    port=parts.port or 443, method="POST", body=gz,
                    content_type="application/tlsrpt+gzip")
            except HTTPSError as exc:
                log.warning("TLS-RPT of %s: POST to %s failed: %s", domain, uri, exc)
                return
            log.info("TLS-RPT of %s: report %s POSTed to %s (HTTP %d)", domain, report_id,
                     uri, status)
        else:
            log.warning("TLS-RPT of %s: rua %r is neither mailto: nor https:", domain, uri)
