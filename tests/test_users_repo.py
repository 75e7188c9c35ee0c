"""The users repository as the relay and submission see it: a Git commit is the unit of change."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from poste.users import passwords, store
from poste.users.repo import UsersRepoError, UsersWatcher, load_snapshot

DOMAIN = "our.test"


def git(*args: str, cwd: Path) -> str:
    env = {
        "GIT_AUTHOR_NAME": "admin",
        "GIT_AUTHOR_EMAIL": "admin@our.test",
        "GIT_COMMITTER_NAME": "admin",
        "GIT_COMMITTER_EMAIL": "admin@our.test",
        "HOME": str(cwd),
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout


def entry(targets: list[str], password: str = "pw", **extra: object) -> bytes:
    return json.dumps(
        {"targets": targets, "password": passwords.blake2b_hex(password), "insecure": False} | extra
    ).encode()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    store.commit_file(
        path, "alice", entry(["alice@gmail.test", "Al <alice2@outlook.test>"]), "alice", create=True
    )
    store.commit_file(
        path, "other.test/bob", entry(["bob@x.test"], aliases=["bobby", "b@our.test"]), "bob"
    )
    return path


def test_layout_and_lookup(repo: Path) -> None:
    db = load_snapshot(repo, DOMAIN)
    alice = db.lookup("alice@our.test")
    assert alice is not None
    assert alice.targets == ["alice@gmail.test", "alice2@outlook.test"]
    assert alice.address == "alice@our.test"
    assert alice.insecure is False
    assert passwords.verify(alice.password, "pw")
    # +tag, case, bare local part, angle brackets
    assert db.lookup("alice+news@our.test") is alice
    assert db.lookup("<Alice@OUR.TEST>") is alice
    assert db.lookup("alice") is alice
    assert db.lookup("alice@other.test") is None
    assert db.lookup("nobody@our.test") is None
    # a further domain in a folder, with aliases
    bob = db.lookup("bob@other.test")
    assert bob is not None and bob.domain == "other.test"
    assert db.lookup("bobby@other.test") is bob
    assert db.lookup("b@our.test") is bob
    assert set(bob.addresses) == {"bob@other.test", "bobby@other.test", "b@our.test"}
    assert db.is_local_domain("our.test") and db.is_local_domain("Other.Test.")
    assert not db.is_local_domain("gmail.test")
    assert len(db) == 2 and {u.address for u in db} == {"alice@our.test", "bob@other.test"}
    assert passwords.blake2b_hex("pw") not in repr(alice)  # hashes stay out of logs


@pytest.mark.parametrize(
    ("path", "content", "why"),
    [
        ("carol", b"{not json", "invalid JSON"),
        ("carol", b'["a@b.test"]', "not a JSON object"),
        ("carol", b'{"targets": ["not an address"]}', "not a mail address"),
        ("carol", b'{"targets": [], "password": "plaintext"}', "neither"),
        ("carol", b'{"targets": [], "insecure": "yes"}', "insecure"),
        ("not_a_domain/carol", b'{"targets": []}', "not a domain"),
        ("carol", b'{"targets": [], "aliases": ["alice"]}', "already"),
    ],
)
def test_bad_commit_keeps_last_good_state(repo: Path, path: str, content: bytes, why: str) -> None:
    watcher = UsersWatcher(repo, DOMAIN)
    good = watcher.db.commit
    store.commit_file(repo, path, content, "a bad change")
    assert watcher.reload() is False
    assert watcher.db.commit == good
    assert watcher.db.lookup("alice@our.test") is not None
    assert watcher.last_error is not None and why in watcher.last_error
    assert watcher.reload() is False  # refused once, not retried on every poll
    # the fix is the next commit, and it is taken
    store.commit_file(repo, path, None, "revert")
    assert watcher.reload() is True
    assert watcher.last_error is None


def test_start_on_bad_head_serves_last_good_commit(repo: Path) -> None:
    store.commit_file(repo, "carol", b"{oops", "bad")
    watcher = UsersWatcher(repo, DOMAIN)
    assert watcher.db.lookup("alice") is not None
    assert watcher.db.lookup("carol") is None
    assert watcher.last_error is not None


def test_missing_repository_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UsersRepoError):
        UsersWatcher(tmp_path / "nope", DOMAIN)


def test_admin_push_takes_effect_without_restart(repo: Path, tmp_path: Path) -> None:
    """The admin's workflow: clone, edit, commit, push; the running watcher polls it in."""

    async def scenario() -> None:
        watcher = UsersWatcher(repo, DOMAIN, poll_interval=0.05)
        task = asyncio.create_task(watcher.run())
        try:
            clone = tmp_path / "clone"
            git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
            (clone / "dave").write_bytes(entry(["dave@gmail.test"]))
            (clone / "alice").write_bytes(entry(["alice@new.test"]))
            git("add", "dave", "alice", cwd=clone)
            git("commit", "-q", "-m", "dave; alice moves", cwd=clone)
            git("push", "-q", "origin", "HEAD", cwd=clone)
            for _ in range(400):
                if watcher.db.lookup("dave@our.test") is not None:
                    break
                await asyncio.sleep(0.02)
            dave = watcher.db.lookup("dave@our.test")
            assert dave is not None and dave.targets == ["dave@gmail.test"]
            alice = watcher.db.lookup("alice@our.test")
            assert alice is not None and alice.targets == ["alice@new.test"]
        finally:
            task.cancel()

    asyncio.run(scenario())
    # push updated the checked-out branch (updateInstead), and the tree is clean
    assert git("status", "--short", cwd=repo) == ""


def test_working_tree_edits_do_not_count_until_committed(repo: Path) -> None:
    watcher = UsersWatcher(repo, DOMAIN)
    (repo / "alice").write_bytes(b"{half-edited")
    (repo / "erin").write_bytes(entry([]))
    assert watcher.reload() is False
    assert watcher.db.lookup("erin") is None
    assert watcher.db.lookup("alice") is not None


def test_compare_and_swap_write(repo: Path) -> None:
    old = load_snapshot(repo, DOMAIN).lookup("alice")
    assert old is not None
    new_hash = passwords.hash_password("pw")

    def still(content: bytes | None) -> bool:
        return content is not None and json.loads(content)["password"] == old.password

    store.commit_file(repo, "alice", entry(["alice@gmail.test"], password="changed"), "admin")
    assert store.commit_file(repo, "alice", b"{}", "upgrade", expect=still) is None
    alice = load_snapshot(repo, DOMAIN).lookup("alice")
    assert alice is not None and passwords.verify(alice.password, "changed")
    assert not passwords.verify(alice.password, "pw") and new_hash


def test_sighup_reloads(repo: Path) -> None:
    import os
    import signal

    from poste.runtime import reloads
    from poste.runtime.run import Parts, Runtime

    async def scenario() -> None:
        watcher = UsersWatcher(repo, DOMAIN, poll_interval=3600)
        ready = asyncio.Event()
        running = asyncio.create_task(
            Runtime(Parts(reloads=[("users", reloads.users(watcher))])).serve(ready.set))
        await ready.wait()
        store.commit_file(repo, "frank", entry([]), "frank")
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(400):
            if watcher.db.lookup("frank") is not None:
                break
            await asyncio.sleep(0.02)
        assert watcher.db.lookup("frank") is not None
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(running, 10)

    asyncio.run(scenario())
