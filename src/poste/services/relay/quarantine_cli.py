"""`poste quarantine`: the spam the relay holds for `quarantine` users (quarantine.py).

Works on the files in SPOOL/quarantine, whether the relay runs or not.
`release` puts the mail into the spool unchanged, where a running relay
finds it at its next rescan (`queue-rescan`) and delivers it like any
other; `digest --now` asks the running relay (which has the DKIM keys and
the users) to send the digests within a second.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time

import click

from poste.runtime.logs import escape
from poste.services.relay.quarantine import Quarantine, QuarantineError
from poste.services.relay.spool import Spool, SpoolError

spool_option = click.option(
    "--spool", "spool_dir", required=True, type=click.Path(file_okay=False),
    help="The relay's spool folder (the quarantine is its quarantine/ folder).",
)


def _open(spool_dir: str) -> tuple[Spool, Quarantine]:
    try:
        spool = Spool(spool_dir, create=False)
    except SpoolError as exc:
        raise click.ClickException(str(exc)) from None
    return spool, Quarantine(spool.path, create=False)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _echo(text: str) -> None:
    click.echo(escape(text))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Inspect, release and delete the spam held for `quarantine` users."""


@main.command("list")
@spool_option
@click.option("--user", help="Only the mail held for this address.")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line.")
def list_cmd(spool_dir: str, user: str | None, as_json: bool) -> None:
    """List held mail: id, held since, size, user, From, Subject."""
    _, q = _open(spool_dir)
    count = 0
    for h in q.entries():
        if user and h.user.lower() != user.lower():
            continue
        count += 1
        if as_json:
            click.echo(json.dumps(h.to_json(), sort_keys=True))
            continue
        _echo(f"{h.id}  {_when(h.held)}  {h.entry.size:>8}  {h.user}  {h.sender}  {h.subject}")
    if not as_json:
        click.echo(f"-- {count} mail(s) held", err=True)


@main.command()
@spool_option
@click.argument("qid")
@click.option("--body", is_flag=True, help="Also print the message itself.")
def show(spool_dir: str, qid: str, body: bool) -> None:
    """Show one held mail (and the message, as it would be forwarded, with --body)."""
    _, q = _open(spool_dir)
    try:
        h = q.load(qid)
        data = q.read_message(qid) if body else b""
    except QuarantineError as exc:
        raise click.ClickException(str(exc)) from None
    _echo(f"id:          {h.id}")
    _echo(f"held:        {_when(h.held)} for {h.user}, in a digest: {'yes' if h.digested else 'no'}")
    _echo(f"return-path: <{h.entry.return_path}>")
    _echo(f"from:        {h.sender}")
    _echo(f"subject:     {h.subject}")
    _echo(f"date:        {h.date}")
    _echo(f"size:        {h.entry.size}")
    for r in h.entry.recipients:
        _echo(f"to:          {r.address} (for {r.original}), from <{r.sender}>")
    if body:
        click.echo("")
        sys.stdout.buffer.write(data)


@main.command()
@spool_option
@click.argument("qids", nargs=-1, required=True)
def release(spool_dir: str, qids: tuple[str, ...]) -> None:
    """Forward held mail unchanged, through the spool (the relay delivers it at its next rescan)."""
    spool, q = _open(spool_dir)
    for qid in qids:
        try:
            h = q.release(qid, spool)
        except (QuarantineError, OSError) as exc:
            raise click.ClickException(f"{qid}: {exc}") from None
        click.echo(f"{qid}: released to {', '.join(r.address for r in h.entry.recipients)}")


@main.command()
@spool_option
@click.argument("qids", nargs=-1, required=True)
def delete(spool_dir: str, qids: tuple[str, ...]) -> None:
    """Delete held mail for good (the journal keeps a line for each)."""
    _, q = _open(spool_dir)
    for qid in qids:
        try:
            q.delete(qid)
        except (QuarantineError, OSError) as exc:
            raise click.ClickException(f"{qid}: {exc}") from None
        click.echo(f"{qid}: deleted")


@main.command()
@spool_option
@click.option("--now", is_flag=True, required=True, help="Send the digests now.")
@click.option("--wait", "wait", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the running relay to take the request (0: don't).")
def digest(spool_dir: str, now: bool, wait: float) -> None:
    """Ask the running relay to send every pending digest now."""
    _, q = _open(spool_dir)
    try:
        q.path.mkdir(exist_ok=True)
        q.request_digest()
    except OSError as exc:
        raise click.ClickException(f"cannot ask for a digest: {exc}") from None
    deadline = time.monotonic() + wait
    while wait and q.digest_requested():
        if time.monotonic() > deadline:
            raise click.ClickException(
                f"no relay took the request within {wait:g} s (is it running on this spool?); "
                "it stays asked for")
        time.sleep(0.1)
    click.echo("digest requested" + (" and taken by the relay" if wait else ""))
