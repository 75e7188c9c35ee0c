"""`poste arc sign|verify`: ARC (RFC 8617) on a mail file, as the relay seals and the verifier checks."""

from __future__ import annotations

import sys
from typing import BinaryIO

import click

from poste.dkim import arc
from poste.dkim.keys import DKIMKeyError
from poste.dkim.sign import pair_keys
from poste.dns.resolver import NameserverError
from poste.services.verifier.spf import resolver_for


@click.group(name="arc", context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """ARC tools: seal a mail, validate its chain."""


@main.command()
@click.argument("mail", default="-", type=click.File("rb"))
@click.option("--domain", "-d", required=True, help="The sealing domain (d= tag).")
@click.option("--selector", "-s", required=True, help="The selector of the key (s= tag).")
@click.option("--private-key", "-k", "path", required=True, type=click.Path(dir_okay=False),
              help="An RSA key (PEM): ARC seals with rsa-sha256 only.")
@click.option("--authserv-id", required=True, metavar="NAME",
              help="Whose Authentication-Results the seal carries (the verifier's host name).")
def sign(mail: BinaryIO, domain: str, selector: str, path: str, authserv_id: str) -> None:
    """Print MAIL (or stdin) with the next ARC set on top, as the relay seals a forwarded mail."""
    try:
        [key] = pair_keys(domain, [selector], [path])
        sealer = arc.Sealer(key, authserv_id)
    except DKIMKeyError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    data = mail.read()
    head = data.split(b"\n\n", 1)[0]
    linesep = b"\n" if b"\n" in head and b"\r\n" not in head else b"\r\n"
    try:
        fields = sealer.seal(data, linesep)
    except arc.Unsealable as exc:
        raise click.ClickException(f"cannot seal: {exc}") from None
    out = sys.stdout.buffer
    out.write(fields)
    out.write(data)
    out.flush()


@main.command()
@click.argument("mail", type=click.File("rb"))
@click.option("--nameserver", "-n", "nameservers", multiple=True, metavar="[tcp:|udp:]IP[:PORT]",
              help="Resolver to fetch the keys from (default: the system's).")
def verify(mail: BinaryIO, nameservers: tuple[str, ...]) -> None:
    """Validate the ARC chain of MAIL: `pass`, `fail` or `none`, as the verifier's `arc=`.

    One line: the result, the newest instance (i=), its sealer (d=), and
    oldest-pass for a chain that passes, or why it fails.  Exits 0 for pass,
    1 for fail or no chain.
    """
    try:
        resolver = resolver_for(nameservers)
    except NameserverError as exc:
        raise click.BadParameter(str(exc), param_hint="--nameserver") from None
    result = arc.verify(mail.read(), resolver)
    if result.result == "none":
        raise click.ClickException("no ARC set in the mail")
    line = f"{result.result} i={result.instance} d={result.domain or '?'}"
    if result.result == "pass":
        click.echo(f"{line} oldest-pass={result.oldest_pass}")
        return
    click.echo(f"{line}: {result.reason}")
    sys.exit(1)
