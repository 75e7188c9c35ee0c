"""Password hashes: ptt's BLAKE2B-512 hex still works, argon2id is what poste writes."""

from __future__ import annotations

import hashlib

from poste.users import passwords


def test_blake2b_ptt_format() -> None:
    stored = hashlib.blake2b(b"hunter2", digest_size=64).hexdigest()
    assert len(stored) == 128
    assert passwords.scheme(stored) == "blake2b"
    assert passwords.verify(stored, "hunter2")
    assert passwords.verify(stored.upper(), "hunter2")
    assert not passwords.verify(stored, "hunter3")
    assert passwords.needs_upgrade(stored)


def test_argon2id() -> None:
    stored = passwords.hash_password("correct horse")
    assert stored.startswith("$argon2id$")
    assert passwords.scheme(stored) == "argon2id"
    assert passwords.verify(stored, "correct horse")
    assert not passwords.verify(stored, "wrong horse")
    assert not passwords.needs_upgrade(stored)
    assert stored != passwords.hash_password("correct horse")  # salted


def test_unusable_hashes_never_verify() -> None:
    for stored in (None, "", "plain", "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA", "ab" * 63):
        assert not passwords.verify(stored, "plain")
        assert not passwords.needs_upgrade(stored)
    assert not passwords.verify("$argon2id$garbage", "x")
