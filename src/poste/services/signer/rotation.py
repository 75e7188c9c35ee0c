"""DKIM key rotation: epoch-numbered selectors in a key folder, published by TSIG UPDATE.

A rotation never breaks a signature in flight: a new key is published first
under a new selector (`rsa-2` after `rsa-1`; one series per algorithm, so RSA
and ed25519 rotate side by side), signing switches to it only once the
primary serves its record and the record's TTL has passed since (a resolver
that cached the zone before then has had time to forget), and the old record
stays published for a grace period after the switch, so mail signed just
before it still verifies on delayed delivery or a re-check; then it is
withdrawn.

The folder holds the keys (0600) and `keys.json`, the state of each selector:
`pending` (published, not signing yet), `active` (signing), `retiring`
(published, not signing, for `rotation-grace` after `retired_at`), `withdrawn`.  `poste dkim
rotate` adds a pending key; the signer (separate or in `poste up`) moves the
states on at every look (`rotation-check`) and signs with the active keys;
with `rotate-every` it starts a rotation itself when the active key is that
old.  Both processes read-modify-write the state under one lock file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from poste.dkim.keys import DKIMKey, DKIMKeyError, dkim_record, generate, load_key, write_key
from poste.dkim.sign import SigningKey
from poste.dns.records import DEFAULT_TTL, Record
from poste.dns.resolver import Nameserver
from poste.dns.update import TsigKey, current, publish, up_to_date, withdraw

log = logging.getLogger("poste.signer")

PENDING, ACTIVE, RETIRING, WITHDRAWN = "pending", "active", "retiring", "withdrawn"
PREFIX = {"rsa": "rsa", "ed25519": "ed"}


class RotationError(Exception):
    """The key folder cannot be used, or the primary refused (one line)."""


@dataclass
class Entry:
    """One selector of the folder and where it is in its life."""

    selector: str
    algorithm: str
    epoch: int
    file: str
    state: str
    ttl: int = DEFAULT_TTL
    published: float = 0.0
    visible_at: float | None = None  # first seen on the primary
    active_since: float | None = None
    retired_at: float | None = None  # withdrawn `rotation-grace` later (the grace of now)

    def record(self, domain: str, key: DKIMKey) -> Record:
        return dkim_record(domain, self.selector, key, self.ttl)


class KeyFolder:
    """The key folder: keys, `keys.json`, and the lock both writers take."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.state_path = self.folder / "keys.json"

    @contextmanager
    def locked(self) -> Iterator[list[Entry]]:
        """The entries, to change in place; written back (atomically) when the block ends
        without an exception.  Blocking: call it off the event loop."""
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RotationError(f"cannot use the key folder {self.folder}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries = self.read()
            yield entries
            self._write(entries)
        finally:
            os.close(fd)

    def read(self) -> list[Entry]:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise RotationError(f"cannot read {self.state_path}: {exc}") from None
        try:
            return [Entry(**e) for e in data["keys"]]
        except (KeyError, TypeError) as exc:
            raise RotationError(f"{self.state_path}: not a key folder state ({exc})") from None

    def _write(self, entries: list[Entry]) -> None:
        tmp = self.state_path.with_name(".keys.json.tmp")
        text = json.dumps({"keys": [asdict(e) for e in entries]}, indent=1) + "\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path)

    def key(self, entry: Entry) -> DKIMKey:
        try:
            return load_key(self.folder / entry.file)
        except DKIMKeyError as exc:
            raise RotationError(str(exc)) from None

    def signing_keys(self, domain: str) -> list[SigningKey]:
        """The keys to sign with now: the active one of each series."""
        return [SigningKey(domain, e.selector, self.key(e))
                for e in self.read() if e.state == ACTIVE]

    def published(self, domain: str) -> list[Record]:
        """Every record that should be in DNS now (pending, active, retiring)."""
        return [e.record(domain, self.key(e)) for e in self.read()
                if e.state in (PENDING, ACTIVE, RETIRING)]


@dataclass(frozen=True)
class Primary:
    server: Nameserver
    key: TsigKey
    zone: str


def new_entry(folder: KeyFolder, entries: list[Entry], algorithm: str, ttl: int,
              bits: int) -> tuple[Entry, DKIMKey]:
    """The next epoch of `algorithm`'s series, its key written (0600) beside the state."""
    if any(e.algorithm == algorithm and e.state == PENDING for e in entries):
        pending = next(e for e in entries if e.algorithm == algorithm and e.state == PENDING)
        raise RotationError(f"{pending.selector} is still pending: the signer switches to it"
                            " once its record is visible and its TTL has passed")
    try:
        key = generate(algorithm, bits)
    except DKIMKeyError as exc:
        raise RotationError(str(exc)) from None
    epoch = max((e.epoch for e in entries if e.algorithm == algorithm), default=0) + 1
    selector = f"{PREFIX[algorithm]}-{epoch}"
    entry = Entry(selector, algorithm, epoch, f"{selector}.pem", PENDING, ttl, time.time())
    write_key(key, folder.folder / entry.file)
    return entry, key


async def rotate(folder: KeyFolder, domain: str, algorithm: str, primary: Primary, *,
                 ttl: int = DEFAULT_TTL, bits: int = 2048) -> Entry:
    """A new key under the next selector, published; RotationError (nothing kept) otherwise."""
    import asyncio

    from poste.dns.update import DNSUpdateError

    def make() -> tuple[Entry, DKIMKey]:
        with folder.locked() as entries:
            entry, key = new_entry(folder, entries, algorithm, ttl, bits)
            return entry, key  # not saved yet: only once published

    entry, key = await asyncio.to_thread(make)
    try:
        await publish([entry.record(domain, key)], primary.zone, primary.server, primary.key)
    except DNSUpdateError as exc:
        (folder.folder / entry.file).unlink(missing_ok=True)
        raise RotationError(f"cannot publish {entry.selector}: {exc}") from None

    def save() -> None:
        with folder.locked() as entries:
            entry.published = time.time()
            if not any(e.algorithm == algorithm and e.state == ACTIVE for e in entries):
                # the series' first key: nothing signs yet, nothing to wait for
                entry.state, entry.active_since = ACTIVE, entry.published
            entries.append(entry)

    await asyncio.to_thread(save)
    if entry.state == ACTIVE:
        log.info("dkim: published %s._domainkey.%s, the first %s key: signing with it",
                 entry.selector, domain, algorithm)
    else:
        log.info("dkim: published %s._domainkey.%s (pending: signing switches once it is"
                 " visible and %d s have passed)", entry.selector, domain, entry.ttl)
    return entry


async def advance(folder: KeyFolder, domain: str, primary: Primary | None, grace: float,
                  now: float | None = None) -> bool:
    """Move every selector on as far as it may go now; True when the signing keys changed.

    Without a primary (no dns-server) a pending key is taken as visible when
    published: the admin published it.
    """
    import asyncio

    from poste.dns.update import DNSUpdateError

    now = time.time() if now is None else now
    entries = await asyncio.to_thread(folder.read)
    # what the primary serves, asked outside the lock (the network is slow, the lock is not)
    seen: dict[str, bool] = {}
    for e in entries:
        if e.state == PENDING and e.visible_at is None:
            if primary is None:
                seen[e.selector] = True
                continue
            record = e.record(domain, await asyncio.to_thread(folder.key, e))
            try:
                seen[e.selector] = up_to_date(record, await current(record, primary.server))
            except DNSUpdateError as exc:
                log.warning("dkim: cannot see whether %s is published: %s", e.selector, exc)
    to_withdraw: list[Entry] = []

    def step() -> bool:
        changed = False
        with folder.locked() as fresh:
            for e in fresh:
                if e.state == PENDING and e.visible_at is None and seen.get(e.selector):
                    e.visible_at = now
                    log.info("dkim: %s is visible on the primary; signing switches to it in"
                             " %d s", e.selector, e.ttl)
                if e.state == PENDING and e.visible_at is not None and now >= e.visible_at + e.ttl:
                    for old in fresh:
                        if old.algorithm == e.algorithm and old.state == ACTIVE:
                            old.state, old.retired_at = RETIRING, now
                            log.info("dkim: %s retired from signing; its record is withdrawn"
                                     " after %.0f s", old.selector, grace)
                    e.state, e.active_since = ACTIVE, now
                    log.info("dkim: signing with %s", e.selector)
                    changed = True
                if e.state == RETIRING and e.retired_at is not None and now >= e.retired_at + grace:
                    to_withdraw.append(e)
        return changed

    changed = await asyncio.to_thread(step)
    for e in to_withdraw:
        if primary is not None:
            record = e.record(domain, await asyncio.to_thread(folder.key, e))
            try:
                await withdraw([record], primary.zone, primary.server, primary.key)
            except DNSUpdateError as exc:
                log.warning("dkim: cannot withdraw %s yet: %s", e.selector, exc)
                continue

        def done(selector: str = e.selector) -> None:
            with folder.locked() as fresh:
                for x in fresh:
                    if x.selector == selector:
                        x.state = WITHDRAWN
                (folder.folder / f"{selector}.pem").unlink(missing_ok=True)

        await asyncio.to_thread(done)
        log.info("dkim: withdrew %s._domainkey.%s", e.selector, domain)
    return changed


def due_for_rotation(entries: list[Entry], every: float, now: float) -> list[str]:
    """The algorithms whose active key is older than `every` and has nothing pending."""
    out = []
    for e in entries:
        if e.state != ACTIVE or e.active_since is None or now < e.active_since + every:
            continue
        if not any(p.algorithm == e.algorithm and p.state == PENDING for p in entries):
            out.append(e.algorithm)
    return out


def summary(entries: list[Entry]) -> list[str]:
    """One line per selector, for `poste dkim rotate`."""
    def stamp(t: float | None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "-"

    lines = []
    for e in sorted(entries, key=lambda x: (x.algorithm, x.epoch)):
        extra = {PENDING: f"published {stamp(e.published)}",
                 ACTIVE: f"since {stamp(e.active_since)}",
                 RETIRING: f"retired {stamp(e.retired_at)}, withdrawn after the grace",
                 WITHDRAWN: ""}[e.state]
        lines.append(f"{e.selector:<10} {e.algorithm:<8} {e.state:<9} {extra}".rstrip())
    return lines


def as_primary(server: Nameserver | None, key: Any, zone: str) -> Primary | None:
    return Primary(server, key, zone) if server is not None and key is not None else None
