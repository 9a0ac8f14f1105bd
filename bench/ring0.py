"""Part 1: the exact ring-0 cost of a site, from the sample kernel under QEMU.

`make -C sample_kernel bench` boots the sample kernel in each configuration
under `qemu-system-* -icount shift=0,sleep=off`, where the guest's rdtsc
counts retired instructions, and prints per-op instruction counts. This
module runs it and parses what it prints.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field

from common import ROOT, BenchError, fmt, pct, run

SAMPLE = os.path.join(ROOT, "sample_kernel")
ARCHES = ("x86_64", "i386")
TARGET_OVERHEAD_PCT = 0.5
LINUX_PV_OVERHEAD_PCT = 1.62
# Without a workload loop in the kernel: an irq-save section reading cr3,
# summed from the per-op counts.
SEQUENCE = ("save_fl", "irq_disable", "read_cr3", "restore_fl")
OP_ORDER = ("irq_disable", "irq_enable", "save_fl", "restore_fl", "read_cr2", "read_cr3",
            "write_cr3", "set_pte", "flush_tlb", "io_delay")
CONFIGS = ("nopv", "generic", "native", "xen", "lguest", "generic:xen", "generic:lguest",
           "boot:native", "boot:xen", "boot:lguest")
CONFIG_TITLES = {
    "nopv": "no paravirt",
    "generic": "generic (unpatched) on native",
    "native": "patched native",
    "xen": "patched xen",
    "lguest": "patched lguest",
    "generic:xen": "generic on xen",
    "generic:lguest": "generic on lguest",
    "boot:native": "generic, boot-patched for native",
    "boot:xen": "generic, boot-patched for xen",
    "boot:lguest": "generic, boot-patched for lguest",
}


@dataclass
class Ring0Result:
    available: bool = False
    failed: bool = False  # the bench target exists but did not work
    why: str = ""
    # arch -> config -> op -> guest instructions per op
    per_op: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # arch -> config -> guest instructions of the whole workload loop
    workload: dict[str, dict[str, float]] = field(default_factory=dict)
    workload_iters: dict[str, int] = field(default_factory=dict)
    # arch -> backend -> (sites, instructions) of one run of the boot patcher
    boot_patch: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    raw: str = ""

    def sequence(self, arch: str, config: str) -> float | None:
        """Instructions of one SEQUENCE (the sum of its ops' per-op counts)."""
        ops = self.per_op.get(arch, {}).get(config, {})
        if not all(op in ops for op in SEQUENCE):
            return None
        return sum(ops[op] for op in SEQUENCE)

    def totals(self, arch: str) -> dict[str, float]:
        """config -> instructions: the workload loop if the kernel ran one,
        else one SEQUENCE computed from the per-op counts."""
        if self.workload.get(arch):
            return self.workload[arch]
        out = {}
        for config in self.per_op.get(arch, {}):
            v = self.sequence(arch, config)
            if v is not None:
                out[config] = v
        return out

    def workload_pct(self, arch: str) -> float | None:
        w = self.workload.get(arch, {})
        if w.get("nopv") and "native" in w:
            return (w["native"] - w["nopv"]) / w["nopv"] * 100
        return None

    def site_delta_range(self, arch: str) -> tuple[float | None, float | None]:
        """Smallest and largest per-op difference, patched native - no paravirt."""
        c = self.per_op.get(arch, {})
        if "nopv" not in c or "native" not in c:
            return None, None
        d = [c["native"][op] - c["nopv"][op] for op in c["nopv"] if op in c["native"]]
        return (min(d), max(d)) if d else (None, None)

    def measured_workload(self, arch: str) -> bool:
        return bool(self.workload.get(arch))

    def markdown(self) -> list[str]:
        out = ["`make -C sample_kernel bench ARCH=<arch>`: the sample kernel boots under "
               "`qemu-system-* -accel tcg -icount shift=0,sleep=off`, where the guest's "
               "`rdtsc` counts retired instructions: every number is exact and identical "
               "from run to run. Per op: a loop of the op alone, minus the empty loop, per "
               "iteration (padding NOPs count: each is a retired instruction).", ""]
        for arch, configs in self.per_op.items():
            ops = [op for op in OP_ORDER if any(op in c for c in configs.values())]
            ops += sorted({op for c in configs.values() for op in c} - set(ops))
            cols = _order(configs)
            out += [f"### {arch}: instructions per op", ""]
            head = ["op", *[CONFIG_TITLES.get(c, c) for c in cols]]
            rows = [[op, *[fmt(configs[c].get(op), 2) for c in cols]] for op in ops]
            out += _table(head, rows) + [""]
        for arch in self.per_op:
            w = self.totals(arch)
            base = w.get("nopv")
            if self.measured_workload(arch):
                n = self.workload_iters.get(arch)
                per = f"{base / n:,.0f} instructions per iteration without paravirt; " \
                    if base and n else ""
                out += [f"### {arch}: workload loop", "",
                        "`bench_workload()` in `sample_kernel/kernel/bench.c` (its comment "
                        "says what an iteration does): "
                        f"{n or '?'} iterations, {per}exact totals.", ""]
            else:
                out += [f"### {arch}: one {' + '.join(SEQUENCE)} sequence", "",
                        "The kernel's bench has no workload loop yet: this is the sum of "
                        "the four per-op counts above, the sites alone with no other work "
                        "around them, so every padding NOP weighs as much as it ever can.",
                        ""]
            if self.measured_workload(arch):
                n = self.workload_iters.get(arch) or 1
                rows = [[CONFIG_TITLES.get(c, c), f"{w[c]:,.0f}",
                         f"{(w[c] - base) / n:+,.2f}" if base else "-",
                         pct((w[c] - base) / base * 100) if base else "-"] for c in _order(w)]
                out += _table(["configuration", "instructions", "extra per iteration",
                               "vs no paravirt"], rows) + [""]
                continue
            rows = [[CONFIG_TITLES.get(c, c), f"{w[c]:,.2f}",
                     pct((w[c] - base) / base * 100) if base else "-"] for c in _order(w)]
            out += _table(["configuration", "instructions", "vs no paravirt"], rows) + [""]
        for arch in self.per_op:
            lo, hi = self.site_delta_range(arch)
            if hi is None:
                continue
            out += [f"{arch}: a patched native site executes {lo:+.2f} to {hi:+.2f} "
                    "instructions more than the bare instruction per op: its padding NOP "
                    "(none when the body fills its site) and, where the op's fixed argument "
                    "or result register is not where the compiler keeps the value, a `mov`. "
                    "In a workload the overhead in instructions is that difference divided "
                    "by the instructions executed per site: under "
                    f"{TARGET_OVERHEAD_PCT} % needs at least {hi * 100 / TARGET_OVERHEAD_PCT:.0f}"
                    " instructions of other work per executed site.", ""]
        if self.boot_patch:
            out += ["### The boot patcher", "",
                    "`linkfix_boot_patch()` (generated `linkfix_boot.c`) run by the generic "
                    "image at boot (`bootpatch` on its command line), timed with rdtsc under "
                    "-icount: instructions for deciding and writing every site. The "
                    "\"generic, boot-patched for B\" columns above are that image "
                    "afterwards; they equal the \"patched B\" columns where the sites are "
                    "the same bytes.", "",
                    "| arch | backend | sites | instructions | per site |",
                    "| --- | --- | ---: | ---: | ---: |"]
            for arch, per in self.boot_patch.items():
                for backend, (n, t) in per.items():
                    out.append(f"| {arch} | {backend} | {n} | {t:,} | "
                               f"{t / n if n else 0:,.0f} |")
            out.append("")
        return out


def _order(configs: dict) -> list[str]:
    return [c for c in CONFIGS if c in configs] + sorted(set(configs) - set(CONFIGS))


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


# make arguments and the name results are filed under (gcc's under the plain arch)
TOOLCHAINS = (("gcc", (), ("gcc", "ld")), ("clang + GNU ld", ("CC=clang",), ("clang", "ld")),
              ("clang + ld.lld", ("LLVM=1",), ("clang", "ld.lld")))


def measure(quick: bool) -> Ring0Result:
    res = Ring0Result()
    if not has_bench_target():
        res.why = "sample_kernel/Makefile has no `bench` target yet."
        return res
    errors = []
    for name, args, tools in TOOLCHAINS:
        if not all(shutil.which(t) for t in tools):
            continue
        for arch in ARCHES:
            try:
                out = run(["make", "-s", "-C", SAMPLE, "bench", f"ARCH={arch}", *args, "V=1"],
                          timeout=900).stdout
            except BenchError as exc:
                errors.append(str(exc))
                continue
            res.raw += out
            one = Ring0Result()
            parse(out, one)
            key = arch if name == "gcc" else f"{arch}, {name}"
            for src, dst in ((one.per_op, res.per_op), (one.workload, res.workload),
                             (one.workload_iters, res.workload_iters),
                             (one.boot_patch, res.boot_patch)):
                if arch in src:
                    dst[key] = src[arch]
    res.available = bool(res.per_op or res.workload)
    if errors:
        res.failed = True
        res.why = "; ".join(errors)
    elif not res.available:
        res.why = "`make bench` printed nothing this parser understands."
    return res


_HEAD = re.compile(r"bench: arch=(?P<arch>\S+) backend=(?P<backend>\S+) patched=(?P<patched>\S+)"
                   r" paravirt=(?P<pv>[yn]) iterations=(?P<n>\d+) empty=(?P<empty>\d+)")
_OP = re.compile(r"bench (?P<op>[a-z_0-9]+): [0-9.]+ insns/op \((?P<total>\d+) total\)")
_WORK = re.compile(r"bench workload: (?P<total>\d+) insns(?: \((?P<n>\d+) iterations\))?")
_BOOT = re.compile(r"linkfix: boot-patched (?P<n>\d+) sites for (?P<b>\S+) in (?P<t>\d+) cycles")


def config_key(backend: str, patched: str, pv: str) -> str:
    """nopv, generic (unpatched, dispatching to `backend`'s bodies) or the patched target."""
    if pv == "n":
        return "nopv"
    if patched == "no":
        return "generic" if backend == "native" else f"generic:{backend}"
    if patched == "boot":
        return f"boot:{backend}"
    return patched


def parse(text: str, res: Ring0Result) -> None:
    """Fill `res` from what the sample kernel's bench.c prints (through `make bench`):

        bench: arch=A backend=B patched=P|no paravirt=y|n iterations=N empty=E
        bench OP: X.YY insns/op (T total)
        bench workload: T insns (N iterations)

    Per-op counts are recomputed exactly as (T - E) / N.
    """
    arch = key = None
    n = empty = 0
    boot: tuple[str, int, int] | None = None
    for line in text.splitlines():
        m = _BOOT.search(line)
        if m:
            boot = (m["b"], int(m["n"]), int(m["t"]))
            continue
        m = _HEAD.search(line)
        if m and boot is not None:
            res.boot_patch.setdefault(m["arch"], {})[boot[0]] = boot[1:]
            boot = None
        if m:
            arch = m["arch"]
            key = config_key(m["backend"], m["patched"], m["pv"])
            n, empty = int(m["n"]), int(m["empty"])
            continue
        if arch is None or key is None:
            continue
        m = _OP.search(line)
        if m:
            per = max(0, int(m["total"]) - empty) / n
            res.per_op.setdefault(arch, {}).setdefault(key, {})[m["op"]] = per
            continue
        m = _WORK.search(line)
        if m:
            res.workload.setdefault(arch, {})[key] = float(m["total"])
            if m["n"]:
                res.workload_iters[arch] = int(m["n"])
