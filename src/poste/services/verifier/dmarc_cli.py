"""`poste dmarc check`: the verifier's whole judgement of a mail file (SPF, DKIM, ARC, DMARC)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import BinaryIO

import click

from poste.dns.resolver import NameserverError
from poste.services.verifier.authenticate import Authenticator
from poste.services.verifier.spf import resolver_for
from poste.smtp.message import Message


@click.group(name="dmarc", context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """DMARC tools (RFC 7489)."""


@main.command()
@click.argument("mail", type=click.File("rb"))
@click.option("--ip", "ip", required=True, help="The connecting client's IP address.")
@click.option("--sender", required=True, help="The MAIL FROM address ('' for the null sender).")
@click.option("--helo", required=True, help="The HELO/EHLO name.")
@click.option("--nameserver", "-n", "nameservers", multiple=True, metavar="[tcp:|udp:]IP[:PORT]",
              help="DNS server to ask (repeatable; default: the system's resolver).")
@click.option("--header", is_flag=True,
              help="Print the Authentication-Results: field, not just the DMARC result.")
@click.option("--receiver", default=None, help="Our host name in the field (default: this host).")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds per DNS query.")
def check(
    mail: BinaryIO, ip: str, sender: str, helo: str, nameservers: tuple[str, ...], header: bool,
    receiver: str | None, timeout: float,
) -> None:
    """Judge MAIL as the verifier would, had it come from IP with HELO and MAIL FROM SENDER.

    Prints the DMARC result word (pass, fail, none, permerror, temperror),
    or with --header the verifier's Received-SPF and Authentication-Results
    fields (spf, dkim, arc, dmarc).  Exit status 0 whatever the result.
    """
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise click.BadParameter(f"{ip!r} is not an IP address", param_hint="--ip") from None
    sender = sender.strip().strip("<>")
    if sender and "@" not in sender:
        raise click.BadParameter(f"{sender!r} is not an address", param_hint="--sender")
    try:
        resolver = resolver_for(nameservers, timeout)
    except NameserverError as exc:
        raise click.BadParameter(str(exc), param_hint="--nameserver") from None
    auth = Authenticator(resolver, receiver or socket.getfqdn())
    report = asyncio.run(auth.check(ip, sender, helo, Message.of(mail.read())))
    if header:
        click.echo(auth.fields(report, ip=ip).decode("ascii", "replace"), nl=False)
    else:
        click.echo(report.dmarc.result if report.dmarc else "none")
