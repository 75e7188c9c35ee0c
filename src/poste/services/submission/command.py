"""`poste submission`: the command line of authenticated submission (see service.py)."""

from __future__ import annotations

from typing import Any

import click

from poste.runtime import workers
from poste.runtime.command import serve, with_settings
from poste.runtime.settings import Values
from poste.services.submission.service import build
from poste.services.submission.settings import SETTINGS


@click.command()
@with_settings(SETTINGS)
def main(values: dict[str, Any]) -> None:
    """Authenticated submission: 465 (implicit TLS) and 587 (STARTTLS), AUTH PLAIN/LOGIN.

    With neither --listen-tls nor --listen, both listen on their standard
    ports; with one of them, only that one.
    """
    serve(values, lambda: build(values), refusal)


def refusal(values: Values) -> str:
    """Several submission workers would each count failed logins for themselves (the
    AUTH brake's budgets, `auth-state`), multiplying what a guesser may try; in
    `poste up` submission runs in worker 0 only."""
    return workers.refusal(values) or (
        "the AUTH brake counts failed logins in one process (auth-state)")
