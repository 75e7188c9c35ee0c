"""MTA-STS (RFC 8461): a destination's policy, fetched over verified HTTPS and cached on disk.

The TXT record `_mta-sts.DOMAIN` ("v=STSv1; id=...") says a policy exists and
which version; the policy itself is `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`.
A fetched policy is kept in the cache folder (one JSON file per domain) until
its max_age: a lost or spoofed TXT record, or a policy host that is down, must
not turn an `enforce` destination into one we deliver to in clear (5.1).  A new
id in DNS makes us fetch again; a failed fetch keeps the cached policy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver

from poste.services.relay.tls_policy.https import HTTPSError, request

log = logging.getLogger("poste.relay.mta_sts")

MODES = ("enforce", "testing", "none")
MAX_AGE_LIMIT = 31557600  # RFC 8461 3.2: at most one year
FAILED_RETRY = 300.0  # seconds before a failed policy fetch is tried again
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


class PolicyError(ValueError):
    """A policy file that is not one (TLS-RPT: sts-policy-invalid)."""


@dataclass(frozen=True)
class Policy:
    mode: str
    mx: tuple[str, ...]
    max_age: int
    text: str  # as fetched, for TLS-RPT's policy-string

    def matches(self, host: str) -> bool:
        """RFC 8461 4.1: a name, or `*.` for exactly one leftmost label."""
        name = host.rstrip(".").lower()
        for pattern in self.mx:
            p = pattern.rstrip(".").lower()
            if p.startswith("*."):
                label, dot, rest = name.partition(".")
                if dot and label and rest == p[2:]:
                    return True
            elif name == p:
                return True
        return False

    def strings(self) -> list[str]:
        """The policy's lines, as TLS-RPT's `policy-string` lists them."""
        return [line for line in self.text.replace("\r\n", "\n").split("\n") if line.strip()]


def parse_policy(text: str) -> Policy:
    """The policy file (3.2): `key: value` lines; unknown keys are ignored."""
    fields: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"line {line[:40]!r} is not 'key: value'")
        fields.setdefault(key.strip().lower(), []).append(value.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError("version is not STSv1")
    mode = (fields.get("mode") or [""])[0]
    if mode not in MODES:
        raise PolicyError(f"mode {mode!r} is none of {', '.join(MODES)}")
    age = (fields.get("max_age") or [""])[0]
    if not age.isdigit() or int(age) > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {age!r} is not a number of seconds up to {MAX_AGE_LIMIT}")
    mx = tuple(fields.get("mx", []))
    if mode != "none" and not mx:
        raise PolicyError("no mx: line")
    return Policy(mode, mx, int(age), text)


def parse_txt(strings: list[str]) -> str | None:
    """The id of a `v=STSv1` TXT record, or None if it is not one."""
    text = "".join(strings)
    tags = [t.strip() for t in text.split(";") if t.strip()]
    if not tags or tags[0].replace(" ", "") != "v=STSv1":
        return None
    for tag in tags[1:]:
        name, _, value = tag.partition("=")
        if name.strip() == "id" and _ID.match(value.strip()):
            return value.strip()
    return None


@dataclass(frozen=True)
class Lookup:
    """What MTA-STS says about a domain: the policy to apply (or None), and what went wrong."""

    policy: Policy | None
    failure: str | None = None  # a TLS-RPT result type: sts-policy-fetch-error, ...
    reason: str = ""


class MTASTS:
    """Looks up, fetches and caches the policies of destination domains."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        cache_dir: Path,
        ctx: ssl.SSLContext,
        *,
        port: int = 443,
        timeout: float = 30.0,
    ) -> None:
        self.resolver = resolver
        self.cache_dir = cache_dir
        self.ctx = ctx
        self.port = port
        self.timeout = timeout
        # One fetch at a time per domain (the sessions of a domain run side by side), and a
        # failed fetch is not tried again for FAILED_RETRY: a dead policy host must not
        # stall every delivery attempt for the length of a timeout.
        self._locks: dict[str, asyncio.Lock] = {}
        self._failed: dict[str, tuple[float, Lookup]] = {}

    async def lookup(self, domain: str) -> Lookup:
        domain = domain.rstrip(".").lower()
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:
            return await self._lookup(domain)

    async def _lookup(self, domain: str) -> Lookup:
        cached = self._load(domain)
        try:
            txt_id = await self._txt(domain)
        except dns.exception.DNSException as exc:
            log.info("MTA-STS of %s: TXT lookup failed (%s)%s", domain, type(exc).__name__,
                     ", using the cached policy" if cached else "")
            return Lookup(cached[1] if cached else None)
        if txt_id is None:  # no (valid) record: a cached policy stays in force (5.1)
            return Lookup(cached[1] if cached else None)
        if cached and cached[0] == txt_id:
            return Lookup(cached[1])
        failed = self._failed.get(domain)
        if failed and time.monotonic() - failed[0] < FAILED_RETRY:
            return Lookup(cached[1] if cached else None, failed[1].failure, failed[1].reason)
        try:
            policy = await self.fetch(domain)
        except HTTPSError as exc:
            kind = "sts-webpki-invalid" if exc.tls else "sts-policy-fetch-error"
            log.warning("MTA-STS of %s: cannot fetch the policy: %s%s", domain, exc,
                        ", using the cached one" if cached else "")
            return self._fail(domain, Lookup(cached[1] if cached else None, kind, str(exc)))
        except PolicyError as exc:
            log.warning("MTA-STS of %s: invalid policy: %s", domain, exc)
            return self._fail(domain, Lookup(cached[1] if cached else None,
                                             "sts-policy-invalid", str(exc)))
        self._failed.pop(domain, None)
        self._store(domain, txt_id, policy)
        log.info("MTA-STS of %s: policy %s (mode %s, mx %s, max_age %d)", domain, txt_id,
                 policy.mode, " ".join(policy.mx), policy.max_age)
        return Lookup(policy)

    def _fail(self, domain: str, found: Lookup) -> Lookup:
        self._failed[domain] = (time.monotonic(), found)
        return found

    async def txt_id(self, domain: str) -> str | None:
        """The id of the one `v=STSv1` record at _mta-sts.DOMAIN (None: no valid record)."""
        return await self._txt(domain)

    async def _txt(self, domain: str) -> str | None:
        try:
            answer = await self.resolver.resolve(f"_mta-sts.{domain}", "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        ids = [parse_txt([s.decode("ascii", "replace") for s in r.strings]) for r in answer]
        found = [i for i in ids if i is not None]
        return found[0] if len(found) == 1 else None  # more than one: no policy (3.1)

    async def fetch(self, domain: str) -> Policy:
        """The policy as served now (HTTPSError, PolicyError); no cache (`poste doctor`)."""
        status, headers, body = await request(
            self.resolver, self.ctx, f"mta-sts.{domain}", "/.well-known/mta-sts.txt",
            port=self.port, timeout=self.timeout)
        if status != 200:
            raise HTTPSError(f"HTTP status {status}")
        if headers.get("content-type", "").split(";")[0].strip().lower() != "text/plain":
            raise PolicyError(f"content type {headers.get('content-type')!r} is not text/plain")
        try:
            return parse_policy(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise PolicyError("not UTF-8 text") from None

    # -- the cache -----------------------------------------------------------

    def _path(self, domain: str) -> Path:
        return self.cache_dir / f"{domain}.json"

    def _load(self, domain: str) -> tuple[str, Policy] | None:
        try:
            data = json.loads(self._path(domain).read_text())
            if time.time() > float(data["fetched"]) + parse_policy(data["policy"]).max_age:
                return None
            return str(data["id"]), parse_policy(data["policy"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("MTA-STS cache of %s unreadable (%s): fetching again", domain, exc)
            return None

    def _store(self, domain: str, txt_id: str, policy: Policy) -> None:
        path = self._path(domain)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"id": txt_id, "fetched": time.time(),
                                       "policy": policy.text}))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("MTA-STS cache %s: cannot write: %s", path, exc)
