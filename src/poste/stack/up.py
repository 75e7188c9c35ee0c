"""The demo of `poste up` (up_cli.py): what it writes, and the banner it prints.

With a config (from `poste init`), every service of it runs in one process,
chained in memory (see build.py).  With none at all, a self-contained demo starts on
unprivileged loopback ports: a demo domain and user, a self-signed
certificate, a DKIM key, and a local folder that stands in for the Internet
(every mail the relay sends lands there), so a newcomer can send a mail
through the whole stack and read what each service added.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from poste.stack.init import CONFIG_NAME, Layout, write_stack

DEMO_DOMAIN = "demo.test"
DEMO_USER = "demo"
DEMO_PORTS = (2525, 4650, 5870)


def demo_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "poste-demo"


def prepare_demo(folder: Path, host: str, ports: tuple[int, int, int]) -> tuple[Path, str]:
    """Write (once) the demo's folder and user; returns (config path, password)."""
    from poste.users.passwords import hash_password
    from poste.users.repo import User, user_to_json
    from poste.users.store import commit_file

    verifier, tls_port, starttls_port = ports
    lay = Layout(
        domain=DEMO_DOMAIN,
        hostname="localhost",
        postmaster=f"{DEMO_USER}@{DEMO_DOMAIN}",
        verifier_listen=f"{host}:{verifier}",
        submission_listen_tls=f"{host}:{tls_port}",
        submission_listen=f"{host}:{starttls_port}",
        mailbox="mailbox",
        dns_timeout=1.0,
        comment="The demo of `poste up` with no config; safe to delete.",
    )
    config = folder / CONFIG_NAME
    if config.exists():
        config.unlink()  # the ports may differ from the last run; the rest is kept
    write_stack(folder, lay)
    pw_file = folder / "demo-password"
    if pw_file.exists():
        password = pw_file.read_text().strip()
    else:
        password = secrets.token_urlsafe(9)
        user = User(
            local=DEMO_USER,
            domain=DEMO_DOMAIN,
            targets=[f"{DEMO_USER}@inbox.{DEMO_DOMAIN}"],
            password=hash_password(password),
        )
        commit_file(folder / "users", DEMO_USER, user_to_json(user), "demo user")
        fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
    (folder / "mailbox").mkdir(exist_ok=True)
    return config, password


def _poste_command() -> str:
    """`poste` if that is us on PATH, else our full path (a second terminal has no venv)."""
    import shutil
    import sys

    me = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    found = shutil.which("poste")
    if me is None or me.name != "poste" or not me.exists():
        return "poste"
    if found and Path(found).resolve() == me:
        return "poste"
    return str(me)


def demo_banner(folder: Path, host: str, ports: tuple[int, int, int], password: str) -> str:
    verifier, tls_port, starttls_port = ports
    poste = _poste_command()
    user = f"{DEMO_USER}@{DEMO_DOMAIN}"
    box = folder / "mailbox"
    return (
        f"\nposte demo is up: domain {DEMO_DOMAIN}, files in {folder}\n"
        f"  incoming mail (the MX):  {host}:{verifier}   verifier -> spamfilter -> relay\n"
        f"  your mail client:        {host}:{starttls_port} (STARTTLS) or {host}:{tls_port}"
        " (TLS), AUTH PLAIN/LOGIN\n"
        f"  login:                   {user}   password: {password}\n"
        f"  the Internet stand-in:   {box}/  (every mail the relay sends lands here)\n"
        "\nIn a second terminal, send a mail as the demo user (submission -> signer -> relay):\n\n"
        f"  printf 'Hello from poste!\\n' | {poste} make --from {user} --to friend@example.org"
        " -f 'Subject: hello' \\\n"
        f"    | {poste} submit - {host}:{starttls_port} -s {user} -r friend@example.org"
        f" -u {user} -p {password} \\\n"
        f"        --tls-verify {folder}/tls/cert.pem\n"
        f"  ls {box}/ && cat {box}/1.eml\n"
        "\nor send one to the demo user from outside (verifier -> spamfilter -> relay):\n\n"
        f"  printf 'Hi!\\n' | {poste} make --from friend@example.org --to {user}"
        f" | {poste} send - {host}:{verifier} -s friend@example.org -r {user}\n"
        "\nStop with Ctrl-C.  For your own domain: poste init DIR --domain YOUR.DOMAIN\n"
    )
