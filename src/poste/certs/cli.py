"""`poste cert issue|renew|show`: the ACME certificate of a stack or of one service.

The certificate is the one `poste up` (or `poste verifier`/`poste submission`
with the same `--acme-*` flags) serves: give `--config poste.toml`, or the
flags.  A running stack loads a certificate renewed here at SIGHUP
(`systemctl reload poste-up`) or within the hour.  Every failure is one
`Error:` line and exit status 1; the certificate in place is never touched
unless a new one was issued.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from poste.runtime.command import with_settings
from poste.runtime.settings import ACME, HOSTNAME, ConfigError

SETTINGS = (*ACME, HOSTNAME.but(help="Our host name: the certificate's name without --acme-name."))


def _targets(values: dict[str, Any], config: str | None) -> list[Any]:
    """The ACMESettings asked for: from the stack's config, or from the flags."""
    from poste.runtime.certs import acme_settings

    if config:
        from poste.stack.build import acme_of
        from poste.stack.config import load

        defaults = {s.key: s.initial() for s in SETTINGS}
        given = [k for k, v in values.items() if v not in (None, [], "", defaults[k])]
        if given:
            raise click.UsageError(f"--config and --{given[0]}: give one or the other")
        try:
            found = acme_of(load(Path(config)))
        except ConfigError as exc:
            raise click.ClickException(exc.render(lambda name: name)) from None
        if not found:
            raise click.ClickException(f"{config}: no section sets acme-directory")
        return found
    if not values.get("acme-directory"):
        raise click.UsageError("give --config FILE or --acme-directory URL (and the other flags)")
    return [acme_settings(values)]


def _stamp(when: datetime.datetime) -> str:
    return when.isoformat(timespec="seconds")


def _obtain(acme: Any) -> None:
    from poste.certs.acme import ACMEError, obtain

    before = acme.store.info()
    try:
        info = asyncio.run(obtain(acme.store, acme.ca, acme.primary, acme.names))
    except ACMEError as exc:
        kept = (f"; kept the certificate valid until {_stamp(before.not_after)}"
                if before else "")
        raise click.ClickException(
            f"cannot obtain a certificate for {', '.join(acme.names)}: {exc}{kept}") from None
    click.echo(f"issued: {', '.join(info.names)}, valid until {_stamp(info.not_after)}"
               f" ({info.issuer}) in {acme.store.cert_path}")


def _command(func: Callable[..., None]) -> Callable[..., Any]:
    func = click.option("--config", type=click.Path(exists=True, dir_okay=False),
                        help="The stack's poste.toml (its acme-* keys and host names).")(func)
    return with_settings(SETTINGS)(func)


@click.group()
def main() -> None:
    """ACME certificates (DNS-01 by RFC 2136 + TSIG): issue, renew, show."""


@main.command()
@_command
def issue(values: dict[str, Any], config: str | None) -> None:
    """Obtain a new certificate now (whatever the folder holds)."""
    for acme in _targets(values, config):
        _obtain(acme)


@main.command()
@click.option("--force", is_flag=True, help="Renew even if it is not due.")
@_command
def renew(values: dict[str, Any], config: str | None, force: bool) -> None:
    """Renew the certificate if due (two thirds of its lifetime, or a name missing)."""
    now = datetime.datetime.now(datetime.UTC)
    for acme in _targets(values, config):
        info = acme.store.info()
        if info and info.covers(acme.names) and now < info.renew_at and not force:
            click.echo(f"not due: {', '.join(info.names)} valid until {_stamp(info.not_after)},"
                       f" renewal from {_stamp(info.renew_at)}")
            continue
        _obtain(acme)


@main.command()
@_command
def show(values: dict[str, Any], config: str | None) -> None:
    """What the certificate covers, who issued it, when it expires and is renewed
    (`--acme-state DIR` alone is enough)."""
    from poste.certs.store import Store, StoreError

    now = datetime.datetime.now(datetime.UTC)
    if not config and values.get("acme-state") and not values.get("acme-directory"):
        # only looking: the folder is enough
        names = tuple(values.get("acme-name") or ())
        targets: list[Any] = [SimpleNamespace(store=Store(values["acme-state"]), names=names)]
    else:
        targets = _targets(values, config)
    for acme in targets:
        try:
            info = acme.store.info()
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None
        if info is None:
            raise click.ClickException(
                f"no certificate in {acme.store.folder} yet: poste cert issue")
        days = info.expires_in(now) / 86400
        state = "EXPIRED" if days < 0 else f"expires in {days:.1f} days"
        missing = sorted(set(acme.names) - {n.lower() for n in info.names})
        click.echo(f"certificate: {acme.store.cert_path}")
        click.echo(f"key:         {acme.store.key_path}")
        click.echo(f"names:       {', '.join(info.names)}"
                   + (f" (missing: {', '.join(missing)})" if missing else ""))
        click.echo(f"issuer:      {info.issuer}")
        click.echo(f"serial:      {info.serial:x}")
        click.echo(f"valid:       {_stamp(info.not_before)} to {_stamp(info.not_after)} ({state})")
        click.echo(f"renewal:     from {_stamp(info.renew_at)}")
