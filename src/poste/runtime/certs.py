"""A listener's certificate from ACME, renewed while the process runs.

With `acme-directory` a service's TLS context is fed from the ACME state
folder instead of `tls-cert`/`tls-key`.  Before the listeners open, a
certificate is obtained if the folder has none; then a background job renews
it at two thirds of its lifetime (or at once when it lacks a name asked for),
retries a failure with a doubling delay, and hands the new chain to the
`SSLContext` objects the listeners hold: new handshakes get the new
certificate, open connections keep theirs, nothing is dropped (runtime/tls.py).
A failure never touches what is served; it is one log line with the time the
served certificate expires.  `poste cert renew` in another process (and two services
sharing a folder) is seen at SIGHUP or at the next hourly look at the folder.

In `poste up` the verifier and submission name the same folder, so they share
one `Renewal`: one certificate for the MX and the submission host names, one
order at a time.  `/metrics` shows `poste_certificate_expires_in_seconds`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from poste.certs.acme import CA, ACMEError, Primary, obtain
from poste.certs.http01 import HTTP01
from poste.certs.store import CertInfo, Store, StoreError
from poste.dns.resolver import NameserverError, parse_nameserver
from poste.runtime.hostport import parse_hostport
from poste.runtime.run import Parts, StartError
from poste.runtime.settings import ConfigError, Values
from poste.runtime.tls import TLSFiles, tls_files
from poste.smtp.tls import TLSConfigError, bare_server_context

log = logging.getLogger("poste.cert")

LOOK_EVERY = 3600.0  # seconds between looks at the folder (a renewal by another process)
RETRY_FIRST = 300.0  # first retry after a failed renewal, doubling...
RETRY_MAX = 6 * 3600.0  # ...up to this (Let's Encrypt allows 5 failed validations an hour)


@dataclass(frozen=True)
class ACMESettings:
    """The `acme-*` settings of a service, checked."""

    store: Store
    ca: CA
    primary: Primary | HTTP01  # how the names are proven: DNS-01 or HTTP-01
    names: tuple[str, ...]


def acme_settings(values: Values) -> ACMESettings | None:
    """The ACME settings of `values`, or None without `acme-directory`; ConfigError if unusable."""
    from poste.dns.update import parse_tsig  # dnspython.tsig is slow to import

    directory = values.get("acme-directory")
    if not directory:
        return None
    if not str(directory).startswith(("https://", "http://")):
        raise ConfigError("acme-directory", f"{directory!r} is not a URL (https://...)")
    http = values.get("acme-challenge") == "http-01"
    needed = ("acme-state",) if http else ("acme-state", "acme-dns-server", "acme-dns-key")
    for need in needed:
        if not values.get(need):
            raise ConfigError(None, "{0} needs {1}", names=("acme-directory", need))
    proof: Primary | HTTP01
    if http:
        host, port = parse_hostport(values.get("acme-http-listen") or "0.0.0.0:80", 80,
                                    "acme-http-listen")
        proof = HTTP01(host or "0.0.0.0", port)
    else:
        try:
            server = parse_nameserver(values["acme-dns-server"])
        except NameserverError as exc:
            raise ConfigError("acme-dns-server", str(exc)) from None
        try:
            tsig = parse_tsig(values["acme-dns-key"])
        except ValueError as exc:
            raise ConfigError("acme-dns-key", str(exc)) from None
        zone = values.get("acme-zone")
        proof = Primary(server, tsig, zone.rstrip(".") + "." if zone else None)
    names = values.get("acme-name") or [values.get("hostname") or socket.getfqdn()]
    return ACMESettings(
        Store(values["acme-state"]),
        CA(str(directory), values.get("acme-email"), values.get("acme-ca")),
        proof,
        tuple(n.lower().rstrip(".") for n in names),
    )


@dataclass
class Renewal:
    """One state folder's certificate, kept fresh and loaded into every context that serves it."""

    settings: ACMESettings
    names: list[str]
    contexts: list[ACMEFiles] = field(default_factory=list)
    served: CertInfo | None = None  # what the contexts hold now
    _started: bool = False
    _running: bool = False

    @property
    def store(self) -> Store:
        return self.settings.store

    def _load(self, into: list[ACMEFiles]) -> CertInfo | None:
        """The folder's pair into `into`; None when there is none yet. Raises StoreError or
        ssl/OS errors as they come."""
        info = self.store.info()
        if info is None:
            return None
        for files in into:
            files.load()
        return info

    async def load(self) -> None:
        """Serve what the folder holds now; a pair that does not load leaves the old one."""
        try:
            info = await asyncio.to_thread(self._load, self.contexts)
        except (TLSConfigError, StoreError) as exc:
            log.error("cert: %s refused, still serving the certificate valid until %s: %s",
                      self.store.cert_path, _until(self.served), exc)
            return
        if info is not None and (self.served is None or info.serial != self.served.serial):
            log.info("cert: serving %s for %s, valid until %s", self.store.cert_path,
                     ", ".join(info.names), _stamp(info.not_after))
        self.served = info or self.served

    async def start(self) -> None:
        """Before the listeners open: a certificate to serve, obtained now if there is none."""
        if self._started:
            return
        self._started = True
        await self.load()
        if self.served is not None:
            if self.served.expires_in() <= 0:
                log.error("cert: the certificate for %s expired at %s: renewing",
                          ", ".join(self.served.names), _stamp(self.served.not_after))
            return
        try:
            await obtain(self.store, self.settings.ca, self.settings.primary, self.names)
        except ACMEError as exc:
            raise StartError(
                f"cannot obtain a certificate for {', '.join(self.names)}: {exc}") from None
        await self.load()

    def due(self, now: datetime.datetime) -> str | None:
        """Why the served certificate must be renewed now, or None."""
        info = self.served
        if info is None:
            return "no certificate"
        if not info.covers(self.names):
            missing = sorted(set(self.names) - {n.lower() for n in info.names})
            return f"it does not cover {', '.join(missing)}"
        if now >= info.renew_at:
            return f"two thirds of its lifetime passed at {_stamp(info.renew_at)}"
        return None

    async def run(self) -> None:
        """Beside the listeners: renew when due, retry failures with backoff, follow the folder."""
        if self._running:
            return
        self._running = True
        failures = 0
        while True:
            now = datetime.datetime.now(datetime.UTC)
            why = self.due(now)
            if why is None:
                assert self.served is not None
                await asyncio.sleep(min((self.served.renew_at - now).total_seconds(), LOOK_EVERY))
                await self.load()  # renewed by `poste cert renew` or another service?
                continue
            log.info("cert: renewing the certificate for %s: %s", ", ".join(self.names), why)
            delay = min(RETRY_FIRST * 2**failures, RETRY_MAX)
            try:
                await obtain(self.store, self.settings.ca, self.settings.primary, self.names,
                             replacing=self.served)
            except ACMEError as exc:
                log.error("cert: renewal failed (next try in %.0f s), still serving the"
                          " certificate valid until %s: %s", delay, _until(self.served), exc)
            except Exception:  # a bug must not end renewal for good
                log.exception("cert: renewal failed (next try in %.0f s)", delay)
            else:
                before = self.served.serial if self.served else None
                await self.load()
                if self.served is not None and self.served.serial != before:
                    failures = 0
                    continue
                log.error("cert: the new certificate does not load (next try in %.0f s)", delay)
            failures += 1
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        _RENEWALS.pop(self.store.folder.resolve(), None)


def _stamp(when: datetime.datetime) -> str:
    return when.isoformat(timespec="seconds")


def _until(info: CertInfo | None) -> str:
    return _stamp(info.not_after) if info else "(none)"


@dataclass
class ACMEFiles(TLSFiles):
    """A listener's context fed from an ACME state folder; SIGHUP loads the folder again."""

    renewal: Renewal | None = None

    async def reload(self) -> None:
        assert self.renewal is not None
        await self.renewal.load()


# state folder -> its Renewal in this process (`poste up`: the verifier's and submission's)
_RENEWALS: dict[Path, Renewal] = {}


def server_tls(values: Values) -> TLSFiles | None:
    """The listener's context: from ACME with `acme-directory`, else from tls-cert/tls-key."""
    acme = acme_settings(values)
    if acme is None:
        return tls_files(values)
    if values.get("tls-cert") or values.get("tls-key"):
        raise ConfigError(None, "{0} replaces {1} and {2}: set one or the other",
                          names=("acme-directory", "tls-cert", "tls-key"))
    folder = acme.store.folder.resolve()
    renewal = _RENEWALS.get(folder)
    if renewal is None:
        renewal = _RENEWALS[folder] = Renewal(acme, list(acme.names))
        _watch()
    elif renewal.settings.ca != acme.ca:
        raise ConfigError("acme-state", f"{folder} is already another ACME server's")
    renewal.names += [n for n in acme.names if n not in renewal.names]
    files = ACMEFiles(bare_server_context(), str(acme.store.cert_path),
                      str(acme.store.key_path), renewal=renewal)
    renewal.contexts.append(files)
    return files


def tls_parts(tls: TLSFiles) -> Parts:
    """What a listener's certificate adds to its process: SIGHUP reloads it; from ACME, it
    is obtained before the listeners open and renewed beside them."""
    parts = Parts(reloads=[("certificate", tls.reload)])
    if isinstance(tls, ACMEFiles) and tls.renewal is not None:
        parts.before.append(tls.renewal.start)
        parts.background.append(tls.renewal.run)
        parts.after.append(tls.renewal.stop)
    return parts


class CertCollector(Collector):
    """poste_certificate_expires_in_seconds of each served ACME certificate, at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "poste_certificate_expires_in_seconds",
            "Seconds until the served ACME certificate expires (negative: expired).",
            labels=["name"],
        )
        now = datetime.datetime.now(datetime.UTC)
        for renewal in list(_RENEWALS.values()):
            if renewal.served is not None:
                gauge.add_metric([renewal.names[0]], renewal.served.expires_in(now))
        yield gauge


_collector: Any = None


def _watch() -> None:
    global _collector
    if _collector is None:
        _collector = CertCollector()
        REGISTRY.register(_collector)
