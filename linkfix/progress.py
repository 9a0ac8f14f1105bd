"""Kbuild-style progress lines (`  LINKFIX vmlinux`), and when a command is verbose or quiet."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable


def plural(n: int, noun: str) -> str:
    """`1 site`, `2 sites`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def verbose(args: object) -> bool:
    # An explicit -q wins over V=1 inherited from make's environment.
    if getattr(args, "verbose", False):
        return True
    return os.environ.get("V") == "1" and not getattr(args, "quiet", False)


def quiet(args: object) -> bool:
    return bool(getattr(args, "quiet", False)) and not getattr(args, "verbose", False)


def finish(args: object, verb: str, name: str, details: Callable[[], list[str]]) -> None:
    """The closing output of a command: the Kbuild line, plus `details()` when verbose."""
    if verbose(args):
        print(kbuild(verb, name))
        for line in details():
            print(line)
    elif not quiet(args):
        print(kbuild(verb, name))


def command_line() -> str:
    return shlex.join(["linkfix", *sys.argv[1:]])


def kbuild(verb: str, name: str) -> str:
    """`  LINKFIX vmlinux`: two spaces, the verb padded to 8 columns, the target."""
    return f"  {verb:<8}{name}"
