"""The `poste` executable: a fast lane for batch classification, then the click CLI.

`poste spam classify` is timed against spamoracle on whole mboxes with
process start-up included, so it must not pay for importing click and every
command's options first (see poste.spam.fast_cli).  Everything else, and
any classify line the fast lane does not take, goes to `poste.cli.main`.
"""

from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv[:2] == ["spam", "classify"]:
        import gc

        # off before the imports: their objects would only be scanned to no
        # avail (the fast lane makes no reference cycles; see fast_cli)
        gc.disable()
        from poste.spam.fast_cli import classify

        code = classify(argv[2:])
        if code is not None:
            _exit_now(code)
        gc.enable()
    from poste.cli import main as cli_main

    cli_main()


def _exit_now(code: int) -> None:
    """Exit with `code` once the output is out, skipping the interpreter's teardown.

    Why: tearing down frees every module, mail and table one by one and runs
    the cycle collector three times, ~15 million instructions (1% of an 800
    mail mbox's run) for memory the process hands back anyway.  Nothing the
    fast lane opened is left to close: its files are closed, its output
    written and flushed here.
    """
    import os

    try:
        sys.stdout.flush()  # written and flushed by the fast lane already: a formality
        sys.stderr.flush()
    except OSError:
        code = code or 1
    os._exit(code)
