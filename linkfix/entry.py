"""The `linkfix` program's entry point: the console script and `python -m linkfix`.

A Ctrl-C can arrive while linkfix is still starting (modules importing,
arguments being parsed), before cli.main has its handlers in place. It is an
interrupt like any other: one line and exit 130, not a traceback. Nothing heavy
is imported here, so the window before the `try` is as small as it can be.
"""

from __future__ import annotations

import os  # os and sys are loaded before any of linkfix: importing them costs nothing
import sys

EXIT_INTERRUPTED = 128 + 2


def main() -> int:
    try:
        from linkfix import cli
        status = cli.main()
    except KeyboardInterrupt:
        # As cli.stopped(), without needing cli (its import may be what was interrupted).
        fileio = sys.modules.get("linkfix.fileio")
        if fileio is not None and fileio.outputs_committed():
            return 0
        print("linkfix: interrupted", file=sys.stderr)
        status = EXIT_INTERRUPTED
    if status == EXIT_INTERRUPTED:
        _exit_interrupted()
    return status


def _exit_interrupted() -> None:
    """Exit 130 at once. Under `python -m`, CPython ends a process whose Ctrl-C went
    through an eval() of a string (namedtuple() does one while a module imports) by
    SIGINT at exit, whatever status sys.exit() was given; os._exit keeps the 130."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - a closed pipe: nothing more to say
            pass
    os._exit(EXIT_INTERRUPTED)
