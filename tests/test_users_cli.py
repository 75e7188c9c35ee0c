"""`poste users`: every change is a commit the services load; passwords never on argv."""

from __future__ import annotations

import subprocess
from pathlib import Path

from poste.users import passwords
from poste.users.repo import UsersWatcher, load_snapshot
from support.cli import Ran, run_poste

DOMAIN = "our.test"


def run(poste_bin: str, *args: str, stdin: str = "") -> Ran:
    """`poste users ARGS` in this process (poste.cli.main); see run_real for the installed one."""
    return run_poste(["users", *args], input=stdin)


def run_real(poste_bin: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`poste users ARGS` through the installed entry point, as a user types it."""
    return subprocess.run(
        [poste_bin, "users", *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def ok(poste_bin: str, *args: str, stdin: str = "") -> str:
    proc = run(poste_bin, *args, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout


def test_round_trip(poste_bin: str, tmp_path: Path) -> None:
    repo = tmp_path / "users"
    r = ("--repo", str(repo))
    ok(
        poste_bin,
        "add",
        "alice",
        *r,
        "--target",
        "alice@gmail.test",
        "--password-stdin",
        stdin="s3cret\n",
    )
    ok(
        poste_bin,
        "add",
        "bob@other.test",
        *r,
        "--target",
        "bob@x.test",
        "--alias",
        "bobby",
        "--password-stdin",
        stdin="b0b\n",
    )
    watcher = UsersWatcher(repo, DOMAIN)
    alice = watcher.db.lookup("alice@our.test")
    assert alice is not None and alice.targets == ["alice@gmail.test"]
    assert alice.password is not None and alice.password.startswith("$argon2id$")
    assert passwords.verify(alice.password, "s3cret")
    assert watcher.db.lookup("bobby@other.test") is not None

    listing = ok(poste_bin, "list", *r)
    assert "alice\targon2id\talice@gmail.test" in listing
    assert "bob@other.test\targon2id\tbob@x.test" in listing
    assert ok(poste_bin, "list", *r, "--domain", "other.test").count("\n") == 1

    ok(poste_bin, "targets", "alice", *r, "--add", "alice2@outlook.test")
    ok(poste_bin, "targets", "alice", *r, "--remove", "alice@gmail.test")
    assert ok(poste_bin, "targets", "alice", *r).split() == ["alice2@outlook.test"]

    ok(poste_bin, "passwd", "bob", "--domain", "other.test", *r, "--password-stdin", stdin="n3w\n")
    ok(poste_bin, "del", "alice", *r)

    assert watcher.reload() is True
    assert watcher.db.lookup("alice@our.test") is None
    bob = watcher.db.lookup("bob@other.test")
    assert bob is not None and passwords.verify(bob.password, "n3w")
    assert not passwords.verify(bob.password, "b0b")

    log = git(repo, "log", "--format=%s")
    assert log.split("\n")[:5] == [
        "users: del alice",
        "users: passwd bob@other.test",
        "users: targets alice",
        "users: targets alice",
        "users: add bob@other.test",
    ]
    assert git(repo, "status", "--short") == ""  # the working tree follows the commits
    assert "s3cret" not in git(repo, "log", "-p") and "n3w" not in git(repo, "log", "-p")


def test_prompted_password_is_confirmed(poste_bin: str, tmp_path: Path) -> None:
    repo = tmp_path / "users"
    # Through the installed `poste` (no terminal: click's hidden prompt reads stdin).
    proc = run_real(poste_bin, "add", "carol", "--repo", str(repo), stdin="one\ntwo\none\none\n")
    assert proc.returncode == 0, proc.stderr
    assert "do not match" in proc.stderr.lower()
    carol = load_snapshot(repo, DOMAIN).lookup("carol")
    assert carol is not None and passwords.verify(carol.password, "one")


def test_pushes_to_remote(poste_bin: str, tmp_path: Path) -> None:
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True, capture_output=True)
    ok(poste_bin, "add", "dave", "--repo", str(clone), "--no-password", "--target", "d@x.test")
    # the service reads the remote (bare) repository: the user is there
    dave = load_snapshot(origin, DOMAIN).lookup("dave@our.test")
    assert dave is not None and dave.targets == ["d@x.test"] and dave.password is None


def test_errors_are_one_line(poste_bin: str, tmp_path: Path) -> None:
    repo = tmp_path / "users"
    ok(poste_bin, "add", "erin", "--repo", str(repo), "--no-password")
    cases = [
        (("add", "erin", "--repo", str(repo), "--no-password"), "already exists"),
        (("del", "nobody", "--repo", str(repo)), "no such user"),
        (("add", "bad name", "--repo", str(repo), "--no-password"), "not a valid local part"),
        (("add", "x", "--repo", str(repo), "--no-password", "--target", "nope"), "not a mail"),
        (("passwd", "erin", "--repo", str(repo), "--password-stdin"), "empty password"),
        (("targets", "erin", "--repo", str(repo), "--remove", "a@b.test"), "not a target"),
        (("list", "--repo", str(tmp_path / "missing")), "not a Git repository"),
    ]
    for args, message in cases:
        proc = run(poste_bin, *args)
        assert proc.returncode != 0, args
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
