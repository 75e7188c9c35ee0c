"""Successful logins remembered for a short time, so a login costs one password check.

A client that opens a session per mail (most MUAs, scripts) logs in for every mail;
with argon2id each check costs tens to hundreds of ms of CPU and megabytes of memory
(issue 16: 94% of the CPU of a one-mail session).  A success is remembered for `ttl`
seconds under a keyed BLAKE2b (hashlib, C) of the user's entry, its stored hash and
the password, with a random key made at start and never written anywhere: the cache
holds neither the password nor anything an offline attack could use without that key,
and the password itself lives no longer than the check that got it.

The stored hash is part of the key, so a changed password (a new hash committed to the
users repository) can never match an entry made with the old one; `forget` also drops
them at once when the watcher sees the change.  Only successes are remembered: every
failure still pays the full check and the AUTH brake's delays.  The brake still
admits every login (a locked-out client gets no help from the cache).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable


class LoginCache:
    def __init__(self, ttl: float = 60.0, max_entries: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._key = secrets.token_bytes(32)
        # digest -> (expiry, user path, stored hash the success was checked against)
        self._entries: OrderedDict[bytes, tuple[float, str, str]] = OrderedDict()

    def _digest(self, path: str, stored: str, password: str) -> bytes:
        h = hashlib.blake2b(key=self._key, digest_size=32, person=b"poste-login")
        for part in (path, stored, password):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(4, "big"))
            h.update(data)
        return h.digest()

    def hit(self, path: str, stored: str, password: str) -> bool:
        """Whether this exact login succeeded less than `ttl` ago against this hash."""
        if self.ttl <= 0:
            return False
        digest = self._digest(path, stored, password)
        got = self._entries.get(digest)
        if got is None:
            return False
        if got[0] <= self.clock() or got[2] != stored:
            del self._entries[digest]
            return False
        return True

    def remember(self, path: str, stored: str, password: str) -> None:
        if self.ttl <= 0:
            return
        digest = self._digest(path, stored, password)
        self._entries[digest] = (self.clock() + self.ttl, path, stored)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)  # the oldest: memory stays bounded

    def forget(self, current: Callable[[str], str | None]) -> int:
        """Drop every entry whose user's hash is no longer `current(path)`; how many."""
        stale = [d for d, (_, path, stored) in self._entries.items() if current(path) != stored]
        for d in stale:
            del self._entries[d]
        return len(stale)

    def __len__(self) -> int:
        return len(self._entries)
