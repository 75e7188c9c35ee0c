"""Bad input to `poste users` never reaches the repository, so it never breaks a running stack.

Each refusal is one `Error: ...` line and a non-zero exit, with no commit; the
check is the services' own reader run on the tree the change would commit.  A
watcher whose HEAD is a refused commit (one made with plain git) says so again
every minute in the log and in /metrics, with the commit and since when.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from poste.users.repo import UsersWatcher
from support.cli import Ran, run_poste

DOMAIN = "our.test"
REFUSED = "poste_users_refused_commit_since_timestamp_seconds"


def users(poste_bin: str, *args: str, stdin: str = "") -> Ran:
    """`poste users ARGS` in this process, through poste.cli.main (test_users_cli runs the
    installed `poste users` itself)."""
    return run_poste(["users", *args], input=stdin)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def commits(repo: Path) -> int:
    return int(git(repo, "rev-list", "--count", "HEAD"))


@pytest.fixture
def repo(tmp_path: Path, poste_bin: str) -> Path:
    path = tmp_path / "users"
    made = users(poste_bin, "add", "alice", "--repo", str(path), "--target", "alice@far.test",
                 "--no-password")
    assert made.returncode == 0, made.stderr
    return path


def refused(proc: Ran) -> str:
    """The one line a refusal prints."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("add", "bad/name", "--no-password"), "'/'"),
        (("add", "README", "--no-password"), "skip"),
        (("add", ".hidden", "--no-password"), "skip"),
        (("add", "two words", "--no-password"), "not a valid local part"),
        (("add", "x" * 65, "--no-password"), "not a valid local part"),
        (("add", "bob", "--no-password", "--target", "nobody"), "not a mail address"),
        (("add", "bob", "--no-password", "--alias", "a b"), "alias"),
        (("add", "bob", "--no-password", "--domain", "no_domain"), "not a valid domain"),
        (("add", "bob@-bad-.test", "--no-password"), "not a valid domain"),
        # the reader's whole-repository rules: one entry per address, aliases unique
        (("add", "Alice", "--no-password"), "defined twice"),
        (("add", "carol", "--no-password", "--alias", "alice"), "already alice's address"),
        (("add", "dave", "--no-password", "--alias", "d@one.test", "--alias", "d@two.test"),
         "not in a local domain"),
        (("targets", "alice", "--add", "not-an-address"), "not a mail address"),
        (("del", "bad/name"), "'/'"),
        (("passwd", "x/y", "--password-stdin"), "'/'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else v,
)
def test_bad_input_is_one_line_and_no_commit(
    poste_bin: str, repo: Path, args: tuple[str, ...], says: str
) -> None:
    before = commits(repo)
    line = refused(users(poste_bin, *args, "--repo", str(repo), stdin="pw\n"))
    assert says in line
    assert commits(repo) == before
    # the stack keeps following the repository: the next good change is served
    watcher = UsersWatcher(repo, DOMAIN)
    ok = users(poste_bin, "add", "erin", "--repo", str(repo), "--no-password")
    assert ok.returncode == 0, ok.stderr
    assert watcher.reload() is True
    assert watcher.db.lookup("erin@our.test") is not None
    assert watcher.refused is None


def test_a_change_on_top_of_a_refused_head_is_refused_too(poste_bin: str, repo: Path) -> None:
    """When someone committed a bad file with git, `poste users` says to fix that first."""
    (repo / "broken").write_text("{not json")
    git(repo, "add", "broken")
    git(repo, "commit", "-q", "-m", "broken entry")
    line = refused(users(poste_bin, "add", "bob", "--repo", str(repo), "--no-password"))
    assert "HEAD is already refused" in line and "broken" in line
    fixed = users(poste_bin, "del", "broken", "--repo", str(repo))
    assert fixed.returncode != 0  # not an entry it can read; git is the way
    git(repo, "rm", "-q", "broken")
    git(repo, "commit", "-q", "-m", "fix")
    assert users(poste_bin, "add", "bob", "--repo", str(repo), "--no-password").returncode == 0


def _refused_samples() -> dict[tuple[str, str], float]:
    out = {}
    for fam in REGISTRY.collect():
        for s in fam.samples:
            if s.name == REFUSED:
                out[(s.labels["repo"], s.labels["commit"])] = s.value
    return out


def test_a_stuck_watcher_says_so_every_minute_in_the_log_and_metrics(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = UsersWatcher(repo, DOMAIN)
    good = git(repo, "rev-parse", "HEAD").strip()
    (repo / "bad").write_text('{"targets": "not a list"}')
    git(repo, "add", "bad")
    git(repo, "commit", "-q", "-m", "bad entry")
    bad = git(repo, "rev-parse", "HEAD").strip()

    caplog.set_level(logging.INFO, logger="poste.users")
    assert watcher.reload() is False
    assert watcher.refused is not None and watcher.refused[0] == bad
    since = watcher.refused[1]
    assert _refused_samples()[(str(repo), bad)] == since
    assert any(f"refusing commit {bad[:12]}" in r.getMessage() for r in caplog.records)

    caplog.clear()
    assert watcher.reload() is False  # within the minute: quiet
    assert not [r for r in caplog.records if "still refusing" in r.getMessage()]
    watcher.report_interval = 0.0  # "a minute later"
    assert watcher.reload() is False
    again = [r.getMessage() for r in caplog.records if "still refusing" in r.getMessage()]
    assert len(again) == 1
    assert bad[:12] in again[0] and "since" in again[0] and good[:12] in again[0]
    assert "targets is not a list" in again[0]

    git(repo, "rm", "-q", "bad")
    git(repo, "commit", "-q", "-m", "fix")
    assert watcher.reload() is True
    assert watcher.refused is None
    assert (str(repo), bad) not in _refused_samples()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the repository to another user")
def test_root_on_a_repository_owned_by_the_service_user(
    poste_bin: str, repo: Path, tmp_path: Path
) -> None:
    """After deploy.md's `chown -R poste: /etc/poste`, root is told how to run it, in one line."""
    owner = "nobody"
    subprocess.run(["chown", "-R", f"{owner}:", str(repo)], check=True)
    for args in (("list",), ("add", "bob", "--no-password"), ("del", "alice"),
                 ("targets", "alice")):
        line = refused(users(poste_bin, *args, "--repo", str(repo)))
        assert f"belongs to user {owner}" in line and f"sudo -u {owner} poste users" in line
        assert "not a Git repository" not in line
