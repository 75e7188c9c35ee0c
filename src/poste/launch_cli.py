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
        from poste.spam.fast_cli import classify

        code = classify(argv[2:])
        if code is not None:
            sys.exit(code)
    from poste.cli import main as cli_main

    cli_main()
