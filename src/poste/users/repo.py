"""The users repository: a Git repository read with pygit2 (design.md section 4).

Layout (ptt's): at the root, one file per local part of the default domain,
named after it, holding JSON
`{"targets": ["a@b"], "password": "<hash>", "insecure": false}`; further
domains live in a folder named after the domain, with the same files inside.
poste adds an optional `"aliases": ["other", "x@another.domain"]` (more local
addresses that reach, and may be sent from by, the same user) and an optional
`"send-as": ["*@our.test"]` (header From/Sender addresses the user may also
use in submission, granted by the operator) and an optional
`"spam": "tag" | "quarantine" | "reject"` (what the relay does with a mail the
spamfilter labelled `yes`; absent means `tag`, today's behaviour, so every
older entry keeps meaning what it meant).

Only the committed tree at HEAD counts, never the working directory: a commit
is the unit of change, so an admin's half-edited file is never served.  A
snapshot (`UsersDB`) is immutable; `UsersWatcher` swaps in a new one when HEAD
moves and the new commit is valid, and keeps the last good one otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import pygit2
from prometheus_client import Gauge

from poste.smtp.address import domain_key
from poste.users import passwords

log = logging.getLogger("poste.users")

REFUSED = Gauge(
    "poste_users_refused_commit_since_timestamp_seconds",
    "Set while a users repository's HEAD is a commit the services refuse: since when "
    "(Unix time), labelled by repository and commit; the last good commit stays in service.",
    ["repo", "commit"],
)


def _unset_refused(repo: str, commit: str) -> None:
    try:
        REFUSED.remove(repo, commit)
    except KeyError:  # another watcher of the same repository removed it already
        pass


# How often a watcher stuck on a refused commit says so again in the log.
STUCK_REPORT_INTERVAL = 60.0

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
# Repository files that are not users (dotfiles are skipped too).
_IGNORED = {"README", "README.md", "README.txt", "LICENSE"}
# The root's domain when a writer does not know it (check_tree): not a valid domain name.
_UNKNOWN_ROOT = "root.invalid"


# What the relay does with a mail the spamfilter labelled `yes` (docs/users.md).
# `tag` is the default: a new or older entry forwards as before, so turning the
# policy on never holds or refuses a user's mail behind their back.
SPAM_POLICIES = ("tag", "quarantine", "reject")
DEFAULT_SPAM_POLICY = "tag"


class UsersRepoError(Exception):
    """The repository is missing or a commit in it is not a valid users database."""


def is_local_part(text: str) -> bool:
    return len(text) <= 64 and _LOCAL.fullmatch(text) is not None


def is_domain(text: str) -> bool:
    return len(text) <= 253 and _DOMAIN.fullmatch(text) is not None


def normalize_domain(domain: str) -> str:
    return domain_key(domain)


def split_address(address: str) -> tuple[str, str]:
    """`local@domain` (angle brackets allowed) -> (local, lower-cased domain).

    Raises ValueError for anything that is not a plain mailbox address.
    """
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    local, at, domain = text.rpartition("@")
    domain = normalize_domain(domain)
    if not at or not is_local_part(local) or not is_domain(domain):
        raise ValueError(f"not a mail address: {address!r}")
    return local, domain


def parse_target(value: object) -> str:
    """A target as ptt writes it (`a@b` or `Name <a@b>`) -> `a@b`."""
    if not isinstance(value, str):
        raise ValueError(f"target is not a string: {value!r}")
    _, addr = parseaddr(value)
    local, domain = split_address(addr or value)
    return f"{local}@{domain}"


@dataclass(frozen=True)
class User:
    """One local address and what the services need to know about it."""

    local: str
    domain: str
    targets: list[str]
    password: str | None = field(repr=False)
    insecure: bool = False
    aliases: tuple[str, ...] = ()  # further full addresses of this user
    path: str = ""  # where the entry lives in the repository tree
    # header From/Sender this user may also use in submission: `*@domain` or `local@domain`
    send_as: tuple[str, ...] = ()
    spam: str = "tag"  # SPAM_POLICIES: what the relay does with mail labelled spam

    def __hash__(self) -> int:  # targets is a list: hash by identity in the repository
        return hash((self.path, self.local, self.domain))

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address this user receives at and may send from."""
        return (self.address, *self.aliases)


def parse_entry(local: str, domain: str, data: bytes, path: str) -> User:
    """One repository file -> User; raises UsersRepoError saying what is wrong."""
    if not is_local_part(local):
        raise UsersRepoError(f"{path}: file name is not a valid local part")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsersRepoError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise UsersRepoError(f"{path}: not a JSON object")
    try:
        return user_from_json(local, domain, obj, path)
    except ValueError as exc:
        raise UsersRepoError(f"{path}: {exc}") from None


def user_from_json(local: str, domain: str, obj: Mapping[str, Any], path: str = "") -> User:
    """Validate one entry's JSON object (raises ValueError)."""
    targets_raw = obj.get("targets", [])
    if not isinstance(targets_raw, list):
        raise ValueError("targets is not a list")
    targets = [parse_target(t) for t in targets_raw]
    password = obj.get("password")
    if password is not None:
        if not isinstance(password, str):
            raise ValueError("password is not a string")
        if password == "":
            password = None
        elif not passwords.is_valid_hash(password):
            raise ValueError("password is neither hex BLAKE2B-512 nor an argon2id PHC string")
    insecure = obj.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ValueError("insecure is not true/false")
    aliases_raw = obj.get("aliases", [])
    if not isinstance(aliases_raw, list):
        raise ValueError("aliases is not a list")
    aliases: list[str] = []
    for alias in aliases_raw:
        if not isinstance(alias, str):
            raise ValueError(f"alias is not a string: {alias!r}")
        if "@" in alias:
            a_local, a_domain = split_address(alias)
        elif is_local_part(alias):
            a_local, a_domain = alias, domain
        else:
            raise ValueError(f"alias is not a local part or address: {alias!r}")
        aliases.append(f"{a_local}@{a_domain}")
    return User(
        local=local,
        domain=domain,
        targets=targets,
        password=password,
        insecure=insecure,
        aliases=tuple(aliases),
        path=path,
        send_as=parse_send_as(obj.get("send-as", [])),
        spam=parse_spam_policy(obj.get("spam", DEFAULT_SPAM_POLICY)),
    )


def parse_spam_policy(value: object) -> str:
    """`spam`: one of SPAM_POLICIES (raises ValueError otherwise)."""
    if not isinstance(value, str) or value not in SPAM_POLICIES:
        raise ValueError(f"spam is not one of {', '.join(SPAM_POLICIES)}: {value!r}")
    return value


def parse_send_as(value: object) -> tuple[str, ...]:
    """`send-as`: a list of `*@domain` (any address there) or `local@domain` (one address).

    Returned lower-cased in the domain, `*` kept; raises ValueError for anything else.
    """
    if not isinstance(value, list):
        raise ValueError("send-as is not a list")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"send-as entry is not a string: {item!r}")
        local, at, domain = item.strip().rpartition("@")
        if local == "*" and at and is_domain(normalize_domain(domain)):
            out.append(f"*@{normalize_domain(domain)}")
            continue
        try:
            a_local, a_domain = split_address(item)
        except ValueError:
            raise ValueError(
                f"send-as entry is neither *@domain nor an address: {item!r}"
            ) from None
        out.append(f"{a_local}@{a_domain}")
    return tuple(out)


def user_to_json(user: User) -> bytes:
    """The file content for `user`, in ptt's field order (aliases only when set)."""
    obj: dict[str, Any] = {
        "targets": list(user.targets),
        "password": user.password or "",
        "insecure": user.insecure,
    }
    if user.aliases:
        obj["aliases"] = [
            a.partition("@")[0] if a.endswith("@" + user.domain) else a for a in user.aliases
        ]
    if user.send_as:
        obj["send-as"] = list(user.send_as)
    if user.spam != DEFAULT_SPAM_POLICY:
        obj["spam"] = user.spam
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


@dataclass(frozen=True)
class UsersDB:
    """An immutable snapshot of the users repository at one commit."""

    default_domain: str
    users: Mapping[tuple[str, str], User] = field(default_factory=dict)  # (local.lower(), domain)
    domains: frozenset[str] = frozenset()
    commit: str | None = None  # hex id of the commit it was read from (None: empty repository)

    def lookup(self, address: str) -> User | None:
        """The user an address belongs to: exact local part, then without `+tag`, then aliases.

        `address` may be a bare local part (then it is in the default domain),
        which is what users type as their login.
        """
        text = address.strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1]
        local, at, domain = text.rpartition("@")
        if not at:
            local, domain = text, self.default_domain
        domain = normalize_domain(domain)
        if not local:
            return None
        key = local.lower()
        user = self.users.get((key, domain))
        if user is None and "+" in key:
            user = self.users.get((key.split("+", 1)[0], domain))
        return user

    def is_local_domain(self, domain: str) -> bool:
        return normalize_domain(domain) in self.domains

    def __iter__(self) -> Iterator[User]:
        """Each user once (aliases are not repeated), sorted by address."""
        seen: dict[str, User] = {}
        for user in self.users.values():
            seen.setdefault(user.path, user)
        return iter(sorted(seen.values(), key=lambda u: (u.domain, u.local)))

    def __len__(self) -> int:
        return len({u.path for u in self.users.values()})


def not_owned_problem(path: str | Path) -> str | None:
    """What to do when `path` is a repository that Git refuses because someone else owns it.

    libgit2, like git, will not open a repository owned by another user
    (after deploy.md's `chown -R poste: /etc/poste`, root's `poste users`
    meets exactly that); say whose it is and how to run the command instead.
    """
    folder = Path(path)
    git_dir = folder / ".git" if (folder / ".git").exists() else folder
    try:
        if not (git_dir / "HEAD").is_file():
            return None
        owner = git_dir.stat().st_uid
    except OSError:
        return None
    if owner == os.geteuid():
        return None
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = str(owner)
    return (
        f"{path} belongs to user {name}: run poste users as that user "
        f"(sudo -u {name} poste users ...), so the repository stays writable by the services"
    )


def _open(path: str | Path) -> pygit2.Repository:
    try:
        return pygit2.Repository(str(path))
    except (pygit2.GitError, KeyError) as exc:
        problem = not_owned_problem(path)
        if problem:
            raise UsersRepoError(problem) from None
        raise UsersRepoError(f"{path}: not a Git repository ({exc})") from None


def head_commit(path: str | Path) -> str | None:
    """Hex id of HEAD's commit, None for a repository with no commit yet."""
    repo = _open(path)
    if repo.head_is_unborn:
        return None
    return str(repo.head.target)


def entry_name_problem(name: str) -> str | None:
    """Why `name` cannot name a user's file in the repository (None: it can).

    The reader's own rules, shared with `poste users` so that the two never
    disagree: a file is a user only if its name is a local part, and dotfiles
    and README/LICENSE files are not users at all.  A '/' would make a folder.
    """
    if "/" in name:
        return f"{name!r}: a '/' cannot be in a user name (it would be a folder in the repository)"
    if name.startswith(".") or name in _IGNORED:
        return f"{name!r}: the repository's readers skip files of that name"
    if not is_local_part(name):
        return f"{name!r}: not a valid local part"
    return None


def load_snapshot(
    path: str | Path,
    default_domain: str,
    commit: str | None = None,
    extra_domains: tuple[str, ...] = (),
) -> UsersDB:
    """Read the tree of `commit` (default HEAD) into a UsersDB; UsersRepoError if invalid."""
    default_domain = normalize_domain(default_domain)
    domains = {default_domain, *(normalize_domain(d) for d in extra_domains)}
    repo = _open(path)
    if commit is None:
        if repo.head_is_unborn:
            return UsersDB(default_domain, {}, frozenset(domains), None)
        commit = str(repo.head.target)
    try:
        tree = repo.get(commit).peel(pygit2.Tree)  # type: ignore[union-attr]
    except (AttributeError, ValueError, pygit2.GitError, KeyError) as exc:
        raise UsersRepoError(f"{path}: cannot read commit {commit}: {exc}") from None
    users = read_tree(repo, tree, default_domain, domains)
    return UsersDB(default_domain, users, frozenset(domains), commit)


def check_tree(repo: pygit2.Repository, tree: pygit2.Tree) -> None:
    """Raise UsersRepoError if the services would refuse a commit of `tree`.

    The same reader as the services', for a writer (`poste users`) that does
    not know the services' --domain: the root's entries are read under a
    placeholder domain, and an alias in a domain that is no folder is taken
    as the root domain, of which there is only one.
    """
    read_tree(repo, tree, None, set())


def read_tree(
    repo: pygit2.Repository,
    tree: pygit2.Tree,
    default_domain: str | None,
    domains: set[str],
) -> dict[tuple[str, str], User]:
    """Every user of `tree` by (local.lower(), domain); adds the folders' domains to `domains`.

    `default_domain` None: the root's domain is unknown (see check_tree).
    """
    root = default_domain or _UNKNOWN_ROOT
    domains.add(root)
    entries: list[User] = []
    for item in tree:
        name = item.name or ""
        if name.startswith(".") or name in _IGNORED:
            continue
        if item.type_str == "tree":
            domain = normalize_domain(name)
            if not is_domain(domain):
                raise UsersRepoError(f"{name}/: folder name is not a domain")
            domains.add(domain)
            for sub in repo[item.id].peel(pygit2.Tree):
                sub_name = sub.name or ""
                if sub_name.startswith(".") or sub_name in _IGNORED:
                    continue
                if sub.type_str != "blob":
                    raise UsersRepoError(f"{name}/{sub_name}: nested folders are not allowed")
                blob = repo[sub.id].peel(pygit2.Blob)
                entries.append(parse_entry(sub_name, domain, blob.data, f"{name}/{sub_name}"))
        elif item.type_str == "blob":
            blob = repo[item.id].peel(pygit2.Blob)
            entries.append(parse_entry(name, root, blob.data, name))
        else:
            raise UsersRepoError(f"{name}: submodules are not allowed")

    users: dict[tuple[str, str], User] = {}
    for user in entries:
        key = (user.local.lower(), user.domain)
        if key in users:
            raise UsersRepoError(f"{user.path}: {user.address} is defined twice")
        users[key] = user
    root_guess: str | None = None
    for user in entries:
        for alias in user.aliases:
            a_local, _, a_domain = alias.rpartition("@")
            if a_domain not in domains:
                if default_domain is None and root_guess in (None, a_domain):
                    root_guess = a_domain  # may be the services' --domain
                    continue
                raise UsersRepoError(f"{user.path}: alias {alias} is not in a local domain")
            key = (a_local.lower(), a_domain)
            if key in users:
                raise UsersRepoError(
                    f"{user.path}: alias {alias} is already {users[key].path}'s address"
                )
            users[key] = user
    return users


class UsersWatcher:
    """Keeps a current `UsersDB` and reloads it when HEAD moves (poll, SIGHUP).

    A commit that does not load is refused with one log line and the last
    good snapshot stays in service; the next commit (e.g. the fix) is tried
    again.  `reload` is thread-safe and cheap when nothing changed (it reads
    HEAD only), so our own commits (password upgrades) are simply picked up.
    """

    def __init__(
        self,
        repo_path: str | Path,
        default_domain: str,
        poll_interval: float = 2.0,
        extra_domains: tuple[str, ...] = (),
    ) -> None:
        self.repo_path = Path(repo_path)
        self.default_domain = normalize_domain(default_domain)
        self.poll_interval = poll_interval
        self.extra_domains = extra_domains
        self.last_error: str | None = None
        self.reloads = 0  # successful swaps after the first load
        self.report_interval = STUCK_REPORT_INTERVAL
        self._lock = threading.Lock()
        self._refused: str | None = None
        self._refused_since = 0.0  # wall clock, for the log and /metrics
        self._reported = 0.0  # monotonic time of the last log line about it
        self._db = self._initial()

    @property
    def refused(self) -> tuple[str, float] | None:
        """(commit, since: Unix time) while HEAD is a refused commit, else None."""
        return (self._refused, self._refused_since) if self._refused else None

    def _refuse(self, commit: str, error: str) -> None:
        if self._refused and self._refused != commit:
            _unset_refused(str(self.repo_path), self._refused)
        self._refused = commit
        self._refused_since = time.time()
        self._reported = time.monotonic()
        self.last_error = error
        REFUSED.labels(str(self.repo_path), commit).set(self._refused_since)

    def _clear_refused(self) -> None:
        if self._refused:
            _unset_refused(str(self.repo_path), self._refused)
        self._refused = None
        self.last_error = None

    def _still_refused(self) -> None:
        """Say again, once a minute, that HEAD is stuck on a refused commit."""
        now = time.monotonic()
        if not self._refused or now - self._reported < self.report_interval:
            return
        self._reported = now
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._refused_since))
        log.error(
            "users repo: still refusing commit %s (HEAD) since %s (%d min): %s; "
            "serving %s; commit a fix to the repository",
            self._refused[:12],
            since,
            (time.time() - self._refused_since) // 60,
            self.last_error,
            (self._db.commit or "empty")[:12],
        )

    @property
    def db(self) -> UsersDB:
        return self._db

    def _load(self, commit: str | None) -> UsersDB:
        return load_snapshot(self.repo_path, self.default_domain, commit, self.extra_domains)

    def _initial(self) -> UsersDB:
        """HEAD, or if HEAD is bad the newest good commit on its first-parent line."""
        repo = _open(self.repo_path)
        if repo.head_is_unborn:
            log.warning("users repo %s has no commit yet: no users", self.repo_path)
            return self._load(None)
        head = str(repo.head.target)
        oid: str | None = head
        first_error: UsersRepoError | None = None
        for _ in range(100):
            if oid is None:
                break
            try:
                db = self._load(oid)
            except UsersRepoError as exc:
                first_error = first_error or exc
                log.error("users repo: refusing commit %s: %s", oid[:12], exc)
                parents = repo[oid].peel(pygit2.Commit).parent_ids
                oid = str(parents[0]) if parents else None
                continue
            if oid != head:
                self._refuse(head, str(first_error))
                log.warning("users repo: serving older commit %s (HEAD is invalid)", oid[:12])
            log.info("users repo: loaded %d users at %s", len(db), oid[:12])
            return db
        raise first_error or UsersRepoError(f"{self.repo_path}: no valid commit")

    def reload(self) -> bool:
        """Load HEAD if it moved; True when a new snapshot is in service."""
        with self._lock:
            try:
                head = head_commit(self.repo_path)
            except UsersRepoError as exc:
                self.last_error = str(exc)
                log.error("users repo: %s", exc)
                return False
            if head == self._refused:
                self._still_refused()
                return False
            if head == self._db.commit:
                self._clear_refused()  # HEAD moved back to the commit in service
                return False
            try:
                db = self._load(head)
            except UsersRepoError as exc:
                self._refuse(head or "", str(exc))
                log.error(
                    "users repo: refusing commit %s: %s; keeping %s",
                    (head or "")[:12],
                    exc,
                    (self._db.commit or "empty")[:12],
                )
                return False
            self._db = db
            self._clear_refused()
            self.reloads += 1
            log.info("users repo: loaded %d users at %s", len(db), (head or "")[:12])
            return True

    async def areload(self) -> bool:
        return await asyncio.to_thread(self.reload)

    async def run(self) -> None:
        """Poll HEAD every `poll_interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.areload()
            except Exception:  # a watcher that dies silently would freeze the users
                log.exception("users repo: reload failed")
