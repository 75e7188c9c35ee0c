"""What every service command shares: flag parsing, TLS loading, logging, the run loop."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import click

from poste.dns.resolver import Nameserver, NameserverError, parse_nameserver
from poste.smtp.server import SMTPService
from poste.smtp.tls import TLSConfigError, server_context

log = logging.getLogger("poste")


def tls_context_from(cert: str | None, key: str | None):  # type: ignore[no-untyped-def]
    """A server TLS context from --tls-cert/--tls-key, or None; errors are one line."""
    if not cert and not key:
        return None
    if not cert or not key:
        raise click.UsageError("--tls-cert and --tls-key go together")
    try:
        return server_context(cert, key)
    except TLSConfigError as exc:
        raise click.ClickException(str(exc)) from None


# Set by the --log-format/--metrics flags (see verbose_option), read by setup_logging/run_services.
_observability: dict[str, Any] = {"log_format": "plain", "metrics": None}


def setup_logging(verbose: int = 0, json_logs: bool = False) -> None:
    from poste.runtime.logs import setup

    log_format = "json" if json_logs else _observability["log_format"]
    setup(log_format, verbose)
    if verbose < 2:
        # aiosmtpd's chatter, including a deprecation warning on every successful AUTH.
        logging.getLogger("mail.log").setLevel(logging.ERROR)


def run_services(
    *services: SMTPService,
    on_start: Callable[[], Coroutine[Any, Any, None]] | None = None,
    background: list[Callable[[], Coroutine[Any, Any, None]]] | None = None,
    on_hup: Callable[[], None] | None = None,
    on_stop: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> None:
    """Start every service, run until SIGTERM/SIGINT, stop cleanly.

    `on_start` runs before any listener opens (e.g. the relay's spool recovery),
    `background` jobs run alongside and are cancelled and awaited at the end,
    `on_stop` runs once the listeners are closed.

    A port that cannot be bound is a one-line error and exit status 1.
    """

    if _observability["metrics"]:
        from poste.runtime.metrics_http import serve_or_fail

        serve_or_fail(_observability["metrics"])

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if on_hup is not None:
            loop.add_signal_handler(signal.SIGHUP, on_hup)
        if on_start is not None:
            await on_start()
        started: list[SMTPService] = []
        try:
            for service in services:
                await service.start()
                started.append(service)
        except OSError as exc:
            for service in started:
                await service.stop()
            raise click.ClickException(
                f"cannot listen on {service.host}:{service.port}: {exc.strerror or exc}"
            ) from None
        tasks = [asyncio.create_task(job()) for job in background or []]
        await stop.wait()
        log.info("stopping")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for service in services:
            await service.stop()
        if on_stop is not None:
            await on_stop()

    asyncio.run(main())


def read_file_option(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None


# Shared click options, so every service spells its flags the same way.
listen_option = click.option(
    "--listen",
    default="127.0.0.1:2525",
    show_default=True,
    metavar="ADDR:PORT",
    help="Address and port to listen on.",
)
destination_option = click.option(
    "--destination",
    required=True,
    metavar="HOST[:PORT]",
    help="Next hop (port 25 when omitted).",
)
hostname_option = click.option(
    "--hostname",
    default=None,
    metavar="NAME",
    help="Our name in the banner and in Received: (default: the machine's FQDN).",
)
tls_cert_option = click.option(
    "--tls-cert", type=click.Path(dir_okay=False), help="PEM certificate."
)
tls_key_option = click.option("--tls-key", type=click.Path(dir_okay=False), help="PEM private key.")


def verbose_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """-v, and the two flags every service shares for operations: --log-format and --metrics.

    The latter two are consumed here (the command never sees them) and read
    back by setup_logging() and run_services(), so every service gets them
    the same way without repeating the plumbing.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, log_format: str, metrics: str | None, **kwargs: Any) -> Any:
        _observability["log_format"] = log_format
        _observability["metrics"] = metrics
        return func(*args, **kwargs)

    wrapper = click.option(
        "--metrics",
        default=None,
        metavar="ADDR:PORT",
        envvar="POSTE_METRICS",
        help="Serve Prometheus metrics at http://ADDR:PORT/metrics.",
    )(wrapper)
    wrapper = click.option(
        "--log-format",
        type=click.Choice(["plain", "json"]),
        default="plain",
        envvar="POSTE_LOG_FORMAT",
        show_default=True,
        help="Log lines as plain text or one JSON object each.",
    )(wrapper)
    return click.option("-v", "--verbose", count=True, help="More logging (-vv: debug).")(wrapper)


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
