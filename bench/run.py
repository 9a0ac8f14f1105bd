"""Run every linkfix benchmark and regenerate docs/BENCHMARKS.md and docs/benchmarks.png.

    .venv/bin/python bench/run.py            # the full run (1-2 minutes)
    .venv/bin/python bench/run.py --quick    # smoke run, written to build/bench/
    .venv/bin/python bench/run.py --only genstubs --merge   # redo one part's figures in
                                                            # docs/BENCHMARKS.md (mdmerge.py)

Parts: ring0 (sample kernel under QEMU -icount), sites (one site in user
space, every site shape), pressure (register pressure), postlink (speed of
`linkfix patch`), padding (what prefixes, NOPs and jumps cost in user space),
tables (table bytes per site), genstubs (gen-stubs' unchanged re-run against a
first run and a Python start-up). Installs nothing: it stops with a message if a tool it needs
is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
sys.path.insert(1, os.path.dirname(BENCH_DIR))  # the linkfix package, from the checkout

import common  # noqa: E402
from common import BUILD, ROOT, BenchError, ensure_dir, rel  # noqa: E402

from linkfix.fileio import write_atomic  # noqa: E402

TYPE_CHECKING = False
if TYPE_CHECKING:
    import report

PARTS = ("ring0", "sites", "pressure", "postlink", "padding", "tables", "genstubs")
NEEDED_TOOLS = {"gcc": "gcc", "as": "binutils", "objdump": "binutils", "nm": "binutils",
                "size": "binutils", "taskset": "util-linux", "make": "make"}


def check_environment() -> list[str]:
    """Missing prerequisites, as messages (matplotlib first: it is the usual one)."""
    missing = []
    if importlib.util.find_spec("matplotlib") is None:
        missing.append(f"matplotlib is not installed in {sys.executable}'s environment: "
                       "run `bash .ci/bootstrap.sh` (or `.venv/bin/python -m pip install "
                       "matplotlib`)")
    for tool, pkg in NEEDED_TOOLS.items():
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` not found (Debian package {pkg})")
    return missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Run every linkfix benchmark; regenerate docs/BENCHMARKS.md and "
                    "docs/benchmarks.png.")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: fewer repeats, no 1M-site image; output to build/bench/")
    ap.add_argument("--only", metavar="PARTS",
                    help=f"comma-separated subset of {','.join(PARTS)} (output to build/bench/)")
    ap.add_argument("--out", metavar="DIR",
                    help="where BENCHMARKS.md and benchmarks.png go (default: docs/ for a "
                         "full run, build/bench/ otherwise)")
    ap.add_argument("--merge", action="store_true",
                    help="with --only: replace those parts' sections, summary rows and "
                         "commands in the existing BENCHMARKS.md (in --out, default docs/), "
                         "keeping everything else; the chart is left as it is")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every command")
    args = ap.parse_args(argv)

    parts = PARTS
    if args.only:
        parts = tuple(p.strip() for p in args.only.split(",") if p.strip())
        bad = [p for p in parts if p not in PARTS]
        if bad:
            ap.error(f"unknown part(s): {', '.join(bad)}")
    if args.merge and (not args.only or args.quick):
        ap.error("--merge needs --only, and merges no --quick figures")
    missing = check_environment()
    if missing:
        for m in missing:
            print(f"bench/run.py: {m}", file=sys.stderr)
        return 2
    partial = args.quick or parts != PARTS
    out_dir = args.out or (ensure_dir(BUILD) if partial and not args.merge
                           else os.path.join(ROOT, "docs"))
    common.LOG.verbose = args.verbose
    ensure_dir(BUILD)

    # Imported here: they import linkfix, lief and friends.
    import chart
    import genstubs_rerun
    import machine
    import postlink
    import prefixcost
    import pressure
    import report
    import ring0
    import tablebytes
    import usersites

    cmd = "bench/run.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    res = report.Results(machine=machine.describe(), command=cmd.strip(), quick=args.quick)
    t0 = time.monotonic()

    def step(name: str, fn) -> None:  # noqa: ANN001
        if name not in parts:
            res.errors[name] = "not run (--only)"
            return
        t = time.monotonic()
        print(f"bench: {name} ...", flush=True)
        try:
            fn()
        except BenchError as exc:
            res.errors[name] = str(exc)
            print(f"bench: {name}: FAILED: {exc}", file=sys.stderr, flush=True)
        print(f"bench: {name} done in {time.monotonic() - t:.0f} s", flush=True)

    def do_ring0() -> None:
        res.ring0 = ring0.measure(args.quick)
        if res.ring0.failed:
            raise BenchError(res.ring0.why)
        if not res.ring0.available:
            print(f"bench: ring0: not available: {res.ring0.why}", flush=True)

    def do_sites() -> None:
        for arch in ("x86_64", "i386"):
            res.sites[arch] = usersites.measure(arch, args.quick)

    def do_pressure() -> None:
        hz = next((r.tsc_hz for r in res.sites.values() if r.tsc_hz), 0.0)
        for arch in ("x86_64", "i386"):
            res.pressure[arch] = pressure.measure(arch, args.quick, hz)

    def do_postlink() -> None:
        res.postlink = postlink.measure(args.quick)

    step("ring0", do_ring0)
    step("sites", do_sites)
    step("pressure", do_pressure)
    step("postlink", do_postlink)

    def do_padding() -> None:
        res.padding = prefixcost.measure(args.quick)
        if res.padding.error:
            raise BenchError(res.padding.error)

    def do_tables() -> None:
        res.tables = tablebytes.measure(args.quick)

    def do_genstubs() -> None:
        res.genstubs = genstubs_rerun.measure(args.quick)

    step("padding", do_padding)
    step("tables", do_tables)
    step("genstubs", do_genstubs)
    res.elapsed_s = time.monotonic() - t0
    res.commands = common.LOG.commands

    md_path = os.path.join(ensure_dir(out_dir), "BENCHMARKS.md")
    if args.merge:
        return _merge(md_path, report.render(res), parts, res)
    png_path = os.path.join(out_dir, "benchmarks.png")
    chart.draw(res, png_path + ".tmp.png")
    os.replace(png_path + ".tmp.png", png_path)
    write_atomic(md_path, report.render(res).encode())
    print(f"bench: wrote {rel(md_path)} and {rel(png_path)} in {res.elapsed_s:.0f} s")
    for t in report.targets(res):
        print(f"  {t.what}: {t.measured} (target {t.target}): {report.mark(t.met)}")
    return 1 if res.errors and any(v != "not run (--only)" for v in res.errors.values()) else 0


def _merge(md_path: str, text: str, parts: tuple[str, ...], res: report.Results) -> int:
    """Merge the parts that ran into the BENCHMARKS.md at `md_path` (a failed part is
    not merged: its old figures stay)."""
    import mdmerge

    failed = {p: why for p, why in res.errors.items() if p in parts}
    for p, why in failed.items():
        print(f"bench: {p}: not merged: {why}", file=sys.stderr)
    done = tuple(p for p in parts if p not in failed)
    if not done:
        return 1
    try:
        with open(md_path, encoding="utf-8") as f:
            old = f.read()
        merged = mdmerge.merge(old, text, done, res.command)
    except (OSError, BenchError) as exc:
        print(f"bench/run.py: cannot merge into {rel(md_path)}: {exc}", file=sys.stderr)
        return 2
    write_atomic(md_path, merged.encode())
    print(f"bench: merged {', '.join(done)} into {rel(md_path)} in {res.elapsed_s:.0f} s "
          "(the chart is left as it is)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
