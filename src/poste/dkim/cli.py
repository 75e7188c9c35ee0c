"""`poste dkim keygen|sign|verify`: the DKIM tools (blaze's family)."""

from __future__ import annotations

import sys
from typing import BinaryIO

import click

from poste.dkim import keys as dkim_keys
from poste.dkim import verify as dkim_verify
from poste.dkim.sign import Unsignable
from poste.dns.records import zone_txt
from poste.dns.resolver import NameserverError
from poste.runtime.command import flag_errors, option
from poste.services.signer.options import make_signer
from poste.services.signer.settings import OVERSIGN, SIGN_HEADERS
from poste.services.verifier.spf import resolver_for


@click.group(name="dkim", context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """DKIM tools: make keys, sign a mail, verify its signatures."""


@main.command()
@click.option(
    "--algorithm",
    "-a",
    type=click.Choice(dkim_keys.ALGORITHMS),
    default="rsa",
    show_default=True,
)
@click.option("--bits", type=int, default=2048, show_default=True, help="RSA key size (2048+).")
@click.option("--selector", "-s", required=True, help="The selector (s= tag).")
@click.option("--domain", "-d", required=True, help="The signing domain (d= tag).")
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Key file."
)
def keygen(algorithm: str, bits: int, selector: str, domain: str, output: str) -> None:
    """Write a private key (PEM, mode 0600) and print the TXT record to publish."""
    try:
        key = dkim_keys.generate(algorithm, bits)
        dkim_keys.write_key(key, output)
    except dkim_keys.DKIMKeyError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror}") from None
    name = dkim_keys.record_name(selector, domain)
    click.echo(f"{name} IN TXT {zone_txt(key.txt_strings())}")


@main.command()
@click.argument("mail", default="-", type=click.File("rb"))
@click.option("--domain", "-d", required=True, help="The signing domain (d= tag).")
@click.option("--selector", "-s", "selectors", multiple=True, help="Selector, one per key.")
@click.option(
    "--private-key",
    "-k",
    "paths",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Key file (PEM); repeat with --selector for dual signing.",
)
@option(SIGN_HEADERS)
@option(OVERSIGN)
def sign(
    mail: BinaryIO,
    domain: str,
    selectors: tuple[str, ...],
    paths: tuple[str, ...],
    sign_headers: str | None,
    oversign: str | None,
) -> None:
    """Print MAIL (or stdin) with its DKIM-Signature fields on top."""
    with flag_errors():
        signer = make_signer(domain, selectors, paths, sign_headers, oversign)
    data = mail.read()
    # A file with bare LF line ends gets signature fields with LF too (SMTP uses CRLF).
    head = data.split(b"\n\n", 1)[0]
    linesep = b"\n" if b"\n" in head and b"\r\n" not in head else b"\r\n"
    try:
        fields = signer.sign(data, linesep)
    except Unsignable as exc:
        raise click.ClickException(f"cannot sign: {exc}") from None
    out = sys.stdout.buffer
    out.write(fields)
    out.write(data)
    out.flush()


@main.command()
@click.argument("mail", type=click.File("rb"))
@click.option(
    "--nameserver",
    "-n",
    "nameservers",
    multiple=True,
    metavar="[tcp:|udp:]IP[:PORT]",
    help="Resolver to fetch the keys from (default: the system's).",
)
@click.option("--verbose", "-v", is_flag=True, help="Say why a signature failed (on stderr).")
def verify(mail: BinaryIO, nameservers: tuple[str, ...], verbose: bool) -> None:
    """Check every DKIM signature of MAIL: `[OK]`, `[ER]` or `[TE]`, then `: domain`, each.

    The verdicts are the verifier service's (`dkim=` of its
    Authentication-Results): OK is pass, TE is temperror (the key could not
    be fetched: DNS trouble, try again later), ER is anything else.  Exits 0
    when there is at least one signature and all of them verify, 1 when one
    is ER, else 75 (EX_TEMPFAIL) when one is TE.
    """
    try:
        resolver = resolver_for(nameservers)
    except NameserverError as exc:
        raise click.BadParameter(str(exc), param_hint="--nameserver") from None
    data = mail.read()
    results = dkim_verify.verify(data, resolver)
    if not results:
        raise click.ClickException("no DKIM-Signature in the mail")
    for r in results:
        tag = {"pass": "OK", "temperror": "TE"}.get(r.result, "ER")
        click.echo(f"[{tag}]: {r.domain or '?'}")
        if verbose and r.result != "pass":
            key = f"{r.selector or '?'}._domainkey.{r.domain or '?'}"
            click.echo(f"  {key} a={r.algorithm or '?'}: {r.result}, {r.reason}", err=True)
    unchecked = dkim_verify.signature_count(data) - len(results)
    if unchecked > 0:
        click.echo(
            f"{unchecked} more DKIM-Signature fields not checked "
            f"(only the first {dkim_verify.MAX_SIGNATURES} are, as in the verifier)",
            err=True,
        )
    words = {r.result for r in results}
    if words - {"pass", "temperror"}:
        sys.exit(1)
    if "temperror" in words:
        sys.exit(75)
