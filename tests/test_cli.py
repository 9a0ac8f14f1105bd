"""The command line itself: lazy imports, the error contract for unknown commands."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("lief", "keystone", "capstone", "elftools", "jinja2", "unicorn")


def test_help_imports_no_heavy_module() -> None:
    # `linkfix --help` must start fast: none of the heavy libraries may load.
    code = (
        "import sys\n"
        "from linkfix.cli import build_parser\n"
        "build_parser().format_help()\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "linkfix", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("gen-stubs", "patch", "inspect", "verify"):
        assert command in out.stdout


def test_unknown_command_is_a_usage_error() -> None:
    out = subprocess.run([sys.executable, "-m", "linkfix", "frobnicate"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
