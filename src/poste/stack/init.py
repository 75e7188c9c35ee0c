"""`poste init DIR [--domain D]`: everything `poste up` needs, in one folder.

It writes a config (TOML, one section per service, keys named as the
flags), a self-signed certificate for the mail host name, a DKIM key, an SRS
secret and an empty users repository, then prints the DNS records to publish
and the commands to run next.  Nothing is overwritten: an existing
`poste.toml` in DIR is an error.
"""

from __future__ import annotations

import datetime
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from poste.stack.config import toml_value

CONFIG_NAME = "poste.toml"


@dataclass
class Layout:
    """What goes in the config; paths are relative to the folder."""

    domain: str
    hostname: str
    postmaster: str
    selector: str = "poste"
    dkim_algorithm: str = "rsa"
    verifier_listen: str = "0.0.0.0:25"
    submission_listen_tls: str = "0.0.0.0:465"
    submission_listen: str = "0.0.0.0:587"
    relay_listen: str | None = None
    nameservers: list[str] = field(default_factory=list)
    metrics: str | None = None
    mailbox: str | None = None  # the demo: deliver into this folder instead of the Internet
    smtp_port: int | None = None
    dns_timeout: float | None = None
    comment: str = ""


def config_text(lay: Layout) -> str:
    def kv(key: str, value: object, comment: bool = False) -> str:
        return f"{'# ' if comment else ''}{key} = {toml_value(value)}\n"

    today = datetime.date.today().isoformat()
    out = [
        f"# poste configuration for {lay.domain}, written by `poste init` on {today}.\n",
        "# One section per service; a key is the service flag's name (`poste relay --help`).\n",
        "# Keys before the first section are shared by every service that has that flag.\n",
        "# Relative paths are relative to this file's folder.  Run: poste up --config THIS_FILE\n",
    ]
    if lay.comment:
        out.append(f"# {lay.comment}\n")
    out += [
        "\n",
        kv("domain", [lay.domain]),
        kv("hostname", lay.hostname),
        kv("postmaster", lay.postmaster),
        kv("tls-cert", "tls/cert.pem"),
        kv("tls-key", "tls/key.pem"),
        kv("users", "users"),
        kv("nameserver", lay.nameservers or ["9.9.9.9"], comment=not lay.nameservers),
        kv("metrics", lay.metrics or "127.0.0.1:9325", comment=lay.metrics is None),
        kv("log-format", "plain"),
        "\n[verifier]  # the public MX: SPF, DKIM, DMARC labels\n",
        kv("listen", lay.verifier_listen),
        kv("require-tls", False, comment=True),
        kv("reject-failures", False, comment=True),
        kv("psl", "public_suffix_list.dat", comment=True),
    ]
    if lay.dns_timeout is not None:
        out.append(kv("dns-timeout", lay.dns_timeout))
    out += [
        "\n[spamfilter]  # X-Spamtacus: yes|no|unknown\n",
        kv("db", "spam.db", comment=True),
        "\n[relay]  # the queue: local users to their targets, the rest to its MX\n",
        kv("spool", "spool"),
        kv("srs-secret-file", "srs-secret"),
        kv("listen", lay.relay_listen or "127.0.0.1:2526", comment=lay.relay_listen is None),
        kv("local-socket", "/run/poste/relay.sock", comment=True),
        kv("granted", ["10.0.0.5/32"], comment=True),
        kv("self-address", ["192.0.2.1"], comment=True),
    ]
    if lay.smtp_port is not None:
        out.append(kv("smtp-port", lay.smtp_port))
    if lay.mailbox is not None:
        out.append("# demo: every mail the relay sends goes into this folder, not to the Internet\n")
        out.append(kv("mailbox", lay.mailbox))
    out += [
        "\n[submission]  # your mail client: AUTH over TLS\n",
        kv("listen-tls", lay.submission_listen_tls),
        kv("listen", lay.submission_listen),
        "\n[signer]  # DKIM-Signature on everything that leaves\n",
        kv("selector", [lay.selector]),
        kv("private-key", [f"dkim/{lay.selector}.pem"]),
        kv("dns-server", "ns1.example.net:53", comment=True),
        kv("dns-key", "NAME:hmac-sha256:SECRET", comment=True),
    ]
    return "".join(out)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_stack(folder: Path, lay: Layout) -> Path:
    """Create the folder's files; returns the config path.  OSError/ValueError on failure."""
    from poste.dkim.keys import generate, write_key
    from poste.smtp.tls import self_signed
    from poste.users.store import commit_file, init_repo

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / CONFIG_NAME
    if config.exists():
        raise FileExistsError(f"{config} exists already (nothing was changed)")
    for sub in ("tls", "dkim", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    os.chmod(folder / "dkim", 0o700)
    if not (folder / "tls" / "cert.pem").exists():
        self_signed(folder / "tls" / "cert.pem", folder / "tls" / "key.pem", lay.hostname)
    key_path = folder / "dkim" / f"{lay.selector}.pem"
    if not key_path.exists():
        write_key(generate(lay.dkim_algorithm), key_path)
    secret = folder / "srs-secret"
    if not secret.exists():
        _write_private(secret, (secrets.token_hex(32) + "\n").encode())
    users = folder / "users"
    if not (users / ".git").exists():
        if users.exists() and any(users.iterdir()):
            raise FileExistsError(f"{users} exists and is not a Git repository")
        init_repo(users)
        readme = (
            f"# Users of {lay.domain}\n\n"
            "One file per local part, JSON: "
            '{"targets": ["you@elsewhere"], "password": "<argon2id>", "insecure": false}.\n'
            "Manage with `poste users add|del|list|passwd|targets --repo THIS_FOLDER`.\n"
        )
        commit_file(users, "README.md", readme.encode(), "poste init: empty users repository")
    tmp = folder / f".{CONFIG_NAME}.tmp"
    tmp.write_text(config_text(lay))
    os.replace(tmp, config)
    return config


def dns_records_text(folder: Path, lay: Layout, addresses: list[str]) -> str:
    from poste.dkim.keys import dkim_record, load_key
    from poste.dns.records import domain_records, zone_text

    key = load_key(folder / "dkim" / f"{lay.selector}.pem")
    records = domain_records(
        lay.domain, mx_host=lay.hostname, ips=addresses, dkim=[dkim_record(lay.domain, lay.selector, key)],
        dmarc_rua=f"mailto:{lay.postmaster}",
    )
    return zone_text(records)


def default_domain() -> str:
    fqdn = socket.getfqdn()
    if "." in fqdn and not fqdn.endswith((".localdomain", ".local", ".localhost", ".arpa")):
        return fqdn.split(".", 1)[1]
    return "example.test"
