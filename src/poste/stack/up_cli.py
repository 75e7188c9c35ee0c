"""`poste up [--config FILE]`: the five services in one process (see up.py, build.py).

SIGTERM/SIGINT stop, SIGHUP reloads: the one run loop of every service
command (runtime/run.py), with `poste up`'s parts.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from poste.runtime import logs
from poste.runtime.command import flag_errors, option, with_allocator_settings, workers_of
from poste.runtime.metrics_http import serve_or_fail
from poste.runtime.run import check_loop, on_loop
from poste.runtime.settings import WORKERS
from poste.runtime.workers import refusal
from poste.runtime.workers import run as run_workers
from poste.smtp import listen
from poste.stack.build import build
from poste.stack.config import ConfigError, StackConfig, load
from poste.stack.up import DEMO_PORTS, demo_banner, demo_dir, prepare_demo

log = logging.getLogger("poste.up")


def _refusal(cfg: StackConfig) -> str | None:
    """What in the config cannot be shared by several workers yet (runtime/workers.py)."""
    for name, section in cfg.sections.items():
        if section.enabled:
            why = refusal(section.values)
            if why:
                return f"[{name}] {why}"
    return None


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
@option(WORKERS.but(default=None, show_default=False,
                   help="Worker processes sharing the listening sockets: N or auto, one per"
                        " core (overrides the config's `workers`; default auto)."))
@click.option("--check", is_flag=True, help="Check the config and exit.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv: debug).")
def main(
    config_path: str | None,
    metrics: str | None,
    log_format: str | None,
    demo_folder: str | None,
    demo_host: str,
    demo_ports: str,
    workers: str | None,
    check: bool,
    verbose: int,
) -> None:
    """Run verifier, spamfilter, relay, submission and signer in one process.

    SIGHUP reloads the users repository, the certificates and the spam
    database, and reports config changes that need a restart.
    """
    if not check:
        with_allocator_settings()  # first of all: it may start this process again
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
    if not check:
        with flag_errors():
            check_loop()
            n = workers_of(workers if workers is not None else cfg.top.get("workers"),
                           _refusal(cfg))
        if n:
            if banner:
                click.echo(banner, err=True)
            with flag_errors():
                sys.exit(run_workers(n))
    try:
        stack = build(cfg, check=check)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if check:
        click.echo(f"{config_path}: ok")
        return

    def ready() -> None:
        if banner and listen.worker() is None:  # with workers, the parent printed it
            click.echo(banner, err=True)
        log.info("poste up: ready (config %s)", cfg.path)

    with flag_errors():
        serve_or_fail(metrics or cfg.metrics)  # the relay registered its spool gauges
        on_loop(stack.runtime.serve(ready))
