"""Password hashes of the users repository.

ptt stores the hex BLAKE2B-512 of the password, unsalted: a leaked repository
can be brute-forced fast.  poste still accepts those (so a ptt repository
works as is) but writes argon2id for every new or changed password and
upgrades a BLAKE2B hash after the user's next successful login.

Both checks are CPU-heavy on purpose (argon2id) or must be constant-time
(BLAKE2B): callers on the event loop run `verify` through `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# argon2id with m=19 MiB, t=2, p=1: the first configuration of OWASP's Password Storage
# Cheat Sheet (its floor for argon2id, equal in strength to its m=46 MiB t=1 and m=12 MiB
# t=3 rows), with RFC 9106's 128-bit salt and 256-bit tag (argon2-cffi's defaults).
# RFC 9106 section 4 says to pick first the memory the machine can afford per check and
# then as many passes as the time allows; its "uniformly safe" 64 MiB t=3 p=4 (argon2-cffi's
# default, what poste wrote before) cost 335 ms of CPU and 64 MiB per login, and a few
# logins at once took 350 MB beside the mail (issue 16).  19 MiB x --auth-concurrency is
# what logins can take now.  Hashes made with other parameters still verify (the PHC
# string carries them) and are rewritten with these after the user's next login.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)

_BLAKE2B_HEX = re.compile(r"[0-9a-fA-F]{128}")

SCHEME_ARGON2ID = "argon2id"
SCHEME_BLAKE2B = "blake2b"


def scheme(stored: str | None) -> str | None:
    """Which kind of hash `stored` is: "argon2id", "blake2b", or None (unusable)."""
    if not stored:
        return None
    if stored.startswith("$argon2id$"):
        return SCHEME_ARGON2ID
    if _BLAKE2B_HEX.fullmatch(stored):
        return SCHEME_BLAKE2B
    return None


def is_valid_hash(stored: str) -> bool:
    """A value the users repository may hold in `password`."""
    return scheme(stored) is not None


def blake2b_hex(password: str) -> str:
    """ptt's format: hex BLAKE2B-512 of the UTF-8 password (only for tests and migration)."""
    return hashlib.blake2b(password.encode("utf-8"), digest_size=64).hexdigest()


def hash_password(password: str) -> str:
    """A new argon2id PHC string (random salt) for `password`."""
    return _HASHER.hash(password)


def verify(stored: str | None, password: str) -> bool:
    """Whether `password` matches `stored`; False for a missing or unknown hash."""
    kind = scheme(stored)
    if kind is None or stored is None:
        return False
    if kind == SCHEME_BLAKE2B:
        return hmac.compare_digest(blake2b_hex(password), stored.lower())
    try:
        return _HASHER.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_upgrade(stored: str | None) -> bool:
    """Whether a verified `stored` hash should be rewritten as a fresh argon2id."""
    kind = scheme(stored)
    if kind is None or stored is None:
        return False
    if kind == SCHEME_BLAKE2B:
        return True
    try:
        return _HASHER.check_needs_rehash(stored)
    except InvalidHashError:
        return False
