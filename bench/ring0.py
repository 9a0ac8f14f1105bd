"""Part 1: the exact ring-0 cost of a site, from the sample kernel under QEMU.

`make -C sample_kernel bench` boots the sample kernel in each configuration
under `qemu-system-* -icount shift=0,sleep=off`, where the guest's rdtsc
counts retired instructions, and prints per-op instruction counts. This
module runs it and parses what it prints.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from common import ROOT, BenchError, fmt, pct, run

SAMPLE = os.path.join(ROOT, "sample_kernel")
TARGET_OVERHEAD_PCT = 0.5
LINUX_PV_OVERHEAD_PCT = 1.62
CONFIGS = ("nopv", "generic", "native", "xen", "lguest")
CONFIG_TITLES = {
    "nopv": "no paravirt (bare instructions)",
    "generic": "linkfix generic (unpatched, dispatch)",
    "native": "linkfix patched native",
    "xen": "linkfix patched xen",
    "lguest": "linkfix patched lguest",
}


@dataclass
class Ring0Result:
    available: bool = False
    why: str = ""
    # arch -> config -> op -> guest instructions per op
    per_op: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # arch -> config -> guest instructions of the whole workload loop
    workload: dict[str, dict[str, float]] = field(default_factory=dict)
    workload_desc: str = ""
    raw: str = ""
    headline_arch: str = "x86_64"

    def headline_pct(self) -> float | None:
        w = self.workload.get(self.headline_arch, {})
        if "nopv" in w and "native" in w and w["nopv"]:
            return (w["native"] - w["nopv"]) / w["nopv"] * 100
        return None

    def markdown(self) -> list[str]:
        out = ["`make -C sample_kernel bench`: the sample kernel boots under "
               "`qemu-system-* -accel tcg -icount shift=0,sleep=off`, where the guest's "
               "`rdtsc` counts retired instructions: every number is exact and identical "
               "from run to run.", ""]
        for arch, configs in self.per_op.items():
            ops = sorted({op for c in configs.values() for op in c})
            cols = [c for c in CONFIGS if c in configs]
            out += [f"### {arch}: instructions per op", ""]
            head = ["op", *[CONFIG_TITLES[c] for c in cols]]
            rows = [[op, *[fmt(configs[c].get(op), 1) for c in cols]] for op in ops]
            out += _table(head, rows) + [""]
        for arch, w in self.workload.items():
            base = w.get("nopv")
            out += [f"### {arch}: workload loop", "", self.workload_desc, ""]
            rows = [[CONFIG_TITLES[c], f"{w[c]:,.0f}",
                     pct((w[c] - base) / base * 100) if base else "-"]
                    for c in CONFIGS if c in w]
            out += _table(["configuration", "instructions", "vs no paravirt"], rows) + [""]
        return out


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |",
           "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def has_bench_target() -> bool:
    mk = os.path.join(SAMPLE, "Makefile")
    if not os.path.exists(mk):
        return False
    with open(mk) as f:
        return re.search(r"^bench\s*:", f.read(), re.M) is not None


def measure(quick: bool) -> Ring0Result:
    res = Ring0Result()
    if not has_bench_target():
        res.why = "sample_kernel/Makefile has no `bench` target yet."
        return res
    try:
        out = run(["make", "-s", "-C", SAMPLE, "bench"], timeout=900).stdout
    except BenchError as exc:
        res.why = str(exc)
        return res
    res.raw = out
    parse(out, res)
    res.available = bool(res.per_op or res.workload)
    if not res.available:
        res.why = "`make bench` printed nothing this parser understands."
    return res


def parse(text: str, res: Ring0Result) -> None:
    """Fill `res` from `make bench` output (format settled with the sample kernel)."""
    raise NotImplementedError
