"""`poste users`: manage the Git users repository, one commit per change.

Passwords never come from argv (they would sit in shell history and in
`ps`): they are prompted for (hidden, twice) or read from stdin.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click

from poste.users import passwords, store
from poste.users.repo import (
    DEFAULT_SPAM_POLICY,
    SPAM_POLICIES,
    User,
    UsersRepoError,
    entry_name_problem,
    is_domain,
    load_snapshot,
    normalize_domain,
    not_owned_problem,
    parse_target,
    user_from_json,
    user_to_json,
)

# The root's domain is not recorded in the repository; the CLI only needs a
# placeholder to validate entries.
_ROOT = "default.invalid"

repo_option = click.option(
    "--repo",
    "repo",
    required=True,
    envvar="POSTE_USERS_REPO",
    type=click.Path(file_okay=False, path_type=Path),
    help="The users repository (env POSTE_USERS_REPO).",
)
domain_option = click.option(
    "--domain", "domain", default=None, help="The user's domain folder (default: the root)."
)
password_stdin_option = click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from the first line of stdin instead of prompting.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Manage the Git users repository (ptt's layout).

    LOCAL alone is an entry at the root (the services' --domain); LOCAL@D or
    --domain D is the entry in folder D.  Each change is one commit, pushed
    when the repository has a remote.
    """


def _locate(name: str, domain: str | None) -> tuple[str, str | None]:
    """LOCAL[@DOMAIN] plus --domain -> (local, folder or None for the root)."""
    local, at, from_arg = name.rpartition("@")
    if not at:
        local, from_arg = name, ""
    folder = normalize_domain(domain or from_arg) or None
    if from_arg and domain and normalize_domain(from_arg) != normalize_domain(domain):
        raise click.UsageError(f"{name} is not in --domain {domain}")
    problem = entry_name_problem(local)
    if problem:
        raise click.UsageError(problem)
    if folder is not None and not is_domain(folder):
        raise click.UsageError(f"not a valid domain: {folder!r}")
    return local, folder


def _display(local: str, folder: str | None) -> str:
    return f"{local}@{folder}" if folder else local


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        password = click.prompt(
            "Password", hide_input=True, confirmation_prompt=True, err=True, type=str
        )
    if not password:
        raise click.ClickException("empty password")
    return password


def _current(repo: Path, local: str, folder: str | None) -> tuple[User, bytes] | None:
    path = store.entry_path(local, folder)
    problem = not_owned_problem(repo)
    if problem:
        raise click.ClickException(problem)
    try:
        git = store.open_repo(repo)
    except UsersRepoError:
        return None
    data = store.read_file(git, path)
    if data is None:
        return None
    try:
        obj: Any = json.loads(data.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        return user_from_json(local, folder or _ROOT, obj, path), data
    except (ValueError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{path}: cannot read the current entry: {exc}") from None


def _commit(repo: Path, user: User | None, path: str, message: str, create: bool = False) -> None:
    content = user_to_json(user) if user is not None else None
    if content is not None and user is not None:
        # refuse to write what the services would refuse to load
        try:
            store.validate_content(user.local, user.domain, content, path)
        except UsersRepoError as exc:
            raise click.ClickException(str(exc)) from None
    try:
        commit = store.commit_file(repo, path, content, message, create=create, check=True)
    except UsersRepoError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{message} ({(commit or '')[:12]})", err=True)
    try:
        if store.has_remote(repo):
            store.push(repo)
            click.echo("pushed", err=True)
    except UsersRepoError as exc:
        raise click.ClickException(f"committed locally; {exc}") from None


def _targets(values: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for value in values:
        try:
            target = parse_target(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--target") from None
        if target not in out:
            out.append(target)
    return out


@main.command()
@click.argument("name")
@repo_option
@domain_option
@click.option("--target", "targets", multiple=True, help="Forward mail to ADDR (repeatable).")
@click.option("--alias", "aliases", multiple=True, help="A further local address (repeatable).")
@click.option("--insecure", is_flag=True, help="Set ptt's insecure flag.")
@click.option("--no-password", is_flag=True, help="No login (a forward-only address).")
@click.option("--spam", "spam", type=click.Choice(SPAM_POLICIES), default=DEFAULT_SPAM_POLICY,
              show_default=True, help="What the relay does with mail labelled spam.")
@password_stdin_option
def add(
    name: str,
    repo: Path,
    domain: str | None,
    targets: tuple[str, ...],
    aliases: tuple[str, ...],
    insecure: bool,
    no_password: bool,
    spam: str,
    password_stdin: bool,
) -> None:
    """Add a user (creates the repository if it is missing)."""
    local, folder = _locate(name, domain)
    if _current(repo, local, folder) is not None:
        raise click.ClickException(f"{_display(local, folder)} already exists")
    hashed = None if no_password else passwords.hash_password(_read_password(password_stdin))
    try:
        user = user_from_json(
            local,
            folder or _ROOT,
            {
                "targets": _targets(targets),
                "password": hashed,
                "insecure": insecure,
                "aliases": list(aliases),
                "spam": spam,
            },
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    path = store.entry_path(local, folder)
    _commit(repo, user, path, f"users: add {_display(local, folder)}", create=True)


@main.command(name="del")
@click.argument("name")
@repo_option
@domain_option
def delete(name: str, repo: Path, domain: str | None) -> None:
    """Delete a user."""
    local, folder = _locate(name, domain)
    if _current(repo, local, folder) is None:
        raise click.ClickException(f"no such user: {_display(local, folder)}")
    _commit(repo, None, store.entry_path(local, folder), f"users: del {_display(local, folder)}")


@main.command(name="list")
@repo_option
@domain_option
def list_users(repo: Path, domain: str | None) -> None:
    """List users: address, password scheme, targets (root entries as bare local parts)."""
    try:
        db = load_snapshot(repo, _ROOT)
    except UsersRepoError as exc:
        raise click.ClickException(str(exc)) from None
    want = normalize_domain(domain) if domain else None
    for user in db:
        if want is not None and user.domain != want:
            continue
        shown = user.local if user.domain == _ROOT else user.address
        flags = [passwords.scheme(user.password) or "no-login"]
        if user.insecure:
            flags.append("insecure")
        if user.spam != DEFAULT_SPAM_POLICY:
            flags.append(f"spam={user.spam}")
        click.echo(f"{shown}\t{','.join(flags)}\t{' '.join(user.targets)}")


@main.command()
@click.argument("name")
@repo_option
@domain_option
@password_stdin_option
def passwd(name: str, repo: Path, domain: str | None, password_stdin: bool) -> None:
    """Set a user's password (stored as argon2id)."""
    local, folder = _locate(name, domain)
    current = _current(repo, local, folder)
    if current is None:
        raise click.ClickException(f"no such user: {_display(local, folder)}")
    user = current[0]
    hashed = passwords.hash_password(_read_password(password_stdin))
    new = dataclasses.replace(user, password=hashed)  # every other field kept
    _commit(repo, new, user.path, f"users: passwd {_display(local, folder)}")


@main.command()
@click.argument("name")
@repo_option
@domain_option
@click.option("--add", "to_add", multiple=True, help="Add a target (repeatable).")
@click.option("--remove", "to_remove", multiple=True, help="Remove a target (repeatable).")
@click.option("--set", "to_set", multiple=True, help="Replace all targets (repeatable).")
def targets(
    name: str,
    repo: Path,
    domain: str | None,
    to_add: tuple[str, ...],
    to_remove: tuple[str, ...],
    to_set: tuple[str, ...],
) -> None:
    """Show a user's targets, or change them with --add/--remove/--set."""
    local, folder = _locate(name, domain)
    current = _current(repo, local, folder)
    if current is None:
        raise click.ClickException(f"no such user: {_display(local, folder)}")
    user = current[0]
    if not (to_add or to_remove or to_set):
        for target in user.targets:
            click.echo(target)
        return
    new_targets = _targets(to_set) if to_set else list(user.targets)
    for target in _targets(to_add):
        if target not in new_targets:
            new_targets.append(target)
    removing = _targets(to_remove)
    missing = [t for t in removing if t not in new_targets]
    if missing:
        raise click.ClickException(f"not a target of {_display(local, folder)}: {missing[0]}")
    new_targets = [t for t in new_targets if t not in removing]
    new = dataclasses.replace(user, targets=new_targets)  # every other field kept
    _commit(repo, new, user.path, f"users: targets {_display(local, folder)}")


@main.command()
@click.argument("name")
@click.argument("policy", required=False, type=click.Choice(SPAM_POLICIES))
@repo_option
@domain_option
def spam(name: str, policy: str | None, repo: Path, domain: str | None) -> None:
    """Show a user's spam policy, or set it: tag, quarantine or reject (docs/users.md)."""
    local, folder = _locate(name, domain)
    current = _current(repo, local, folder)
    if current is None:
        raise click.ClickException(f"no such user: {_display(local, folder)}")
    user = current[0]
    if policy is None:
        click.echo(user.spam)
        return
    new = dataclasses.replace(user, spam=policy)  # every other field kept
    _commit(repo, new, user.path, f"users: spam {_display(local, folder)} {policy}")
