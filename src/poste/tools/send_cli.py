"""`poste send` and `poste submit`: hand one mail to a server, as blaze does."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable

import aiosmtplib
import click

from poste.runtime.command import hostport_arg
from poste.smtp.client import SendResult, send_message
from poste.smtp.tls import client_context


def read_mail(path: str) -> bytes:
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None
    if not data:
        raise click.ClickException("the mail is empty")
    # A mail typed or saved on Unix has bare LF; SMTP wants CRLF.
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def report(result: SendResult) -> None:
    """Print each reply; exit non-zero unless every recipient was accepted."""
    failed = False
    for rcpt, reply in result.rcpt_replies.items():
        if not reply.ok:
            failed = True
            click.echo(f"{rcpt}: {reply}", err=True)
    if result.data_reply is None:
        raise click.ClickException("no recipient accepted, nothing sent")
    if not result.data_reply.ok:
        raise click.ClickException(f"refused: {result.data_reply}")
    click.echo(str(result.data_reply))
    if failed:
        sys.exit(1)


def deliver(
    mail: bytes,
    server: str,
    default_port: int,
    sender: str,
    recipients: tuple[str, ...],
    helo: str | None,
    cafile: str | None,
    username: str | None = None,
    password: str | None = None,
    implicit_tls: bool = False,
) -> None:
    host, port = hostport_arg(server, default_port)
    implicit = implicit_tls or (username is not None and port == 465)
    ctx = client_context(cafile)
    try:
        result = asyncio.run(
            send_message(
                host,
                port,
                sender,
                list(recipients),
                mail,
                helo=helo,
                implicit_tls=implicit,
                starttls=True if username is not None and not implicit else None,
                tls_context=ctx,
                username=username,
                password=password,
            )
        )
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise click.ClickException(f"authentication failed: {exc.code} {exc.message}") from None
    except aiosmtplib.SMTPResponseException as exc:
        raise click.ClickException(f"refused: {exc.code} {exc.message}") from None
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise click.ClickException(f"cannot send to {host}:{port}: {exc}") from None
    report(result)


def _envelope_options(func: Callable[..., None]) -> Callable[..., None]:
    """The arguments `send` and `submit` share (-h is HELO, as in blaze, so no -h for help)."""
    for decorator in reversed(
        [
            click.command(context_settings={"help_option_names": ["--help"]}),
            click.argument("mail", default="-", metavar="[MAIL|-]"),
            click.argument("server", metavar="SERVER[:PORT]"),
            click.option("-s", "--sender", required=True, help="Envelope sender (MAIL FROM)."),
            click.option("-r", "--rcpt", "recipients", multiple=True, required=True,
                         help="Recipient (repeatable)."),
            click.option("-h", "--helo", default=None, help="Name to give in EHLO."),
            click.option("--tls-verify", "cafile", type=click.Path(exists=True, dir_okay=False),
                         help="Verify the server's certificate against this CA file."),
        ]
    ):
        func = decorator(func)
    return func


@_envelope_options
def main(
    mail: str,
    server: str,
    sender: str,
    recipients: tuple[str, ...],
    helo: str | None,
    cafile: str | None,
) -> None:
    """Send MAIL (a file, or - for stdin) to SERVER (port 25 by default); STARTTLS when offered."""
    deliver(read_mail(mail), server, 25, sender, recipients, helo, cafile)


@click.option("--tls", "implicit_tls", is_flag=True,
              help="Implicit TLS whatever the port (465 always is).")
@click.option("-u", "--user", required=True, help="Login.")
@click.option(
    "-p", "--password", default=None, help="Password (default: $POSTE_PASSWORD, else a prompt)."
)
@_envelope_options
def submit(
    mail: str,
    server: str,
    sender: str,
    recipients: tuple[str, ...],
    user: str,
    password: str | None,
    implicit_tls: bool,
    helo: str | None,
    cafile: str | None,
) -> None:
    """Submit MAIL with AUTH: port 465 (or --tls) is implicit TLS, any other STARTTLS (587 default)."""
    data = read_mail(mail)
    if password is None:
        password = os.environ.get("POSTE_PASSWORD")
    if password is None:
        password = click.prompt("Password", hide_input=True, err=True)
    deliver(data, server, 587, sender, recipients, helo, cafile, user, password, implicit_tls)
