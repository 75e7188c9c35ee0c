"""`poste spf check`: the verifier's SPF evaluation, as a tool."""

from __future__ import annotations

import ipaddress
import socket

import click

from poste.dns.resolver import NameserverError
from poste.services.verifier import spf


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """SPF tools (RFC 7208)."""


@main.command()
@click.option("--ip", "ip", required=True, help="The connecting client's IP address.")
@click.option("--sender", required=True, help="The MAIL FROM address ('' for the null sender).")
@click.option("--helo", default="", help="The HELO/EHLO name (default: the sender's domain).")
@click.option(
    "--nameserver",
    "nameservers",
    multiple=True,
    metavar="[tcp:|udp:]IP[:PORT]",
    help="DNS server to ask (repeatable; default: the system's resolver).",
)
@click.option("--header", is_flag=True, help="Print the Received-SPF: field, not just the result.")
@click.option("--receiver", default=None, help="Our host name in the field (default: this host).")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds per DNS query.")
def check(
    ip: str,
    sender: str,
    helo: str,
    nameservers: tuple[str, ...],
    header: bool,
    receiver: str | None,
    timeout: float,
) -> None:
    """Evaluate SPF for a client IP and sender; print the result word.

    Exit status is 0 whatever the result: it is a label, not a verdict.
    """
    if not timeout > 0:
        raise click.ClickException("--timeout must be positive")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise click.ClickException(f"--ip: {ip!r} is not an IP address") from None
    sender = sender.strip().strip("<>")
    if sender and "@" not in sender:
        raise click.ClickException(f"--sender: {sender!r} is not an address")
    if not helo:
        helo = sender.rpartition("@")[2]
    if not helo:
        raise click.ClickException("--helo is needed with the null sender")
    try:
        resolver = spf.resolver_for(nameservers, timeout)
    except NameserverError as exc:
        raise click.ClickException(f"--nameserver: {exc}") from None
    receiver = receiver or socket.getfqdn()
    result = spf.check_sync(ip, sender, helo, resolver, receiver=receiver)
    if header:
        click.echo(result.field(receiver))
    else:
        click.echo(result.result)
