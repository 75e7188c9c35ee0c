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


@main.command()
@click.option("--key-dir", type=click.Path(file_okay=False), default=None,
              help="The signer's key folder (its `key-dir`).")
@click.option("--domain", "-d", default=None, help="The signing domain (d= tag).")
@click.option("--algorithm", "algorithms", multiple=True, type=click.Choice(["rsa", "ed25519"]),
              help="The series to rotate (repeatable; default: rsa).")
@click.option("--dns-server", default=None, metavar="IP[:PORT]",
              help="Primary DNS server to publish the new record to (RFC 2136).")
@click.option("--dns-key", default=None, metavar="NAME:ALG:SECRET",
              help="TSIG key allowed to update the zone.")
@click.option("--zone", default=None, help="Zone to update (default: --domain).")
@click.option("--ttl", type=click.IntRange(1, 86400), default=3600, show_default=True,
              help="TTL of the new record: the signer switches this long after it is visible.")
@click.option("--bits", type=int, default=2048, show_default=True, help="RSA key size (2048+).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="poste.toml: the [signer] key-dir, domain, dns-server, dns-key and zone.")
@click.option("--status", is_flag=True, help="Only show the selectors and their states.")
def rotate(key_dir: str | None, domain: str | None, algorithms: tuple[str, ...],
           dns_server: str | None, dns_key: str | None, zone: str | None, ttl: int, bits: int,
           config: str | None, status: bool) -> None:
    """Publish a new key under the next epoch's selector (rsa-2 after rsa-1, ed-1...).

    The signer switches to it once its record is visible on the primary and TTL seconds
    have passed, and withdraws the old record after its rotation-grace.
    """
    import asyncio
    from pathlib import Path

    from poste.services.signer import rotation as rot
    from poste.services.signer.service import dns_target

    if config:
        from poste.runtime.settings import ConfigError
        from poste.stack.config import load

        try:
            cfg = load(Path(config))
        except ConfigError as exc:
            raise click.ClickException(exc.render(lambda name: name)) from None
        sig = cfg["signer"].settings()
        key_dir = key_dir or sig["key-dir"]
        domain = domain or sig["domain"] or (cfg["relay"].get("domain") or [None])[0]
        dns_server, dns_key = dns_server or sig["dns-server"], dns_key or sig["dns-key"]
        zone = zone or sig["zone"]
    if not key_dir or not domain:
        raise click.UsageError("give --key-dir and --domain (or --config with [signer] key-dir)")
    folder = rot.KeyFolder(key_dir)
    try:
        if not status:
            if not dns_server or not dns_key:
                raise click.UsageError("give --dns-server and --dns-key: the new key is"
                                       " published before the signer may use it")
            with flag_errors():
                server, tsig = dns_target(dns_server, dns_key)
            primary = rot.Primary(server, tsig, zone or domain)
            for algorithm in algorithms or ("rsa",):
                entry = asyncio.run(rot.rotate(folder, domain.rstrip("."), algorithm, primary,
                                               ttl=ttl, bits=bits))
                word = "signing now" if entry.state == rot.ACTIVE else (
                    f"pending: the signer switches {entry.ttl} s after it is visible")
                click.echo(f"published: {entry.selector}._domainkey.{domain.rstrip('.')}."
                           f" TXT ({word})")
        for line in rot.summary(folder.read()):
            click.echo(line)
    except rot.RotationError as exc:
        raise click.ClickException(str(exc)) from None
