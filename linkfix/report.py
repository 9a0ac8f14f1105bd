"""Kbuild-style progress lines and verbose statistics shared by patch and verify."""

from __future__ import annotations

import os
import shlex
import sys
from collections import Counter
from collections.abc import Callable

from linkfix.tables import Checked, Tables


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


def op_stats(t: Tables, chk: Checked, eff: dict[int, int]) -> list[str]:
    """One line per op with sites: how many sites got which alternative, and the bytes."""
    per: dict[int, Counter[int]] = {}
    size: Counter[int] = Counter()
    for op, count in chk.shape_counts().items():
        sh = chk.shapes[op]
        per.setdefault(op, Counter())[eff.get(op, 0)] += count
        size[op] += sh.site_len * count
    lines = []
    for op in sorted(per):
        alts = ", ".join(f"{t.alt_name(k)} {n}" for k, n in sorted(per[op].items()))
        lines.append(f"  {t.op_name(op)}: {plural(sum(per[op].values()), 'site')} ({alts}); "
                     f"{size[op]} bytes")
    lines.append(f"  total: {plural(t.n_sites, 'site')}")
    return lines
