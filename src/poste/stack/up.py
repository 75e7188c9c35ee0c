"""`poste up [--config FILE]`: the five services in one process.

With a config (from `poste init`), every service of it runs here, chained
in memory (see build.py).  With none at all, a self-contained demo starts on
unprivileged loopback ports: a demo domain and user, a self-signed
certificate, a DKIM key, and a local folder that stands in for the Internet
(every mail the relay sends lands there), so a newcomer can send a mail
through the whole stack and read what each service added.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from pathlib import Path

import click

from poste.stack.config import ConfigError, StackConfig, load
from poste.stack.init import CONFIG_NAME, Layout, write_stack

log = logging.getLogger("poste.up")

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


def _parse_ports(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise click.BadParameter("expected three ports: VERIFIER,SUBMISSION_TLS,SUBMISSION")
    a, b, c = (int(p) for p in parts)
    if not all(0 < p < 65536 for p in (a, b, c)):
        raise click.BadParameter("ports must be 1-65535")
    return a, b, c


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              envvar="POSTE_CONFIG",
              help="The config file (from `poste init`).  Without one: the demo.")
@click.option("--metrics", default=None, metavar="ADDR:PORT",
              help="Serve Prometheus metrics at http://ADDR:PORT/metrics (overrides the config).")
@click.option("--log-format", type=click.Choice(["plain", "json"]), default=None,
              help="Log lines as text or one JSON object each (overrides the config).")
@click.option("--demo-dir", "demo_folder", type=click.Path(file_okay=False), default=None,
              help="Demo only: where its files go [default: ~/.local/state/poste-demo].")
@click.option("--demo-host", default="127.0.0.1", show_default=True,
              help="Demo only: the loopback address to listen on.")
@click.option("--demo-ports", default=",".join(map(str, DEMO_PORTS)), show_default=True,
              metavar="V,TLS,STARTTLS", help="Demo only: verifier and submission ports.")
@click.option("--check", is_flag=True, help="Check the config and exit.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv: debug).")
def main(
    config_path: str | None,
    metrics: str | None,
    log_format: str | None,
    demo_folder: str | None,
    demo_host: str,
    demo_ports: str,
    check: bool,
    verbose: int,
) -> None:
    """Run verifier, spamfilter, relay, submission and signer in one process.

    SIGHUP reloads the users repository, the certificates and the spam
    database, and reports config changes that need a restart.
    """
    from poste.runtime import logs
    from poste.runtime.metrics_http import serve_or_fail

    banner = ""
    if config_path is None:
        ports = _parse_ports(demo_ports)
        folder = Path(demo_folder) if demo_folder else demo_dir()
        try:
            path, password = prepare_demo(folder, demo_host, ports)
        except OSError as exc:
            raise click.ClickException(f"cannot prepare the demo in {folder}: {exc}") from None
        banner = demo_banner(folder.resolve(), demo_host, ports, password)
        config_path = str(path)
    try:
        cfg = load(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    logs.setup(log_format or cfg.log_format, verbose or int(cfg.top.get("verbose", 0)))
    from poste.stack.build import build

    try:
        stack = build(cfg, check=check)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if check:
        click.echo(f"{config_path}: ok")
        return
    serve_or_fail(metrics or cfg.metrics)  # the relay registered its spool gauges
    _run(stack, cfg, banner)


def _run(stack: object, cfg: StackConfig, banner: str) -> None:
    from poste.stack.build import Stack

    assert isinstance(stack, Stack)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            log.info("SIGHUP: reloading")
            task = loop.create_task(stack.reload())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        await stack.start()
        if banner:
            click.echo(banner, err=True)
        log.info("poste up: ready (config %s)", cfg.path)
        await stop.wait()
        log.info("stopping")
        await stack.stop()

    asyncio.run(run())
