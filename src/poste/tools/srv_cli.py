"""`poste srv`: receive N mails and write them as received (blaze's `srv`)."""

from __future__ import annotations

import asyncio
import sys

import click

from poste.runtime import event_loop, logs
from poste.runtime.command import flag_errors, hostport_arg
from poste.runtime.tls import tls_files
from poste.smtp.server import Limits, SMTPService
from poste.smtp.stage import Reply, Stage
from poste.tools.srv import Mailbox, MailboxHop


def _parse_reply(text: str | None) -> Reply | None:
    if text is None:
        return None
    head, _, rest = text.strip().partition(" ")
    if len(head) != 3 or not head.isdigit() or head[0] not in "2345":
        raise click.BadParameter(f"not an SMTP reply 'CODE text': {text!r}")
    return Reply(int(head), rest or "Refused")



@click.command(context_settings={"help_option_names": ["--help"]})
@click.argument("address", default="127.0.0.1:2525", metavar="[ADDR:PORT]")
@click.option(
    "-o",
    "--output",
    default=None,
    metavar="FILE|DIR/",
    help="Write the mail to FILE, or each mail to DIR/N.eml (default: stdout).",
)
@click.option(
    "--count",
    default=1,
    show_default=True,
    type=click.IntRange(min=0),
    help="Exit after this many mails (0: never).",
)
@click.option(
    "--with-data",
    is_flag=True,
    help="Also record the envelope, as Return-Path: and Delivered-To: fields.",
)
@click.option("-k", "--key", type=click.Path(dir_okay=False), help="TLS key: offer STARTTLS.")
@click.option("-c", "--cert", type=click.Path(dir_okay=False), help="TLS certificate.")
@click.option("--hostname", default=None, help="Our name in the banner and in Received:.")
@click.option(
    "--rcpt-reply",
    default=None,
    metavar='"CODE text"',
    help="Answer every RCPT with this reply (to test senders).",
)
@click.option(
    "--data-reply",
    default=None,
    metavar='"CODE text"',
    help="Answer every DATA with this reply instead of storing (to test senders).",
)
@click.option("-v", "--verbose", count=True)
def main(
    address: str,
    output: str | None,
    count: int,
    with_data: bool,
    key: str | None,
    cert: str | None,
    hostname: str | None,
    rcpt_reply: str | None,
    data_reply: str | None,
    verbose: int,
) -> None:
    """Receive mails on ADDR:PORT and write each as received, with our Received: on top."""
    if verbose:
        logs.setup("plain", verbose)
    host, port = hostport_arg(address, 25)
    if output and not output.endswith("/") and count != 1:
        raise click.UsageError("with --count other than 1, -o must be a folder (ending in /)")
    with flag_errors():
        tls = tls_files({"tls-cert": cert, "tls-key": key})
    ctx = tls.ctx if tls else None
    box = Mailbox(output, count, with_data)
    hop = MailboxHop(box, _parse_reply(rcpt_reply), _parse_reply(data_reply))
    service = SMTPService(
        Stage(),
        hop,
        host=host,
        port=port,
        hostname=hostname,
        tls_context=ctx,
        limits=Limits(max_connections=200),
    )

    async def run() -> None:
        try:
            await service.start()
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        click.echo(f"listening on {service.sockname[0]}:{service.sockname[1]}", err=True)
        await box.done.wait()
        # Let the client read our 250 and say QUIT before we go.
        for _ in range(100):
            if not service.connections:
                break
            await asyncio.sleep(0.02)
        await service.stop()

    try:
        event_loop.run(run())  # the loop every serving process runs on
    except event_loop.EventLoopError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)
