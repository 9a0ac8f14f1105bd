"""The `linkfix` command line: argument parsing and the error contract.

Command modules are imported only when their command runs, so `linkfix --help`
never loads lief, keystone or capstone. The program itself starts in
linkfix.entry, which also covers a Ctrl-C before main() is running.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import traceback

from linkfix import __version__, fileio
from linkfix.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, LinkfixError

# A reader that closed the pipe early (`linkfix inspect IMAGE | head`) is not an
# error of linkfix's: stop quietly with the status a shell reports for SIGPIPE.
EXIT_BROKEN_PIPE = 128 + 13
EXIT_TERMINATED = 128 + 15
EXIT_INTERRUPTED = 128 + 2

# command name -> module providing `run(args) -> int`
COMMANDS = {
    "gen-stubs": "linkfix.stubgen.genstubs",
    "patch": "linkfix.postlink.patch",
    "inspect": "linkfix.postlink.inspect",
    "verify": "linkfix.postlink.verify",
}


class _Parser(argparse.ArgumentParser):
    """argparse with the error contract: a usage error is one line and exit 2."""

    def error(self, message: str):  # noqa: ANN201 - NoReturn, as in argparse
        self.exit(EXIT_BAD_INPUT, one_line(f"linkfix: {message} (see '{self.prog} --help')")
                  + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="linkfix",
        description="Generate patchable paravirt call sites and splice the chosen "
        "bodies into a linked image.",
    )
    parser.add_argument("--version", action="version", version=f"linkfix {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser("gen-stubs", help="render call sites, thunks and tables from an op spec")
    gen.add_argument("spec", help="op spec (TOML)")
    gen.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    gen.add_argument("--written", metavar="BACKEND",
                     help="a reference build: every site holds BACKEND's bytes as linked, "
                          "with no alternatives for objtool (docs/SPEC.md)")
    gen.add_argument("--no-cache", action="store_true",
                     help="neither use nor update the cache in OUTDIR (everything is "
                          "measured and rendered afresh)")
    _common(gen)

    patch = sub.add_parser("patch", help="splice the chosen bodies into every site of an image")
    patch.add_argument("image", help="linked ELF image")
    dest = patch.add_mutually_exclusive_group(required=True)
    dest.add_argument("-o", "--output", metavar="OUT", help="patched image to write")
    dest.add_argument("--in-place", action="store_true", help="replace IMAGE atomically")
    _selection(patch, required_target=False)
    _common(patch)

    insp = sub.add_parser("inspect", help="list every site, its state and its alternatives")
    insp.add_argument("image", help="linked ELF image")
    form = insp.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="one JSON document")
    form.add_argument("--jsonl", action="store_true",
                      help="JSON Lines: one object per site, then the summary objects")
    insp.add_argument("--summary", action="store_true",
                      help="only the totals per op and per backend")
    insp.add_argument("--site", action="append", default=[], metavar="ADDR|SYMBOL",
                      help="only this site: hex address, symbol (its sites) or symbol+offset "
                           "(repeatable)")
    insp.add_argument("--op", action="append", default=[], metavar="OP",
                      help="only the sites of this op (repeatable)")
    insp.add_argument("-o", "--output", metavar="FILE",
                      help="write to FILE (atomically) instead of stdout")
    _common(insp)

    ver = sub.add_parser("verify", help="check that every site holds what the selection implies")
    ver.add_argument("image", help="linked ELF image")
    _selection(ver, required_target=False)
    _common(ver)
    return parser


def _selection(p: argparse.ArgumentParser, required_target: bool) -> None:
    p.add_argument("--target", metavar="BACKEND", required=required_target,
                   help="backend for every site ('generic' restores the dispatch calls)")
    p.add_argument("--op", action="append", default=[], metavar="OP=BACKEND",
                   help="per-op override (repeatable)")
    p.add_argument("--policy", metavar="FILE",
                   help="TOML policy file: target = \"B\" and an [ops] table of OP = \"B\"")
    p.add_argument("--strict", action="store_true",
                   help="an op named on its own (--op, policy [ops]) without a body for its "
                        "backend is an error, not a warning")


def _common(p: argparse.ArgumentParser) -> None:
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("-v", "--verbose", action="store_true",
                      help="full command and statistics")
    talk.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    # SUPPRESS: a subcommand's default must not undo `linkfix --debug COMMAND`.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks on errors")


class Terminated(BaseException):
    """SIGTERM (make stopping its jobs): unwinds like Ctrl-C, so temporary files go."""


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    fileio.forget_commits()  # an earlier in-process run's outputs are not this run's
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    # Only the main thread may install handlers (main() can run inside a larger program).
    own_term = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _terminate) if own_term else None
    try:
        module = importlib.import_module(COMMANDS[args.command])
        return int(module.run(args))
    except Terminated:
        return stopped(EXIT_TERMINATED, "terminated")
    except LinkfixError as exc:
        if debug:
            traceback.print_exc()
        print(one_line(exc.line()), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return stopped(EXIT_INTERRUPTED, "interrupted")
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except MemoryError:
        # An input too large for this machine is bad input, not a crash.
        where = getattr(args, "image", None) or getattr(args, "spec", None)
        print(one_line(f"linkfix: {where}: not enough memory to process this file"),
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the contract: one line, exit 1
        if debug:
            traceback.print_exc()
        print(one_line(f"linkfix: internal error: {type(exc).__name__}: {exc}"),
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if own_term:
            signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)


def stopped(status: int, what: str) -> int:
    """The exit status after SIGINT/SIGTERM: success when the command had already
    committed all its outputs (the signal came while it was printing its report)."""
    if fileio.outputs_committed():
        return EXIT_OK
    print(f"linkfix: {what}", file=sys.stderr)
    return status


def one_line(text: str) -> str:
    """`text` with every unprintable character escaped: names read from a corrupt
    image (or a path) must not break the message over several lines."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (captured in-process): nothing will be flushed to a pipe
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
