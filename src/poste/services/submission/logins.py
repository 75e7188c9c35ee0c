"""Checking logins against the users repository, for the submission server.

The password check is slow on purpose (argon2id: 19 MiB and tens of
ms), so it runs in threads behind a semaphore: a burst of logins cannot
stall the event loop or take all the memory.  What may be checked at all,
and when a failure is answered, is the AUTH brake's business (brake.py).
Every check costs exactly one argon2id verification, whatever the account:
a BLAKE2B account and an unknown login also verify against a dummy argon2id
hash, so the time of a failure tells nothing.  A successful login with ptt's
unsalted BLAKE2B hash rewrites it as argon2id in the repository, in the
background.  A success is remembered for a short time (login_cache.py), so a
client that logs in for each mail pays one check, not one per mail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets

from poste.services.submission.brake import AuthBrake, Refused
from poste.services.submission.login_cache import LoginCache
from poste.users import passwords, store
from poste.users.repo import User, UsersDB, UsersRepoError, UsersWatcher

log = logging.getLogger("poste.submission")


def resolve_login(db: UsersDB, login: str) -> User | None:
    """The user a login names: full address, alias, or bare local part of the default domain.

    `user+tag` is not a login (it is an address to receive at).
    """
    user = db.lookup(login)
    if user is None:
        return None
    typed = login.strip().lower()
    if "@" not in typed:
        typed = f"{typed}@{db.default_domain}"
    if typed in (a.lower() for a in user.addresses):
        return user
    return None


def may_send_as(db: UsersDB, login: str, sender: str) -> bool:
    """Whether the logged-in user owns `sender`: their address, an alias, or one with a +tag."""
    user = resolve_login(db, login)
    if user is None or not sender:
        return False
    owner = db.lookup(sender)
    return owner is not None and owner.path == user.path


def account_key(db: UsersDB, user: User | None, login: str) -> str:
    """What the per-account budget counts: the user's entry, or the login as typed (unknown)."""
    if user is not None:
        return user.path
    typed = login.strip().lower()
    if "@" not in typed:
        typed = f"{typed}@{db.default_domain}"
    return f"?{typed}"


class Authenticator:
    """Checks logins off the event loop, behind the AUTH brake; upgrades old hashes."""

    def __init__(
        self,
        watcher: UsersWatcher,
        *,
        throttle: AuthBrake | None = None,
        concurrency: int = 4,
        upgrade: bool = True,
        cache_ttl: float = 60.0,
    ) -> None:
        self.watcher = watcher
        self.brake = throttle or AuthBrake()
        self.upgrade = upgrade
        self._sem = asyncio.Semaphore(concurrency)
        # Unknown users and BLAKE2B accounts cost an argon2id check too (same parameters
        # as a fresh hash), so timing tells neither who exists nor how their hash is kept.
        self._dummy = passwords.hash_password(secrets.token_hex(16))
        self._upgrading: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.upgrades = 0
        self.checks = 0  # password checks run (tests, operators)
        self.cache = LoginCache(cache_ttl)
        self._cache_db: UsersDB | None = None  # the snapshot the cache was last checked against

    def _check_sync(self, stored: str | None, password: str) -> bool:
        """One argon2id verification whatever `stored` is, then the real answer."""
        if passwords.scheme(stored) == passwords.SCHEME_ARGON2ID:
            return passwords.verify(stored, password)
        ok = passwords.verify(stored, password) if stored else False
        passwords.verify(self._dummy, password)  # the argon2id cost every check pays
        return ok

    async def _verify(self, stored: str | None, password: str) -> tuple[bool, float]:
        """(whether it matched, when the check began on the brake's clock)."""
        async with self._sem:
            self.checks += 1
            began = self.brake.clock()
            ok = await asyncio.to_thread(self._check_sync, stored, password)
            self.brake.observe(self.brake.clock() - began)
            return ok, began

    async def check(self, ip: str, login: str, password: str) -> tuple[User | None, str | None]:
        """(user, None) on success, or (None, reason): "locked", "busy" or "invalid".

        A failure has already waited its delay when this returns.
        """
        db = self.watcher.db
        if db is not self._cache_db:  # a new commit: drop what a changed hash made stale
            self._cache_db = db
            hashes = {u.path: u.password for u in db}
            self.cache.forget(hashes.get)
        user = resolve_login(db, login)
        account = account_key(db, user, login)
        try:
            async with self.brake.gate(ip):
                ticket = self.brake.admit(ip, account)
                stored = user.password if user is not None else None
                if user is not None and stored and self.cache.hit(user.path, stored, password):
                    self.brake.success(ticket)
                    log.info("auth ok ip=%s user=%s (remembered)", ip, user.address)
                    return user, None
                ok, began = await self._verify(stored, password)
                if ok and user is not None and stored:
                    self.brake.success(ticket)
                    self.cache.remember(user.path, stored, password)
                    log.info("auth ok ip=%s user=%s", ip, user.address)
                    if self.upgrade and passwords.needs_upgrade(stored):
                        self._start_upgrade(user, stored, password)
                    return user, None
                failures, wait, locked = self.brake.failure(ticket, began)
                log.warning(
                    "auth failed ip=%s login=%r failures=%d delay=%.2fs%s",
                    ip,
                    login,
                    failures,
                    self.brake.delays[-1],
                    f" (locked out: {', '.join(locked)})" if locked else "",
                )
                await asyncio.sleep(wait)
                return None, "invalid"
        except Refused as refused:
            log.warning(
                "auth refused ip=%s login=%r: %s%s",
                ip,
                login,
                refused.reason,
                f", locked out for {refused.seconds:.0f}s" if refused.seconds else "",
            )
            return None, "busy" if refused.reason == "busy" else "locked"

    def _start_upgrade(self, user: User, stored: str, password: str) -> None:
        if user.path in self._upgrading:
            return
        self._upgrading.add(user.path)
        task = asyncio.get_running_loop().create_task(self._upgrade(user, stored, password))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _upgrade(self, user: User, stored: str, password: str) -> None:
        try:
            async with self._sem:
                new_hash = await asyncio.to_thread(passwords.hash_password, password)
            commit = await asyncio.to_thread(self._commit_upgrade, user, stored, new_hash)
            if commit is None:
                log.info("hash upgrade for %s skipped: the entry changed meanwhile", user.address)
                return
            self.upgrades += 1
            log.info("hash upgrade for %s: argon2id (commit %s)", user.address, commit[:12])
            await self.watcher.areload()
        except (UsersRepoError, OSError) as exc:
            log.error("hash upgrade for %s failed: %s", user.address, exc)
        except Exception:
            log.exception("hash upgrade for %s failed", user.address)
        finally:
            self._upgrading.discard(user.path)

    def _commit_upgrade(self, user: User, stored: str, new_hash: str) -> str | None:
        def transform(current: bytes | None) -> bytes | store._Skip:
            if current is None:
                return store.SKIP
            try:
                obj = json.loads(current)
            except ValueError:
                return store.SKIP
            if not isinstance(obj, dict) or obj.get("password") != stored:
                return store.SKIP
            obj["password"] = new_hash  # every other field is kept as it was
            return (json.dumps(obj, indent=2) + "\n").encode("utf-8")

        commit = store.update_file(
            self.watcher.repo_path,
            user.path,
            transform,
            f"users: upgrade {user.address}'s password hash to argon2id",
        )
        if commit is not None and store.has_remote(self.watcher.repo_path):
            try:
                store.push(self.watcher.repo_path)
            except UsersRepoError as exc:
                log.warning("hash upgrade committed locally; %s", exc)
        return commit

    async def drain(self) -> None:
        """Wait for background upgrades (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
