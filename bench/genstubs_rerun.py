"""gen-stubs: a first run against an unchanged re-run (the cache) and a bare Python start-up.

    .venv/bin/python bench/genstubs_rerun.py           # 10, 100, 1000 ops; prints the table
    .venv/bin/python bench/genstubs_rerun.py --quick   # fewer repeats
    .venv/bin/python bench/run.py --only genstubs      # the same, as section 7 of BENCHMARKS.md

The spec with N ops repeats the ops of tests/specs/x86_64.toml (three backends;
cli/sti, pushf/pop, %gs and RIP-relative stores, whole-call and inline bodies
with calls and local jumps, an empty body), renamed `<op>_<i>`. Every command
is a subprocess, process start included; the rounds interleave the commands so
that a busy machine slows them alike, and each figure is a median.

* *first run*: into a new directory, so with no cache (the cache is
  OUTDIR/.linkfix.cache: everything measured, checked, rendered and written,
  then the cache written);
* *re-run, --no-cache*: the same spec into the same directory, ignoring the
  cache: what every re-run cost before the cache;
* *re-run*: the same again with the cache: nothing assembled or rendered;
* *python -c pass*: starting the interpreter, the least any Python command costs;
* *import linkfix.cli*: Python plus linkfix's command-line module, the least a
  `linkfix` command costs before it does anything.

Python may write its bytecode cache (to build/bench/pycache, whatever
PYTHONDONTWRITEBYTECODE says), as it does for an installed linkfix.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field

from common import BUILD, LOG, PYTHON, ROOT, BenchError, ensure_dir, linkfix_cmd, median

SIZES = (10, 100, 1000)
HEADING = "## 7. gen-stubs: an unchanged re-run"
SUMMARY = "gen-stubs, unchanged re-run"  # how its row in the summary begins
BASE_SPEC = os.path.join(ROOT, "tests", "specs", "x86_64.toml")


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return median(self.seconds) if self.seconds else None


@dataclass
class SizeResult:
    ops: int
    bodies: int
    first: Timing = field(default_factory=Timing)
    nocache: Timing = field(default_factory=Timing)
    rerun: Timing = field(default_factory=Timing)
    # measured in the same rounds as this size's re-runs (a busy machine varies)
    python_start: Timing = field(default_factory=Timing)
    import_cli: Timing = field(default_factory=Timing)


@dataclass
class RerunResult:
    sizes: list[SizeResult] = field(default_factory=list)
    reps_fast: int = 0
    reps_slow: int = 0
    notes: list[str] = field(default_factory=list)


# ---- the spec ------------------------------------------------------------------


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a TOML basic string


def spec_text(n: int) -> tuple[str, int]:
    """A spec with `n` ops (the test spec's, cycled) and its number of bodies."""
    with open(BASE_SPEC, "rb") as f:
        base = tomllib.load(f)
    head = base["linkfix"]
    lines = ["[linkfix]", f"arch = {_toml_str(head['arch'])}",
             "backends = [" + ", ".join(map(_toml_str, head["backends"])) + "]",
             f"default_backend = {_toml_str(head['default_backend'])}", ""]
    ops = list(base["ops"].items())
    bodies = 0
    for i in range(n):
        name, op = ops[i % len(ops)]
        lines.append(f"[ops.{name}_{i}]")
        for key in ("args", "clobbers"):
            if key in op:
                lines.append(f"{key} = [" + ", ".join(map(_toml_str, op[key])) + "]")
        if "returns" in op:
            lines.append(f"returns = {_toml_str(op['returns'])}")
        if "calls" in op:
            lines.append(f"[ops.{name}_{i}.calls]")
            lines += [f"{fn} = {_toml_str(sig)}" for fn, sig in op["calls"].items()]
        lines.append(f"[ops.{name}_{i}.bodies]")
        lines += [f"{b} = {_toml_str(text)}" for b, text in op["bodies"].items()]
        bodies += len(op["bodies"])
        lines.append("")
    return "\n".join(lines), bodies


# ---- running -------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPYCACHEPREFIX=os.path.join(BUILD, "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _timed(cmd: list[str], env: dict[str, str], log: bool) -> float:
    if log:
        LOG.note(cmd)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise BenchError(f"{' '.join(cmd)}: exit {proc.returncode}: {tail}")
    return elapsed


def _fresh(out: str) -> None:
    """No output directory, so no cache (it lives in OUTDIR)."""
    shutil.rmtree(out, ignore_errors=True)


def measure(quick: bool) -> RerunResult:
    res = RerunResult(reps_fast=5 if quick else 15, reps_slow=1 if quick else 3)
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > cpus:
        res.notes.append(f"The machine was busy (load average {load:.1f} on {cpus} CPUs when "
                         "the run began): the figures are noisy.")
    work = ensure_dir(os.path.join(BUILD, "genstubs_rerun"))
    env = _env()
    start = [PYTHON, "-c", "pass"]
    imp = [PYTHON, "-c", "import linkfix.cli"]
    for n in SIZES:
        text, bodies = spec_text(n)
        spec = os.path.join(work, f"spec_{n}.toml")
        with open(spec, "w") as f:
            f.write(text)
        out = os.path.join(work, f"gen_{n}")
        r = SizeResult(n, bodies)
        gen = linkfix_cmd("gen-stubs", spec, "-o", out, "-q")
        _fresh(out)
        _timed(gen, env, log=False)  # warm-up: bytecode and page caches
        for rep in range(res.reps_fast):
            first = rep == 0
            if rep < res.reps_slow:
                _fresh(out)
                r.first.seconds.append(_timed(gen, env, first))
                r.nocache.seconds.append(_timed([*gen, "--no-cache"], env, first))
            r.rerun.seconds.append(_timed(gen, env, first))
            r.python_start.seconds.append(_timed(start, env, first and n == SIZES[0]))
            r.import_cli.seconds.append(_timed(imp, env, first and n == SIZES[0]))
        res.sizes.append(r)
    return res


# ---- the report ----------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def markdown(res: RerunResult) -> list[str]:
    """A table of the figures, and how close an unchanged re-run comes to a Python start."""
    out = ["| ops | bodies | first run (ms) | re-run, --no-cache (ms) | re-run (ms) | "
           "python -c pass (ms) | import linkfix.cli (ms) | re-run / start-up |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in res.sizes:
        py = s.python_start.median
        ratio = f"{s.rerun.median / py:.1f}x" if s.rerun.median and py else "-"
        out.append(f"| {s.ops:,} | {s.bodies:,} | {_ms(s.first.median)} | "
                   f"{_ms(s.nocache.median)} | {_ms(s.rerun.median)} | {_ms(py)} | "
                   f"{_ms(s.import_cli.median)} | {ratio} |")
    out.append("")
    big = res.sizes[-1] if res.sizes else None
    py = big.python_start.median if big else None
    cli = big.import_cli.median if big else None
    if big and big.rerun.median and py and cli:
        speedup = (f", {big.nocache.median / big.rerun.median:.0f}x faster than re-running "
                   "without the cache" if big.nocache.median else "")
        out.append(
            f"Medians of {res.reps_fast} runs ({res.reps_slow} for the first run and "
            f"--no-cache), in interleaved rounds. An unchanged re-run of {big.ops:,} ops "
            f"takes {big.rerun.median * 1000:.0f} ms{speedup}: "
            f"{big.rerun.median / py:.1f} times a bare Python start-up "
            f"({py * 1000:.0f} ms), and {big.rerun.median / cli:.1f} times "
            f"`python -c 'import linkfix.cli'` ({cli * 1000:.0f} ms), the least any linkfix "
            "command costs.")
    if res.notes:
        out += ["", *res.notes]
    return out


def section(res: RerunResult | None, why: str) -> list[str]:
    """Section 7 of docs/BENCHMARKS.md (bench/report.py)."""
    out = [HEADING, "",
           "`bench/genstubs_rerun.py`: `linkfix gen-stubs` on specs of 10, 100 and 1,000 ops "
           "(tests/specs/x86_64.toml's ops, cycled), each command a whole process. *first "
           "run*: into a new OUTDIR (no cache: everything assembled, checked, rendered and "
           "written, then OUTDIR/.linkfix.cache); *re-run, --no-cache*: the same spec again "
           "without the cache, what every re-run cost before it; *re-run*: the same with the "
           "cache, which assembles, renders and writes nothing (docs/SPEC.md, \"The cache\").",
           ""]
    if res is None:
        return out + [f"Not measured: {why}", ""]
    return out + markdown(res) + [""]


def summary_row(res: RerunResult | None) -> tuple[str, str, str] | None:
    """(what, target, measured) for the summary table: the largest spec's re-run
    against a bare Python start-up (issue 14: "about one Python start-up")."""
    big = res.sizes[-1] if res is not None and res.sizes else None
    if big is None or not big.rerun.median or not big.python_start.median:
        return None
    r, py = big.rerun.median, big.python_start.median
    cli = big.import_cli.median
    return (f"{SUMMARY} of {big.ops:,} ops: time / `python -c pass`",
            "about one Python start-up (informational)",
            f"{r / py:.1f}x ({r * 1000:.0f} ms vs {py * 1000:.0f} ms"
            + (f"; {r / cli:.1f}x `import linkfix.cli`)" if cli else ")"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args(argv)
    try:
        res = measure(args.quick)
    except BenchError as exc:
        print(f"bench/genstubs_rerun.py: {exc}", file=sys.stderr)
        return 1
    print("\n".join(markdown(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
