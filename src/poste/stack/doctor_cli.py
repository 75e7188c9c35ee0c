"""`poste doctor`: the command line of doctor.py."""

from __future__ import annotations

import ipaddress

import click

from poste.smtp.address import domain_key
from poste.stack.doctor import MISSING, WRONG, Doctor


@click.command()
@click.option("--domain", required=True, metavar="D", help="The mail domain to check.")
@click.option("--nameserver", "nameservers", multiple=True, metavar="[tcp:|udp:]IP[:PORT]",
              help="DNS server to ask (repeatable; default: the system's).")
@click.option("--address", "addresses", multiple=True, metavar="IP",
              help="Our server's public address (repeatable; default: the MX host's).")
@click.option("--hostname", default=None, metavar="NAME",
              help="Our MX host name (default: the first MX of the domain).")
@click.option("--helo", "helo_names", multiple=True, metavar="NAME",
              help="A name our relay greets with, whose SPF a bounce needs (repeatable; "
                   "default: --hostname, else the first MX).")
@click.option("--selector", "selectors", multiple=True, metavar="S", help="DKIM selector.")
@click.option("--dkim-key", "dkim_keys", multiple=True, type=click.Path(dir_okay=False),
              help="Our DKIM private key for --selector (the record must match it).")
@click.option("--smtp-port", default=25, show_default=True, type=click.IntRange(1, 65535),
              help="Port of the certificate check (change only for tests).")
@click.option("--https-port", default=443, show_default=True, type=click.IntRange(1, 65535),
              help="Port of the MTA-STS policy check (change only for tests).")
@click.option("--tls-ca", "cafile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Trust this CA file for the certificate check (default: the system's).")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds per DNS query and for the SMTP connection.")
def main(
    domain: str,
    nameservers: tuple[str, ...],
    addresses: tuple[str, ...],
    hostname: str | None,
    helo_names: tuple[str, ...],
    selectors: tuple[str, ...],
    dkim_keys: tuple[str, ...],
    smtp_port: int,
    https_port: int,
    cafile: str | None,
    timeout: float,
) -> None:
    """Check MX, SPF (of DOMAIN and of our HELO names), DKIM, DMARC, reverse DNS and the
    port-25 certificate of DOMAIN, and its MTA-STS policy and TLS-RPT record if published."""
    from poste.dkim.keys import DKIMKeyError, load_key
    from poste.dns.resolver import NameserverError
    from poste.services.verifier.spf import resolver_for
    from poste.users.repo import is_domain

    dom = domain_key(domain)
    if not is_domain(dom):
        raise click.BadParameter(f"{domain!r} is not a domain name", param_hint="--domain")
    for a in addresses:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise click.BadParameter(f"{a!r} is not an IP address", param_hint="--address") from None
    if dkim_keys and len(dkim_keys) != len(selectors):
        raise click.UsageError("give one --selector per --dkim-key")
    pairs: list[tuple[str, object | None]] = []
    for i, sel in enumerate(selectors):
        key = None
        if i < len(dkim_keys):
            try:
                key = load_key(dkim_keys[i])
            except DKIMKeyError as exc:
                raise click.ClickException(str(exc)) from None
        pairs.append((sel, key))
    try:
        resolver = resolver_for(nameservers, timeout)
    except NameserverError as exc:
        raise click.BadParameter(str(exc), param_hint="--nameserver") from None
    resolver.lifetime = timeout * 2
    doctor = Doctor(dom, resolver, addresses=addresses, hostname=hostname, dkim=pairs,
                    smtp_port=smtp_port, cafile=cafile, timeout=timeout,
                    helo_names=helo_names, https_port=https_port)
    checks = doctor.run()
    for c in checks:
        for line in c.lines():
            click.echo(line)
    bad = [c for c in checks if c.status in (MISSING, WRONG)]
    if bad:
        click.echo(f"\n{len(bad)} problem(s): publish the records above, then run this again.",
                   err=True)
        raise SystemExit(1)
