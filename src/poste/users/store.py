"""Writing to the users repository: one commit per change.

Used by `poste users` and by the submission server (argon2id upgrades).
A commit is built from HEAD's tree in memory (so it works on bare
repositories and never commits someone's unrelated working-tree edits), then
the changed file is also written to the working tree and index when there is
one, so `git status` stays clean.  Writers take an flock on a file in the Git
directory, and libgit2 refuses to move HEAD if it moved under us, so two
writers (the CLI and a running server) cannot lose each other's change.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pygit2

from poste.users.repo import UsersRepoError, check_tree, not_owned_problem, parse_entry

log = logging.getLogger("poste.users")

_FALLBACK_SIGNATURE = ("poste", "poste@localhost")


def init_repo(path: str | Path) -> pygit2.Repository:
    """Create a non-bare repository (branch main) that accepts pushes to its checked-out branch."""
    repo = pygit2.init_repository(str(path), bare=False, initial_head="main")
    # Admins clone it, edit, push back: update the working tree on push.
    repo.config["receive.denyCurrentBranch"] = "updateInstead"
    return repo


def open_repo(path: str | Path, create: bool = False) -> pygit2.Repository:
    try:
        return pygit2.Repository(str(path))
    except (pygit2.GitError, KeyError):
        problem = not_owned_problem(path)
        if problem:
            raise UsersRepoError(problem) from None
        if not create:
            raise UsersRepoError(f"{path}: not a Git repository") from None
    if Path(path).exists() and any(Path(path).iterdir()):
        raise UsersRepoError(f"{path}: exists, is not empty and is not a Git repository")
    return init_repo(path)


def entry_path(local: str, folder: str | None) -> str:
    """Where a user's file lives in the tree: root for the default domain, else the folder."""
    return f"{folder}/{local}" if folder else local


@contextmanager
def _locked(repo: pygit2.Repository) -> Iterator[None]:
    lock_path = Path(repo.path) / "poste-users.lock"
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _signature(repo: pygit2.Repository) -> pygit2.Signature:
    try:
        return repo.default_signature
    except (KeyError, pygit2.GitError):
        return pygit2.Signature(*_FALLBACK_SIGNATURE)


def read_file(repo: pygit2.Repository, path: str) -> bytes | None:
    """The committed content of `path` at HEAD, None if absent."""
    if repo.head_is_unborn:
        return None
    tree = repo.head.peel(pygit2.Commit).tree
    try:
        obj = tree[path]
    except KeyError:
        return None
    if obj.type_str != "blob":
        return None
    return bytes(repo[obj.id].peel(pygit2.Blob).data)


def _build_tree(
    repo: pygit2.Repository, base: pygit2.Tree | None, parts: list[str], blob: pygit2.Oid | None
) -> pygit2.Oid | None:
    """A copy of `base` with `parts` set to `blob` (None removes it); None when it ends up empty."""
    builder = repo.TreeBuilder(base) if base is not None else repo.TreeBuilder()
    name = parts[0]
    existing = builder.get(name)
    if len(parts) == 1:
        new: pygit2.Oid | None = blob
        mode = pygit2.GIT_FILEMODE_BLOB
    else:
        sub_base = None
        if existing is not None and existing.type_str == "tree":
            sub_base = repo[existing.id].peel(pygit2.Tree)
        new = _build_tree(repo, sub_base, parts[1:], blob)
        mode = pygit2.GIT_FILEMODE_TREE
    if new is None:
        if existing is not None:
            builder.remove(name)
    else:
        builder.insert(name, new, mode)
    if len(builder) == 0:
        return None  # Git has no empty folders: an emptied domain folder disappears
    return builder.write()


def commit_file(
    repo_path: str | Path,
    path: str,
    content: bytes | None,
    message: str,
    *,
    create: bool = False,
    expect: Callable[[bytes | None], bool] | None = None,
    check: bool = False,
) -> str | None:
    """Commit `content` at `path` (None deletes it); returns the new commit id.

    `expect` is checked against the current content under the lock; when it
    says no, nothing is written and None is returned (compare-and-swap).
    `check`: refuse (UsersRepoError) a commit the services' reader would refuse.
    """

    def transform(current: bytes | None) -> bytes | _Skip | None:
        if expect is not None and not expect(current):
            return SKIP
        return content

    return update_file(repo_path, path, transform, message, create=create, check=check)


class _Skip:
    pass


SKIP = _Skip()


def update_file(
    repo_path: str | Path,
    path: str,
    transform: Callable[[bytes | None], bytes | _Skip | None],
    message: str,
    *,
    create: bool = False,
    check: bool = False,
) -> str | None:
    """Commit `transform(current content)` at `path` under the lock.

    `transform` returns the new content, None to delete, or SKIP to leave
    the repository alone (then None is returned).  It runs with the lock
    held, on what HEAD holds right now, so a read-modify-write cannot lose a
    concurrent change.  `check`: refuse (UsersRepoError) to commit a tree the
    services' reader would refuse, so a writer can never leave them stuck.
    """
    repo = open_repo(repo_path, create=create)
    with _locked(repo):
        repo = pygit2.Repository(repo.path)  # fresh view of refs once locked
        content = transform(read_file(repo, path))
        if isinstance(content, _Skip):
            return None
        parents: list[pygit2.Oid] = []
        base: pygit2.Tree | None = None
        if not repo.head_is_unborn:
            head = repo.head.peel(pygit2.Commit)
            parents = [head.id]
            base = head.tree
        blob = repo.create_blob(content) if content is not None else None
        tree_id = _build_tree(repo, base, path.split("/"), blob)
        if tree_id is None:
            tree_id = repo.TreeBuilder().write()
        if check:
            _refuse_invalid(repo, repo[tree_id].peel(pygit2.Tree), base)
        sig = _signature(repo)
        oid = repo.create_commit("HEAD", sig, sig, message, tree_id, parents)
        if not repo.is_bare:
            _sync_workdir(repo, path, content)
        return str(oid)


def _refuse_invalid(repo: pygit2.Repository, tree: pygit2.Tree, base: pygit2.Tree | None) -> None:
    """Never commit a tree the services would refuse (they would keep refusing every later one)."""
    try:
        check_tree(repo, tree)
    except UsersRepoError as exc:
        if base is not None:
            try:
                check_tree(repo, base)
            except UsersRepoError as old:
                raise UsersRepoError(
                    f"HEAD is already refused by the services ({old}): fix that first, "
                    "with git or `poste users del`"
                ) from None
        raise UsersRepoError(f"the services would refuse this change: {exc}") from None


def _sync_workdir(repo: pygit2.Repository, path: str, content: bytes | None) -> None:
    """Mirror the committed change into the working tree and index (best effort)."""
    workdir = Path(repo.workdir)
    target = workdir / path
    try:
        if content is None:
            target.unlink(missing_ok=True)
            if target.parent != workdir and target.parent.exists():
                try:
                    target.parent.rmdir()
                except OSError:
                    pass
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.poste-tmp")
            tmp.write_bytes(content)
            os.replace(tmp, target)
        index = repo.index
        index.read()
        if content is None:
            try:
                index.remove(path)
            except (OSError, pygit2.GitError, KeyError):
                pass
        else:
            index.add(path)
        index.write()
    except (OSError, pygit2.GitError) as exc:
        log.warning("users repo: committed, but could not update the working tree: %s", exc)


def has_remote(repo_path: str | Path) -> bool:
    repo = open_repo(repo_path)
    return len(list(repo.remotes)) > 0


def push(repo_path: str | Path) -> None:
    """Push the current branch to its remote with the git CLI (it knows the user's SSH setup)."""
    proc = subprocess.run(
        ["git", "-C", str(repo_path), "push", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        # retry with an explicit remote/branch when no upstream is configured
        repo = open_repo(repo_path)
        if repo.head_is_unborn:
            raise UsersRepoError("nothing to push")
        branch = repo.head.shorthand
        remote = next(iter(repo.remotes)).name
        proc = subprocess.run(
            ["git", "-C", str(repo_path), "push", "--quiet", "-u", remote or "origin", branch],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or lines
            raise UsersRepoError(f"push failed: {lines[-1] if lines else 'git push failed'}")


def validate_content(local: str, domain: str, content: bytes, path: str) -> None:
    """Refuse to write an entry the loader would refuse."""
    parse_entry(local, domain, content, path)
