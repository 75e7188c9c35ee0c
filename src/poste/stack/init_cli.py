"""`poste init`: the command line of init.py."""

from __future__ import annotations

from pathlib import Path

import click

from poste.smtp.address import domain_key
from poste.stack.init import Layout, default_domain, dns_records_text, write_stack


@click.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--domain", default=None, metavar="D",
              help="Your mail domain (default: the machine's domain).")
@click.option("--hostname", default=None, metavar="NAME",
              help="The mail host's name: MX target, certificate, banner [default: mail.D].")
@click.option("--postmaster", default=None, metavar="ADDR",
              help="Where postmaster@ mail goes [default: hostmaster@D, a user to add].")
@click.option("--address", "addresses", multiple=True, metavar="IP",
              help="This server's public address (repeatable), for the records printed.")
@click.option("--selector", default="poste", show_default=True, help="DKIM selector.")
@click.option("--dkim-algorithm", type=click.Choice(["rsa", "ed25519"]), default="rsa",
              show_default=True, help="DKIM key type (rsa is what every receiver verifies).")
def main(
    directory: str,
    domain: str | None,
    hostname: str | None,
    postmaster: str | None,
    addresses: tuple[str, ...],
    selector: str,
    dkim_algorithm: str,
) -> None:
    """Write a working configuration for DOMAIN into DIRECTORY, then say what to do next."""
    from poste.users.repo import is_domain

    dom = domain_key(domain or default_domain())
    if not is_domain(dom):
        raise click.BadParameter(f"{dom!r} is not a domain name", param_hint="--domain")
    host = domain_key(hostname or f"mail.{dom}")
    if not is_domain(host):
        raise click.BadParameter(f"{host!r} is not a host name", param_hint="--hostname")
    pm = postmaster or f"hostmaster@{dom}"
    if "@" not in pm:
        raise click.BadParameter(f"{pm!r} is not an address", param_hint="--postmaster")
    import ipaddress

    for a in addresses:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise click.BadParameter(f"{a!r} is not an IP address", param_hint="--address") from None
    folder = Path(directory)
    lay = Layout(domain=dom, hostname=host, postmaster=pm, selector=selector,
                 dkim_algorithm=dkim_algorithm)
    try:
        config = write_stack(folder, lay)
    except FileExistsError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {directory}: {exc.strerror or exc}") from None
    records = dns_records_text(folder, lay, list(addresses))
    (folder / "dns-records.zone").write_text(records)
    d = str(folder)
    pm_local, _, pm_domain = pm.partition("@")
    add_pm = (
        f"  poste users add {pm_local} --repo {d}/users --target YOU@YOUR.MAILBOX"
        "   # postmaster mail goes here\n"
        if pm_domain == dom else ""
    )
    click.echo(
        f"Wrote {config} (and tls/, dkim/{selector}.pem, srs-secret, users/, spool/).\n"
        "\n"
        "Next:\n"
        f"1. Publish these DNS records (also in {d}/dns-records.zone):\n\n"
        + "".join(f"     {line}\n" for line in records.splitlines())
        + ("" if addresses else "   (give --address IP to get the A and PTR records too)\n")
        + "\n2. Add your users (targets: where their mail is forwarded):\n"
        f"  poste users add LOGIN --repo {d}/users --target you@gmail.com\n"
        + add_pm
        + "\n3. Replace the self-signed certificate in "
        f"{d}/tls/ with a real one for {host} (e.g. from Let's Encrypt).\n"
        "\n4. Start everything, then check from the outside:\n"
        f"  poste up --config {config}\n"
        f"  poste doctor --domain {dom} --selector {selector} --dkim-key {d}/dkim/{selector}.pem\n"
    )
