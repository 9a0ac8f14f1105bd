"""Shared helpers of the benchmarks: paths, running commands, statistics."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
BUILD = os.path.join(ROOT, "build", "bench")
PYTHON = sys.executable
# The CPU every timed user-space run is pinned to (the last one: the first
# usually takes more interrupts).
PIN_CPU = str((os.cpu_count() or 1) - 1)


class BenchError(Exception):
    """A benchmark could not run; the message says which command and why."""


@dataclass
class Log:
    """Every command the run executed, in order, for the generated document."""

    commands: list[str] = field(default_factory=list)
    verbose: bool = False

    def note(self, cmd: Sequence[str], cwd: str | None = None) -> None:
        line = " ".join(_quote(c) for c in cmd)
        if cwd and os.path.abspath(cwd) != ROOT:
            line = f"(cd {rel(cwd)} && {line})"
        self.commands.append(line)
        if self.verbose:
            print(f"  $ {line}", flush=True)

    def comment(self, text: str) -> None:
        """A line in the command list that is not a command."""
        self.commands.append(f"# {text}")


LOG = Log()


def _quote(arg: str) -> str:
    arg = rel(arg) if arg.startswith(ROOT) else arg.replace(ROOT + "/", "")
    if arg and all(c.isalnum() or c in "-_./=,:+%*" for c in arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


def rel(path: str) -> str:
    """`path` relative to the repository root, for display."""
    return os.path.relpath(path, ROOT) if path.startswith(ROOT) else path


def run(cmd: Sequence[str], *, cwd: str | None = None, log: bool = True,
        timeout: float | None = 600, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run `cmd`, return its output; raise BenchError naming it if it fails."""
    if log:
        LOG.note(cmd, cwd)
    try:
        proc = subprocess.run(list(cmd), cwd=cwd or ROOT, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except FileNotFoundError:
        raise BenchError(f"{cmd[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(cmd)}: timed out after {timeout} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BenchError(f"{' '.join(rel(c) for c in cmd)}: exit {proc.returncode}: "
                         + " | ".join(tail))
    return proc


def pinned(cmd: Sequence[str]) -> list[str]:
    """`cmd` pinned to PIN_CPU with taskset (when taskset exists)."""
    if shutil.which("taskset"):
        return ["taskset", "-c", PIN_CPU, *cmd]
    return list(cmd)


def linkfix_cmd(*args: str) -> list[str]:
    """The linkfix command line, as a user runs it from the venv."""
    return [PYTHON, "-m", "linkfix", *args]


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt(x: float | None, digits: int = 2) -> str:
    """A number for a table cell; '-' when absent."""
    if x is None:
        return "-"
    return f"{x:.{digits}f}"


def pct(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:+.{digits}f} %"
