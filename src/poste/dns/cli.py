"""`poste dns records|publish`: what a domain needs in DNS, and putting it there."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import click

from poste.dkim import keys as dkim_keys
from poste.dns import records as rec
from poste.dns.resolver import Nameserver, NameserverError, parse_nameserver


def dns_server_option(text: str) -> Nameserver:
    try:
        return parse_nameserver(text)
    except NameserverError as exc:
        raise click.BadParameter(str(exc), param_hint="--dns-server") from None


def dns_key_option(text: str) -> Any:
    from poste.dns.update import parse_tsig  # dnspython.tsig is slow to import

    try:
        return parse_tsig(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--dns-key") from None


def _record_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--domain", "-d", required=True, help="The mail domain."),
        click.option("--mx-host", help="The MX host name (default: mail.DOMAIN)."),
        click.option(
            "--ip", "ips", multiple=True, help="The server's IP address (A/AAAA, and the PTR)."
        ),
        click.option(
            "--selector", "-s", "selectors", multiple=True, help="DKIM selector, per key."
        ),
        click.option(
            "--private-key",
            "-k",
            "paths",
            multiple=True,
            type=click.Path(dir_okay=False),
            help="DKIM key file; its public half is published (pair with --selector).",
        ),
        click.option(
            "--dmarc-policy",
            type=click.Choice(rec.DMARC_POLICIES),
            default="quarantine",
            show_default=True,
        ),
        click.option("--dmarc-rua", help="DMARC report address (default: mailto:postmaster@D)."),
        click.option("--ttl", type=click.IntRange(1), default=rec.DEFAULT_TTL, show_default=True),
        click.option("--mta-sts", "mta_sts", type=click.Choice(["off", *rec.MTA_STS_MODES]),
                     default="off", show_default=True,
                     help="MTA-STS mode: print _mta-sts and mta-sts.DOMAIN as `poste up` with "
                          "[verifier] mta-sts serves them."),
        click.option("--mta-sts-max-age", type=click.IntRange(1, 31557600), default=604800,
                     show_default=True, help="max_age of the MTA-STS policy, in seconds."),
        click.option("--tlsrpt-rua", help="Where TLS reports go (default: mailto:postmaster@D)."),
        click.option("--helo", "helo_names", multiple=True, metavar="NAME",
                     help="A name our relay greets with (HELO), for its SPF record "
                          "(repeatable; default: the MX host)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def build_records(
    domain: str,
    mx_host: str | None,
    ips: tuple[str, ...],
    selectors: tuple[str, ...],
    paths: tuple[str, ...],
    dmarc_policy: str,
    dmarc_rua: str | None,
    ttl: int,
    helo_names: tuple[str, ...] = (),
    mta_sts: str = "off",
    mta_sts_max_age: int = 604800,
    tlsrpt_rua: str | None = None,
) -> list[rec.Record]:
    if len(selectors) != len(paths):
        raise click.UsageError("give one --selector per --private-key")
    dkim = []
    for selector, path in zip(selectors, paths, strict=True):
        try:
            dkim.append(dkim_keys.dkim_record(domain, selector, dkim_keys.load_key(path), ttl))
        except dkim_keys.DKIMKeyError as exc:
            raise click.ClickException(str(exc)) from None
    try:
        out = rec.domain_records(
            domain,
            mx_host=mx_host,
            ips=ips,
            dkim=dkim,
            dmarc_policy=dmarc_policy,
            dmarc_rua=dmarc_rua,
            ttl=ttl,
            helo_names=helo_names,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    out.append(rec.tlsrpt_record(domain, tlsrpt_rua, ttl))
    if mta_sts != "off":
        mx = mx_host or f"mail.{domain}"
        policy = rec.mta_sts_policy(mta_sts, [mx], mta_sts_max_age)
        out += rec.mta_sts_records(domain, policy, ips, ttl)
    return out


@click.group(name="dns", context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """DNS records a mail domain needs; publish them with RFC 2136 + TSIG."""


@main.command()
@_record_options
def records(**kwargs: Any) -> None:
    """Print every record DOMAIN needs, as zone-file lines (PTR as a note to pass on)."""
    click.echo(rec.zone_text(build_records(**kwargs)), nl=False)


@main.command()
@_record_options
@click.option(
    "--dns-server",
    required=True,
    metavar="[tcp:]IP[:PORT]",
    help="The domain's primary DNS server.",
)
@click.option("--dns-key", required=True, metavar="NAME:ALG:SECRET", help="TSIG key (ptt format).")
@click.option("--zone", help="The zone to update (default: DOMAIN).")
def publish(dns_server: str, dns_key: str, zone: str | None, **kwargs: Any) -> None:
    """Send the records that are missing or different to the primary (RFC 2136 UPDATE)."""
    from poste.dns.update import DNSUpdateError
    from poste.dns.update import publish as do_publish

    server = dns_server_option(dns_server)
    key = dns_key_option(dns_key)
    records = build_records(**kwargs)
    try:
        outcomes = asyncio.run(do_publish(records, zone or kwargs["domain"], server, key))
    except DNSUpdateError as exc:
        raise click.ClickException(str(exc)) from None
    for o in outcomes:
        click.echo(o.line())
