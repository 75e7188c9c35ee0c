"""Reload jobs more than one service runs on SIGHUP."""

from __future__ import annotations

import logging

from poste.runtime.run import Job
from poste.users.repo import UsersWatcher

log = logging.getLogger("poste")


def users(watcher: UsersWatcher) -> Job:
    """Read the users repository's HEAD now, rather than at the next poll."""

    async def reload() -> None:
        changed = await watcher.areload()
        log.info("reload: users %s", "reloaded" if changed else "unchanged")

    return reload
