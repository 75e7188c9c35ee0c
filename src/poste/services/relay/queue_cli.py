"""`poste queue`: look into the relay's spool and act on it.

Works on the files directly (the format is in docs/relay.md), so it is usable
whether the relay runs or not; a running relay notices `retry` and `delete`
at its next spool rescan.  Changes go through the per-message lock that the
relay also takes (Spool.modify / Spool.remove), so neither side's write
silently undoes the other's.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time

import click

from poste.runtime.logs import escape
from poste.services.relay.audit import OVERDUE_SLACK, audit
from poste.services.relay.shards import spools
from poste.services.relay.spool import PENDING, Entry, Spool, SpoolError

spool_option = click.option(
    "--spool",
    "spool_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="The relay's spool folder.",
)


def _open(spool_dir: str) -> list[Spool]:
    """The spool and the shards of its relay workers (shards.py): every queued mail."""
    try:
        return spools(spool_dir)
    except SpoolError as exc:
        raise click.ClickException(str(exc)) from None


def _ids(found: list[Spool]) -> list[str]:
    return sorted(qid for spool in found for qid in spool.ids())


def _find(found: list[Spool], qid: str) -> Spool:
    """The folder whose envelope `qid` is (the spool itself when none: it says so)."""
    return next((s for s in found if s.envelope_path(qid).exists()), found[0])


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _echo(text: str) -> None:
    """One line for the terminal: peer-chosen text (HELO, replies) cannot drive it."""
    click.echo(escape(text))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Inspect and manage the relay's spool (the queue of mail not yet delivered)."""


@main.command("list")
@spool_option
@click.option("--json", "as_json", is_flag=True, help="One JSON envelope per line.")
def list_cmd(spool_dir: str, as_json: bool) -> None:
    """List queued messages: id, arrival, size, sender, pending recipients."""
    count = 0
    for entry in (e for spool in _open(spool_dir) for e in spool.entries()):
        count += 1
        if as_json:
            click.echo(json.dumps(entry.to_json(), sort_keys=True))
            continue
        pending = entry.pending
        sender = entry.return_path or "<>"
        _echo(
            f"{entry.id}  {_when(entry.created)}  {entry.size:>8}  {sender}"
            f"  next={_when(entry.next_attempt)}  tries={entry.attempts}"
        )
        for r in pending:
            reply = f"  ({r.last_reply})" if r.last_reply else ""
            _echo(f"    {r.address}{reply}")
    if not as_json:
        click.echo(f"-- {count} message(s) in queue", err=True)


@main.command()
@spool_option
@click.argument("queue_id")
@click.option("--body", is_flag=True, help="Also print the message itself.")
def show(spool_dir: str, queue_id: str, body: bool) -> None:
    """Show a message's envelope and delivery state (and the message with --body)."""
    spool = _find(_open(spool_dir), queue_id)
    try:
        entry = spool.load(queue_id)
    except SpoolError as exc:
        raise click.ClickException(str(exc)) from None
    _echo(f"id:           {entry.id}")
    peer = f"{entry.peer or '-'} ({entry.helo or '-'})"
    _echo(f"arrived:      {_when(entry.created)} from {peer}")
    _echo(f"return-path:  <{entry.return_path}>")
    _echo(f"size:         {entry.size}")
    _echo(f"attempts:     {entry.attempts}, next {_when(entry.next_attempt)}")
    _echo(f"dsn:          {'yes' if entry.is_dsn else 'no'}, warned={entry.warned}")
    for r in entry.recipients:
        orig = f" (for {r.original})" if r.original and r.original != r.address else ""
        _echo(f"rcpt:         {r.address}{orig} {r.state}, from <{r.sender}>")
        if r.last_reply:
            _echo(f"              {_when(r.last_attempt)} {r.remote_mta}: {r.last_reply}")
    if body:
        click.echo("")
        try:
            sys.stdout.buffer.write(spool.read_message(queue_id))
        except SpoolError as exc:
            raise click.ClickException(str(exc)) from None


@main.command()
@spool_option
@click.argument("queue_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every queued message.")
def retry(spool_dir: str, queue_ids: tuple[str, ...], everything: bool) -> None:
    """Make messages due now (a running relay picks them up at its next rescan)."""
    found = _open(spool_dir)
    ids = _ids(found) if everything else list(queue_ids)
    if not ids:
        raise click.UsageError("give queue ids or --all")
    def due_now(entry: Entry) -> Entry:
        entry.next_attempt = time.time()
        return entry

    for qid in ids:
        spool = _find(found, qid)
        try:
            entry = spool.modify(qid, due_now)
        except SpoolError as exc:
            if everything and not spool.envelope_path(qid).exists():
                continue  # delivered or deleted since we listed it
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"{qid}: {exc}") from None
        n = sum(1 for r in entry.recipients if r.state == PENDING) if entry else 0
        click.echo(f"{qid}: retry now ({n} recipient(s) pending)")


@main.command()
@spool_option
@click.argument("queue_ids", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every queued message.")
def delete(spool_dir: str, queue_ids: tuple[str, ...], everything: bool) -> None:
    """Remove messages from the queue, without any DSN."""
    found = _open(spool_dir)
    ids = _ids(found) if everything else list(queue_ids)
    if not ids:
        raise click.UsageError("give queue ids or --all")
    for qid in ids:
        spool = _find(found, qid)
        if not spool.envelope_path(qid).exists():
            if everything:
                continue
            raise click.ClickException(f"no message {qid} in {spool.path}")
        try:
            spool.remove(qid)
        except OSError as exc:
            raise click.ClickException(f"{qid}: {exc}") from None
        click.echo(f"{qid}: deleted")


@main.command()
@spool_option
@click.option("--slack", type=float, default=OVERDUE_SLACK, show_default=True,
              help="Seconds past its next attempt before a message counts as stalled.")
def check(spool_dir: str, slack: float) -> None:
    """Audit the spool: every acknowledged mail readable, complete and on its way.

    Exits 1 when something is wrong (one line per finding), 0 when all is well.
    """
    found = _open(spool_dir)
    findings = [f for spool in found for f in audit(spool, slack=slack)]
    for f in findings:
        _echo(f"{f.qid}: {f.problem}: {f.detail}")
    n = len(_ids(found))
    click.echo(f"-- {n} message(s) checked, {len(findings)} problem(s)", err=True)
    if findings:
        sys.exit(1)
