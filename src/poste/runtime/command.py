"""The click side of every service command: flags from the settings, errors as flag errors.

This is the only runtime module that speaks click (a command module, see
tests/test_layers.py): builders raise `ConfigError`, and here it becomes
`Invalid value for '--listen': ...`, one line and exit status 2, or a plain
one-line error (exit status 1) when no flag is at fault.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click

from poste.runtime import logs, workers
from poste.runtime import settings as s
from poste.runtime.hostport import parse_hostport
from poste.runtime.metrics_http import serve_or_fail
from poste.runtime.run import Parts, StartError, check_loop, run
from poste.runtime.settings import ConfigError, Setting
from poste.smtp import listen
from poste.smtp.message import ALLOCATOR_ENV

log = logging.getLogger("poste.workers")


class Duration(click.ParamType):  # type: ignore[type-arg]
    """`300`, `300s`, `5m`, `4h`, `5d`, `200ms` -> seconds (runtime.settings.parse_duration)."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return s.parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Workers(click.ParamType):  # type: ignore[type-arg]
    """`N` or `auto` (runtime.settings.parse_workers); kept as written, counted at start."""

    name = "workers"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            s.parse_workers(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return value


def _type(setting: Setting) -> Any:
    kind = setting.kind
    if kind in (s.INT, s.FLOAT) and (setting.min is not None or setting.max is not None):
        if kind == s.INT:
            return click.IntRange(
                None if setting.min is None else int(setting.min),
                None if setting.max is None else int(setting.max),
            )
        return click.FloatRange(setting.min, setting.max)
    return {
        s.INT: int, s.FLOAT: float, s.PATH: click.Path(), s.FILE: click.Path(dir_okay=False),
        s.FILES: click.Path(dir_okay=False), s.DIR: click.Path(file_okay=False),
        s.DURATION: Duration(), s.PROCS: Workers(),
    }.get(kind, click.Choice(list(setting.choices)) if kind == s.CHOICE else None)


def option(setting: Setting) -> Callable[[Any], Any]:
    """The click option of one setting, as the commands have always spelled it."""
    decls = [f"--{setting.key}", *([setting.short] if setting.short else []), setting.name]
    kwargs: dict[str, Any] = {"help": setting.help}
    if setting.kind == s.FLAG:
        kwargs["is_flag"] = True
    elif setting.kind == s.COUNT:
        kwargs["count"] = True
    else:
        if setting.default is not None:  # click: an explicit None counts as a default
            kwargs["default"] = setting.default
        kwargs["type"] = _type(setting)
        kwargs["multiple"] = setting.kind in s.MULTIPLE
        if setting.metavar:
            kwargs["metavar"] = setting.metavar
        if setting.show_default:
            kwargs["show_default"] = True
    if setting.required:
        kwargs["required"] = True
    if setting.envvar:
        kwargs["envvar"] = setting.envvar
    return click.option(*decls, **kwargs)


def with_settings(settings: Sequence[Setting]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give the command its flags; it is called with one `values` mapping (key -> value).

    Multiple flags arrive as lists, durations in seconds: what `poste up`
    hands the same builder.  A `ConfigError` out of the command is phrased
    here as the flag's error.
    """

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values: dict[str, Any] = {}
            for setting in settings:
                if not setting.cli:
                    values[setting.key] = setting.initial()
                    continue
                value = kwargs.pop(setting.name)
                values[setting.key] = list(value) if setting.kind in s.MULTIPLE else value
            with flag_errors():
                return func(values, **kwargs)

        for setting in reversed([x for x in settings if x.cli]):
            command = option(setting)(command)
        return command

    return wrap


def flag(name: str) -> str:
    return f"--{name}"


def as_click(exc: ConfigError) -> click.ClickException:
    if exc.key:
        return click.BadParameter(exc.text(flag), param_hint=f"'--{exc.key}'")
    if exc.usage:
        return click.UsageError(exc.render(flag))
    return click.ClickException(exc.render(flag))


@contextmanager
def flag_errors() -> Iterator[None]:
    """ConfigError and StartError out of a command body, as one-line click errors."""
    try:
        yield
    except ConfigError as exc:
        raise as_click(exc) from None
    except StartError as exc:
        raise click.ClickException(str(exc)) from None


def with_allocator_settings() -> None:
    """Start this `poste` process again with smtp.message.ALLOCATOR_ENV if it lacks it.

    glibc reads them at start only.  Only the installed command re-executes
    itself (a `poste` program in argv[0]), never a Python that imported poste.
    """
    if all(os.environ.get(k) for k in ALLOCATOR_ENV):
        return
    program = sys.argv[0]
    if os.path.basename(program) != "poste" or not os.access(program, os.X_OK):
        return
    os.environ.update(ALLOCATOR_ENV)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(program, sys.argv)


def workers_of(value: Any, refusal: str | None) -> int:
    """How many workers to start here: 0 in a worker or with one (run the command itself),
    else N (be their parent).  `refusal`: why this command cannot have several yet."""
    if listen.worker() is not None:
        return 0
    try:
        n = s.parse_workers(value if value is not None else "auto")
    except ValueError as exc:
        raise ConfigError("workers", str(exc)) from None
    if n > 1 and refusal:
        if str(value if value is not None else "auto").strip().lower() == "auto":
            # the default must not stop a deployment that cannot share yet: one process
            log.info("workers: 1, not %d: %s", n, refusal)
            return 0
        raise ConfigError("workers", f"{n} workers: {refusal} (use --workers 1)")
    return n if n > 1 else 0


def serve(values: s.Values, build: Callable[[], Parts],
          refusal: Callable[[s.Values], str | None] = workers.refusal) -> None:
    """A service command's life: logging, the builder, `--metrics`, then the run loop;
    with `--workers N` (N > 1), the parent of N such processes (runtime/workers.py)."""
    with_allocator_settings()
    with flag_errors():
        logs.setup(values.get("log-format") or "plain", values.get("verbose") or 0)
        check_loop()
        n = workers_of(values.get("workers"), refusal(values))
        if n:
            sys.exit(workers.run(n))
        parts = build()
        serve_or_fail(values.get("metrics"))  # after the build: the relay registers gauges
        run(parts)


def hostport_arg(text: str, default_port: int) -> tuple[str, int]:
    """A tool's SERVER[:PORT] argument: a bad one is click's `Invalid value: ...`."""
    try:
        return parse_hostport(text, default_port)
    except ConfigError as exc:
        raise click.BadParameter(exc.message) from None
