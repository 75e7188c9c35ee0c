"""Run `poste ARGS...` inside the test process, as the entry point would, and capture it.

Spawning `poste` costs a Python start and the imports of the command (0.3-0.6 s,
seconds under load) for what is often one line of stderr.  `run_poste` calls
`poste.cli.main(argv)` itself, the function the `poste` console script calls,
with stdin/stdout/stderr swapped for in-memory streams, and returns what
`subprocess.run(..., capture_output=True, text=True)` would: the exit status
(SystemExit as the interpreter turns it into one), stdout and stderr.  An
exception that escapes `main` is printed as the interpreter would print it
(a `Traceback` on stderr, status 1), so "no traceback" is still checked.

It leaves the process as it found it: the logging configuration a command
sets up (root handlers and levels), the flags' module-level state, and it
fails if the command leaves a thread of its own running.  Each module that checks a
command's errors this way keeps one subprocess case, so the installed entry
point itself is still proven.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class Ran:
    """What `subprocess.run(..., capture_output=True, text=...)` gives, for an in-process run.

    `stdout` and `stderr` are str (text=True, the default) or bytes (text=False).
    """

    args: list[str]
    returncode: int
    stdout: Any
    stderr: Any


class _Stream(io.TextIOWrapper):
    """A text stream over bytes that `main` cannot close for us."""

    def close(self) -> None:
        self.flush()


def _logging_state() -> dict[str, tuple[int, list[logging.Handler], bool, bool]]:
    loggers: dict[str, logging.Logger] = {"": logging.getLogger()}
    for name, obj in logging.Logger.manager.loggerDict.items():
        if isinstance(obj, logging.Logger):
            loggers[name] = obj
    return {
        name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled)
        for name, lg in loggers.items()
    }


def _restore_logging(saved: dict[str, tuple[int, list[logging.Handler], bool, bool]]) -> None:
    current: dict[str, logging.Logger] = {"": logging.getLogger()}
    for name, obj in logging.Logger.manager.loggerDict.items():
        if isinstance(obj, logging.Logger):
            current[name] = obj
    for name, lg in current.items():
        level, handlers, propagate, disabled = saved.get(name, (logging.NOTSET, [], True, False))
        for h in list(lg.handlers):
            if h not in handlers:
                lg.removeHandler(h)
                with contextlib.suppress(Exception):
                    h.close()
        for h in handlers:
            if h not in lg.handlers:
                lg.addHandler(h)
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled
    logging.disable(logging.NOTSET)


# Module-level dicts that flags fill in (--log-format/--metrics set `_observability`
# in poste.services.common); found by name in whichever poste module holds them, so a
# module moving does not silently stop the restore.
_STATE_NAMES = ("_observability",)


_imported = False


def _import_commands() -> None:
    """Import every command's module once, so the state found below is there before a run."""
    global _imported
    if _imported:
        return
    from poste.cli import COMMANDS

    for target, _ in COMMANDS.values():
        with contextlib.suppress(ImportError):
            importlib.import_module(target.split(":")[0])
    _imported = True


@contextlib.contextmanager
def _kept_module_state() -> Iterator[None]:
    _import_commands()
    saved: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for name, module in list(sys.modules.items()):
        if not (name == "poste" or name.startswith("poste.")) or module is None:
            continue
        for attr in _STATE_NAMES:
            value = getattr(module, attr, None)
            if isinstance(value, dict) and all(value is not d for d, _ in saved):
                saved.append((value, dict(value)))
    try:
        yield
    finally:
        for value, copy in saved:
            value.clear()
            value.update(copy)


def _from_poste(thread: threading.Thread) -> bool:
    """A thread poste's code started (its own, a metrics HTTP server), not a test helper's.

    The test process runs other threads meanwhile (the fake DNS answers each query in
    a thread of its own, the stand-in MX hosts write mails from executor threads):
    those are not the command's.
    """
    target = getattr(thread, "_target", None)
    module = getattr(target, "__module__", None) or ""
    return module.split(".")[0] in ("poste", "prometheus_client", "socketserver", "http")


def run_poste(argv: list[str], input: bytes | str = b"", text: bool = True) -> Ran:
    """`poste *argv` in this process; `input` is its stdin (empty by default)."""
    from poste.cli import main

    data = input.encode() if isinstance(input, str) else input
    out, err = io.BytesIO(), io.BytesIO()
    stdin = _Stream(io.BytesIO(data), encoding="utf-8")
    stdout = _Stream(out, encoding="utf-8", write_through=True)
    stderr = _Stream(err, encoding="utf-8", write_through=True)
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    saved_logging = _logging_state()
    threads_before = set(threading.enumerate())
    code = 0
    with _kept_module_state():
        sys.stdin, sys.stdout, sys.stderr = stdin, stdout, stderr
        try:
            main(list(argv))
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:  # sys.exit("message"): the interpreter prints it, status 1
                print(exc.code, file=sys.stderr)
                code = 1
        except Exception:  # the interpreter would print it and exit 1
            traceback.print_exc(file=sys.stderr)
            code = 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            sys.stdin, sys.stdout, sys.stderr = saved_streams
            _restore_logging(saved_logging)
    left = [t for t in threading.enumerate()
            if t not in threads_before and t.is_alive() and _from_poste(t)]
    assert not left, f"poste {' '.join(argv)} left threads running: {left}"
    if text:
        return Ran(list(argv), code, out.getvalue().decode("utf-8", "replace"),
                   err.getvalue().decode("utf-8", "replace"))
    return Ran(list(argv), code, out.getvalue(), err.getvalue())


__all__ = ["Ran", "run_poste"]
