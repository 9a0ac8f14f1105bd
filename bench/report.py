"""docs/BENCHMARKS.md, generated from the results of one run."""

from __future__ import annotations

from dataclasses import dataclass, field

import before
import genstubs_rerun
import usersites
from common import fmt, median, pct
from genstubs_rerun import RerunResult
from machine import Machine
from postlink import (
    INSPECT_FORMATS,
    INSPECT_MEMORY_X,
    INSPECT_TIME_X,
    TARGET_1M_S,
    TARGET_SPEEDUP,
    PostlinkResult,
)
from prefixcost import PrefixResult
from prefixcost import markdown as prefixcost_markdown
from pressure import VARIANTS as PRESSURE_VARIANTS
from pressure import WORKLOADS as PRESSURE_WORKLOADS
from pressure import PressureResult
from ring0 import LINUX_PV_OVERHEAD_PCT, TARGET_OVERHEAD_PCT, Ring0Result
from tablebytes import ImageTables
from tablebytes import markdown as tablebytes_markdown
from usersites import ArchResult

from linkfix.stubgen.sitefill import PREFIX_CAP as SITEFILL_CAP  # noqa: E402

RATIO_TOLERANCE = 0.03  # rdtsc loops pinned to one CPU agree within ~3 % at best


@dataclass
class Results:
    machine: Machine
    command: str
    quick: bool
    ring0: Ring0Result | None = None
    sites: dict[str, ArchResult] = field(default_factory=dict)
    pressure: dict[str, PressureResult] = field(default_factory=dict)
    postlink: PostlinkResult | None = None
    padding: PrefixResult | None = None
    tables: list[ImageTables] = field(default_factory=list)
    genstubs: RerunResult | None = None
    errors: dict[str, str] = field(default_factory=dict)  # part -> why it did not run
    commands: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


@dataclass
class Target:
    what: str
    target: str
    measured: str
    met: bool | None  # None: not measured


def _table(head: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def mark(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "-"}[met]


# ---- targets -------------------------------------------------------------------


def patched_ratio(r: ArchResult, op: str) -> float | None:
    p, i = r.net_ticks(f"lfpatched_{op}"), r.net_ticks(f"inline_{op}")
    return None if p is None or i is None or i <= 0 else p / i


def noise(r: ArchResult, op: str) -> float:
    """Relative noise of the site loops: the larger of RATIO_TOLERANCE and the
    difference between two loops whose sites are byte-identical (the patched
    image's loop and the compile-time model's)."""
    a, b = r.net_ticks(f"lfpatched_{op}"), r.net_ticks(f"lfmodel_{op}")
    if a and b and a > 0:
        return max(RATIO_TOLERANCE, abs(b / a - 1))
    return RATIO_TOLERANCE


def targets(res: Results) -> list[Target]:
    out: list[Target] = []
    r0 = res.ring0
    target = f"< {TARGET_OVERHEAD_PCT} % (Linux pvops 2009: +{LINUX_PV_OVERHEAD_PCT} %)"
    if r0 is not None and r0.available:
        for arch in r0.workload:
            v = r0.workload_pct(arch)
            if v is not None:
                out.append(Target(f"Ring 0 {arch}: workload loop, patched native vs no "
                                  "paravirt, instructions", target, pct(v),
                                  v < TARGET_OVERHEAD_PCT))
        if not r0.workload:
            out.append(Target("Ring 0: workload loop, patched native vs no paravirt, "
                              "instructions", target, "no workload loop in the sample "
                              "kernel's bench", None))
        for arch in r0.per_op:
            lo, hi = r0.site_delta_range(arch)
            if lo is not None:
                span = f"{lo:+.2f}" if lo == hi else f"{lo:+.2f} to {hi:+.2f}"
                out.append(Target(f"Ring 0 {arch}: each executed site, patched native - no "
                                  "paravirt (instructions per op)", "informational",
                                  span, None))
    else:
        out.append(Target("Ring 0: patched native vs no paravirt, instructions", target,
                          "-", None))
    for arch, r in res.sites.items():
        for op in ("save_fl", "flag_off"):
            ratio = patched_ratio(r, op)
            tol = noise(r, op)
            out.append(Target(f"User space {arch}: patched / hand-inline, {op}, time",
                              f"<= 1.00 + noise ({tol:.2f})", fmt(ratio),
                              None if ratio is None else ratio <= 1 + tol))
    for arch, p in res.pressure.items():
        full, lf = p.median_ticks("native_full"), p.median_ticks("native_linkfix")
        if full and lf:
            sf, sl = p.static["native_full"], p.static["native_linkfix"]
            out.append(Target(f"Register pressure {arch}: linkfix vs full C-ABI clobbers, "
                              "hungry() native workload", "informational",
                              f"{(lf / full - 1) * 100:+.1f} % time; stack accesses "
                              f"{sl.stack_loads + sl.stack_stores} vs "
                              f"{sf.stack_loads + sf.stack_stores}", None))
    for r in res.tables:
        if r.op_sites:
            rec = r.sizes.get(".linkfix.sites", 0) / r.op_sites
            out.append(Target(f"Site record bytes, {r.name}", "<= 8 (Linux alt_instr: 14 per "
                              "alternative)", f"{rec:.0f}", rec <= 8))
    pl = res.postlink
    if pl is not None:
        big = next((s for s in pl.sizes if s.sites == 1_000_000), None)
        if big is not None and big.patch.median is not None:
            out.append(Target("`linkfix patch`, 1,000,000 sites, end to end",
                              f"<= {TARGET_1M_S:.1f} s", f"{big.patch.median:.2f} s",
                              big.patch.median <= TARGET_1M_S))
        else:
            out.append(Target("`linkfix patch`, 1,000,000 sites, end to end",
                              f"<= {TARGET_1M_S:.1f} s", "-", None))
        if big is not None and big.patch_lief.median is not None:
            out.append(Target("`linkfix patch`, 1,000,000 sites, lief reading the image "
                              "(`LINKFIX_ELF_READER=lief`)", f"<= {TARGET_1M_S:.1f} s",
                              f"{big.patch_lief.median:.2f} s",
                              big.patch_lief.median <= TARGET_1M_S))
        for s in pl.sizes:
            naive = s.naive.median or s.naive_extrapolated
            if s.patch.median and naive:
                speed = naive / s.patch.median
                label = " (naive extrapolated)" if s.naive.median is None else ""
                out.append(Target(f"`linkfix patch` vs naive lief loop, {s.sites:,} sites{label}",
                                  f">= {TARGET_SPEEDUP:.0f}x", f"{speed:.1f}x",
                                  speed >= TARGET_SPEEDUP))
            full = s.naive_full.median
            if s.patch.median and full:
                speed = full / s.patch.median
                out.append(Target(f"`linkfix patch` vs complete naive pass (lief + capstone "
                                  f"per site), {s.sites:,} sites", f">= {TARGET_SPEEDUP:.0f}x",
                                  f"{speed:.1f}x", speed >= TARGET_SPEEDUP))
        out += _inspect_targets(pl)
    row = genstubs_rerun.summary_row(res.genstubs)
    if row is not None:
        out.append(Target(*row, None))
    return out


def _inspect_targets(pl: PostlinkResult) -> list[Target]:
    """inspect at 1,000,000 sites: time against patch's, peak memory against the image."""
    out = []
    big = next((s for s in pl.sizes if s.sites == 1_000_000), None)
    for form, _argv in INSPECT_FORMATS:
        label = "" if form == "text" else f" --{form}"
        tx = big.inspect_time_x(form) if big is not None else None
        t = big.inspect.get(form) if big is not None else None
        out.append(Target(f"`linkfix inspect{label}`, 1,000,000 sites: time / `linkfix patch` "
                          "time", f"<= {INSPECT_TIME_X:.0f}x",
                          f"{tx:.1f}x ({t.median:.1f} s)" if tx is not None and t else "-",
                          None if tx is None else tx <= INSPECT_TIME_X))
        mx = big.inspect_memory_x(form) if big is not None else None
        out.append(Target(f"`linkfix inspect{label}`, 1,000,000 sites: peak memory / image "
                          "size", f"<= {INSPECT_MEMORY_X:.0f}x",
                          f"{mx:.1f}x ({t.peak_kb / 1024:.0f} MB)" if mx is not None and t
                          else "-", None if mx is None else mx <= INSPECT_MEMORY_X))
    return out


# ---- sections ------------------------------------------------------------------


def _summary(res: Results) -> list[str]:
    rows = [[t.what, t.target, t.measured, mark(t.met)] for t in targets(res)]
    out = ["## Summary", ""]
    out += _table(["what", "target", "measured", ""], rows, "llrl")
    missed = [t for t in targets(res) if t.met is False]
    if missed:
        out += ["", "Targets missed, by how much and why:", ""]
        for t in missed:
            out.append(f"* {t.what}: {t.measured} against {t.target}. {_why(res, t)}")
    return out + [""]


def _why(res: Results, t: Target) -> str:
    if t.what.startswith("`linkfix patch`, 1,000,000 sites, lief"):
        pl = res.postlink
        big = next(s for s in pl.sizes if s.sites == 1_000_000)
        extra = big.patch_lief.median - big.patch.median
        return (f"{big.patch_lief.median / TARGET_1M_S:.2f}x the budget: "
                f"{extra:.2f} s more than the hand reader's {big.patch.median:.2f} s, of which "
                f"importing lief alone is {pl.import_lief.median or 0.0:.2f} s; the rest is "
                "lief parsing the image and the checks of every fact it returns against the "
                "raw bytes (docs/READER.md). So the hand reader stays the default, as the "
                "issue allows when lief cannot meet the budget.")
    if t.what.startswith("`linkfix patch`, 1,000,000"):
        big = next(s for s in res.postlink.sizes if s.sites == 1_000_000)
        return (f"{big.patch.median / TARGET_1M_S:.2f}x the budget. "
                + _patch_breakdown(res.postlink, big))
    if t.what.startswith("`linkfix patch` vs complete naive"):
        pl = res.postlink
        s = next(x for x in pl.sizes if f"{x.sites:,} sites" in t.what)
        need = s.naive_full.median / TARGET_SPEEDUP
        imports = pl.import_patch.median or 0.0
        per_site = (s.patch.median - imports) / s.sites * 1e6
        return (f"The complete naive pass takes {s.naive_full.median:.2f} s and linkfix "
                f"{s.patch.median:.3f} s; 10x needs {need:.3f} s, "
                f"{(1 - need / s.patch.median) * 100:.0f} % less than linkfix takes. Of "
                f"linkfix's time, {imports:.3f} s is starting Python and importing "
                f"linkfix.patch; the rest is {per_site:.2f} us per site (validating every "
                "record, then splicing).")
    if t.what.startswith("`linkfix patch` vs naive"):
        s = next(x for x in res.postlink.sizes if f"{x.sites:,} sites" in t.what)
        return _patch_breakdown(res.postlink, s)
    if t.what.startswith("`linkfix inspect"):
        return _inspect_why(res.postlink, t)
    if t.what.startswith("User space"):
        return ("the difference is larger than the run-to-run noise of this loop; see "
                "the instruction counts in part 2 for where it comes from.")
    if t.what.startswith("Ring 0"):
        return "see part 1 for the per-op counts behind it."
    return ""


def _inspect_why(pl: PostlinkResult, t: Target) -> str:
    big = next(s for s in pl.sizes if s.sites == 1_000_000)
    mb = big.image_bytes / 2**20
    parts = []
    if big.validate.peak_kb:
        parts.append(f"Reading the {mb:.0f} MB image mapped and validating its records alone "
                     f"(inspect's floor) peaks at {big.validate.peak_kb / 1024:.0f} MB, "
                     f"{big.validate.peak_kb * 1024 / big.image_bytes:.1f}x the image")
    if big.patch.peak_kb:
        parts.append(f"`linkfix patch` peaks at {big.patch.peak_kb / 1024:.0f} MB "
                     f"({big.patch.peak_kb * 1024 / big.image_bytes:.1f}x)")
    text = "; ".join(parts)
    if "memory" in t.what:
        return (text + ". Inspect adds one block of sites at a time (each alternative's "
                "bytes for the block, made by C-level passes, and the totals counted as it "
                "goes) and the interpreter's own; the listing itself is streamed.")
    return text + "." if text else ""


def _patch_breakdown(pl: PostlinkResult, s) -> str:  # noqa: ANN001
    start = pl.python_start.median or 0.0
    imports = pl.import_patch.median or 0.0
    lief_imp = pl.import_lief.median or 0.0
    per_site = ((s.patch.median or 0.0) - imports) / s.sites * 1e6
    floor = s.pyfloor.median or 0.0
    floor_site = (floor - start) / s.sites * 1e6
    naive = s.naive.median or s.naive_extrapolated or 0.0
    need = naive / TARGET_SPEEDUP
    text = (f"Of {s.patch.median:.3f} s, {imports:.3f} s is starting Python and importing "
            f"linkfix.patch; the rest is {per_site:.2f} us per site (a plain copy of the "
            f"{s.image_bytes / 1e6:.0f} MB image takes {s.copy.median:.3f} s). The naive "
            f"loop's {naive:.3f} s is also a Python loop over the sites ({lief_imp:.3f} s "
            f"of it is importing lief): both pay the interpreter per site. A Python loop "
            f"that only unpacks each record and writes 5 bytes (bench/pyloop_floor.py) takes "
            f"{floor:.3f} s here ({floor_site:.2f} us per site). ")
    if need <= imports:
        return text + (f"{TARGET_SPEEDUP:.0f}x means {need:.3f} s: less than starting "
                       "Python and importing linkfix.patch alone.")
    if need <= floor:
        return text + (f"{TARGET_SPEEDUP:.0f}x means {need:.3f} s: below the floor of any "
                       "per-site Python loop; it needs the per-site work batched (one pass "
                       "per distinct body shape, or numpy) or moved out of Python.")
    return text + (f"{TARGET_SPEEDUP:.0f}x means {need:.3f} s: "
                   f"{(need - imports) / s.sites * 1e6:.2f} us per site after start-up.")


def _machine(res: Results) -> list[str]:
    m = res.machine
    rows = [["CPU", m.cpu], ["cores", str(m.cores)], ["virtualized", m.hypervisor],
            ["kernel", m.kernel]]
    rows += [[k, v] for k, v in m.tools.items()]
    rows += [["date", m.date], ["run time of the whole command", f"{res.elapsed_s:.0f} s"]]
    if res.quick:
        rows.append(["mode", "--quick (smoke run: fewer repeats and sizes; not for citing)"])
    return ["## Machine", ""] + _table(["", ""], rows, "ll") + [""]


def _ring0(res: Results) -> list[str]:
    out = ["## 1. Ring 0: exact instruction counts under QEMU", ""]
    r0 = res.ring0
    if r0 is None or not r0.available:
        why = res.errors.get("ring0") or (r0.why if r0 else "not run")
        return out + [f"Not measured: {why}", ""]
    if "ring0" in res.errors:
        out += [f"Partly measured: {res.errors['ring0']}", ""]
    out += r0.markdown()
    out += ["", "**What patched native still pays.** A patched native site executes its "
            "body and nothing else: the padding is redundant prefixes on the body's own "
            "instructions (docs/FORMAT.md, section Padding), so no NOP and no jump retire. "
            "The instructions the tables above still show over no paravirt are not in the "
            "sites but around them: moves that put an op's arguments and result in the "
            "registers its asm statement pins them to (every backend's body and the thunks "
            "expect them there; in x86_64 `bench_workload()` these are `mov %rax,%r9`, "
            "`mov %rcx,%rdi` and `mov %r9,%rdi`, found by diffing its objdump against the "
            "no-paravirt build), and reloads after a site, which is a compiler barrier "
            "(`\"memory\"` clobber: hypervisor bodies store to memory) where the "
            "no-paravirt instruction is not (i386 `write_cr3` re-reads %cr3 in its loop). "
            "Neither can go while one site must hold every backend's body."]
    out += [""] + before.markdown({a: r0.workload_pct(a) for a in r0.workload})
    return out + [""]


def _sites(res: Results) -> list[str]:
    out = ["## 2. One site in user space", "",
           "`bench/userspace/sites.c`: a loop of 8 back-to-back sites per iteration, one "
           "loop per site shape and body, pinned to one CPU (`taskset`), timed with "
           "`lfence; rdtsc`. Three unprivileged bodies: `pushf; pop %rax` (save_fl), "
           "`movl $0, flag` (a store to a flag word: lguest's cli) and a call to a C "
           "function. *instr/op* is exact (callgrind, loop overhead subtracted). Times are in "
           "TSC ticks (the constant-rate reference clock; core cycles cannot be counted "
           "here: no hardware performance counters in this virtual machine). *ticks/op* "
           "is the best (lowest) of all repeats, in TSC ticks per site, minus the empty "
           "loop's best; *median* the same with medians: on this virtual machine some "
           "repeats run ~25 % slow for every variant alike, so the best is the stable "
           "figure. *x inline* divides ticks/op by the hand-written inline instruction's.",
           "",
           "Shapes:", ""]
    for s in usersites.SHAPES:
        out.append(f"* **{s.key}**: {s.title}; clobbers: {s.clobbers}.")
    out += ["", "The *linkfix generic* and *linkfix patched* rows run gen-stubs' real "
            "`linkfix.h` sites (generic: the image as linked, dispatching through the "
            "native ops table; patched: the same loops in the image written by `linkfix "
            "patch --target native`). *linkfix model* is that patched site assembled at "
            "compile time (body + `linkfix.padding`), a cross-check. The 2007 shapes are "
            "exact on i386 (10, 11 and 12 bytes); on x86-64 their analogue saves the eight "
            "caller-saved registers other than %rax, so they are longer.", ""]
    if "sites" in res.errors:
        return out + [f"Not measured: {res.errors['sites']}", ""]
    for arch, r in res.sites.items():
        hz = f"{r.tsc_hz / 1e9:.3f} GHz" if r.tsc_hz else "unknown"
        out += [f"### {arch}", "", f"TSC {hz}; empty loop {fmt(r.ticks('empty_none'), 3)} "
                f"ticks per site slot.", ""]
        if not r.patched_real:
            out += [f"`linkfix patch` failed on the benchmark binary ({r.patch_error}); the "
                    "*linkfix patched* row is missing and only the model stands for it.", ""]
        if r.callgrind_error:
            out += [f"No instruction counts: {r.callgrind_error}.", ""]
        rows = []
        for op in usersites.OPS:
            base = r.net_ticks(f"inline_{op}")
            for s in usersites.SHAPES:
                v = f"{s.key}_{op}"
                if v not in r.samples:
                    continue
                t = r.net_ticks(v)
                med = r.net_ticks(v, best=False)
                ratio = t / base if t is not None and base and base > 0 else None
                site = usersites.display(r.asm.get(v, ""))
                rows.append([usersites.OP_TITLES[op] if s.key == "inline" else "",
                             s.key, str(r.sizes.get(v, "-")), f"`{site}`",
                             fmt(r.net_instr(v), 2), fmt(t, 2), fmt(med, 2),
                             fmt(r.ns(t), 2), fmt(ratio, 2)])
        out += _table(["body", "shape", "bytes", "site", "instr/op", "ticks/op", "median",
                       "ns/op", "x inline"], rows, "lllrrrrrr")
        out.append("")
        out += _sites_notes(r)
    return out


def _sites_notes(r: ArchResult) -> list[str]:
    out = []
    ip, ii, ia = (r.net_instr(f"{k}_save_fl") for k in ("lfpatched", "inline", "inlinea"))
    if ip is not None and ii is not None and ia is not None:
        reg = "%rax" if r.arch == "x86_64" else "%eax"
        out.append(f"* save_fl, patched vs hand-inline: {ip - ii:+.2f} instructions per site, "
                   f"of which {ip - ia:+.2f} is the padding (patched vs *inlinea*, the same "
                   f"instruction with its result in {reg}: a long NOP, one instruction that "
                   f"does no work) and {ia - ii:+.2f} the fixed result register (a `mov` out "
                   f"of {reg}, because this loop keeps eight results live at once; the "
                   "hand-written `pushf; pop %0` lets the compiler pick the register).")
    tp, ti = r.net_ticks("lfpatched_c_func"), r.net_ticks("inline_c_func")
    if tp is not None and ti is not None:
        out.append(f"* C function, patched vs a plain C call: {tp - ti:+.2f} ticks per call: "
                   "the callee-save thunk pushes and pops every caller-saved register so the "
                   "site clobbers nothing (Linux's callee-save thunks cost the same: *linux6*);"
                   " what the caller gains from that is part 3.")
    a, b = r.net_ticks("lfpatched_save_fl"), r.net_ticks("lfmodel_save_fl")
    if a and b:
        out.append(f"* Noise: *lfpatched* and *lfmodel* run byte-identical sites; they differ by "
                   f"{abs(b / a - 1) * 100:.1f} % (save_fl) here.")
    return out + ([""] if out else [])


def _pressure(res: Results) -> list[str]:
    out = ["## 3. Register pressure", "",
           "`bench/regpressure/hungry.c`: ten loop-carried values plus the loop's pointer "
           "and counter live across the sites of every iteration: save_fl, a store to a "
           "flag word and restore_fl (workload *native*: what a native kernel runs), plus "
           "a call to a C function (workload *ccall*). The sites hold the same bytes in "
           "every variant (patched native bodies + padding); only the clobber list the "
           "compiler sees differs (and the C call's thunk: none for full clobbers, one "
           "saving all but %rax for 2007, linkfix's callee-save thunk). Static counts are "
           "from `objdump -d` of `hungry()`: *stack ld/st* are instructions with a "
           "`(%rsp)` memory operand (spills and reloads), *callee-saved* the registers the "
           "prologue pushes. *instr/iter* is exact (callgrind, C function and thunks "
           "included); *ticks/iter* the median TSC ticks per iteration. On i386 (seven "
           "allocatable registers for thirteen live values) every variant spills, and the "
           "time depends on which loop-carried values GCC leaves on the stack.", ""]
    out += [f"* **{v.key}**: {v.title}" for v in PRESSURE_VARIANTS] + [""]
    if "pressure" in res.errors:
        return out + [f"Not measured: {res.errors['pressure']}", ""]
    for arch, p in res.pressure.items():
        out += [f"### {arch}", ""]
        rows = []
        for w in PRESSURE_WORKLOADS:
            base = p.median_ticks(f"{w.key}_full")
            for v in PRESSURE_VARIANTS:
                key = f"{w.key}_{v.key}"
                s = p.static.get(key)
                t = p.median_ticks(key)
                rel_t = f"{(t / base - 1) * 100:+.1f} %" if t and base else "-"
                rows.append([w.key if v is PRESSURE_VARIANTS[0] else "", v.key,
                             str(s.instructions), str(s.size), str(s.stack_loads),
                             str(s.stack_stores), str(s.callee_saved_pushed),
                             fmt(p.instr_per_iter.get(key), 1), fmt(t, 2), rel_t])
        out += _table(["workload", "clobbers", "instructions", "bytes", "stack ld",
                       "stack st", "callee-saved", "instr/iter", "ticks/iter", "vs full"],
                      rows, "llrrrrrrrr")
        out.append("")
        out += _pressure_notes(p)
        out += [f"* {n}" for n in p.notes]
        out.append("")
    return out


def _pressure_notes(p: PressureResult) -> list[str]:
    out = []
    for w in PRESSURE_WORKLOADS:
        k = {v.key: f"{w.key}_{v.key}" for v in PRESSURE_VARIANTS}
        st = {v: p.static[key].stack_loads + p.static[key].stack_stores for v, key in k.items()}
        t = {v: p.median_ticks(key) for v, key in k.items()}
        if not all(t.values()):
            continue
        line = (f"* {w.key}: linkfix vs full clobbers {(t['linkfix'] / t['full'] - 1) * 100:+.1f}"
                f" % time, {st['linkfix']} vs {st['full']} stack accesses; linkfix vs %rax-only "
                f"{(t['linkfix'] / t['rax'] - 1) * 100:+.1f} % time, {st['linkfix']} vs "
                f"{st['rax']} stack accesses")
        if st["linkfix"] == st["rax"]:
            line += (" (the same spill count: the difference is which value GCC keeps on "
                     "the stack, not the sites)")
        elif st["linkfix"] > st["rax"]:
            line += (" (GCC spills more with the freer clobber list here: its allocation "
                     "heuristics, not the sites)")
        out.append(line + ".")
    return out


def _postlink(res: Results) -> list[str]:
    out = ["## 4. The post-link pass", "",
           "Synthetic x86-64 images from `tests/tools/synthimage.py` (`build_fast`, seed 1): real "
           "linkfix tables with a mix of bodies (cli/sti, pushf/pop, %gs and RIP-relative "
           "stores, calls, bodies with internal and outgoing jumps, empty bodies, branch "
           "sites). Every command is a subprocess, process start included; times are "
           "medians, memory the child's peak RSS. *cp* is the floor (a plain copy of the "
           "image); *naive lief* is `bench/naive_lief.py`: `lief.parse`, one "
           "`patch_address` per site, `write()`, re-targeting only whole-body calls (a lower "
           "bound: it skips the relocation work). *naive complete* is "
           "`bench/naive_capstone.py`: the same job as `linkfix patch` done the "
           "straightforward way (lief reads each record and body, capstone disassembles "
           "each site's body, branches and RIP-relative operands are re-targeted, rel8 "
           "widened, `patch_address`, `write()`); its output is checked with `linkfix "
           "verify` (column *naive ok*).", ""]
    pl = res.postlink
    if pl is None:
        return out + [f"Not measured: {res.errors.get('postlink', 'not run')}", ""]
    out += [f"Each time is the median of {pl.reps} runs ({pl.reps_big} for 1,000,000 sites).",
            ""]
    if pl.python_start.median is not None:
        out += [f"Fixed costs: starting Python (`python -c pass`) "
                f"{pl.python_start.median * 1000:.0f} ms; "
                f"`python -c 'import linkfix.postlink.patch'` "
                f"{pl.import_patch.median * 1000:.0f} ms; `python -c 'import lief'` "
                f"{pl.import_lief.median * 1000:.0f} ms. *py floor* is "
                "`bench/pyloop_floor.py`: a Python loop doing only one `unpack_from` and one "
                "5-byte write per site, the least any per-site Python loop costs.", ""]
    rows = []
    for s in pl.sizes:
        naive = s.naive.median
        label = fmt(naive, 3)
        if naive is None and s.naive_extrapolated is not None:
            label = f"~{s.naive_extrapolated:.2f} (extrapolated)"
            naive = s.naive_extrapolated
        p = s.patch.median
        rows.append([f"{s.sites:,}", f"{s.image_bytes / 1e6:.1f}", fmt(s.copy.median, 3),
                     fmt(s.pyfloor.median, 3), fmt(p, 3), fmt(s.patch_lief.median, 3),
                     f"{s.patch.peak_kb / 1024:.0f}" if s.patch.peak_kb else "-",
                     f"{s.sites / p:,.0f}" if p else "-", label,
                     f"{s.naive.peak_kb / 1024:.0f}" if s.naive.peak_kb else "-",
                     f"{naive / p:.1f}x" if p and naive else "-",
                     fmt(s.naive_full.median, 2),
                     f"{s.naive_full.median / p:.1f}x" if p and s.naive_full.median else "-",
                     s.naive_full_verify, s.verify])
    out += _table(["sites", "image MB", "cp s", "py floor s", "linkfix patch s",
                   "with lief s", "peak MB",
                   "sites/s", "naive lief s", "naive peak MB", "speed-up", "naive complete s",
                   "speed-up", "naive ok", "verify"], rows)
    out.append("")
    meas = [s for s in pl.sizes if s.patch.median]
    if len(meas) >= 2:
        a, b = meas[-2], meas[-1]
        slope = (b.patch.median - a.patch.median) / (b.sites - a.sites)
        out += [f"Growth: from {a.sites:,} to {b.sites:,} sites the time grows by "
                f"{slope * 1e6:.2f} us per added site (time = fixed cost + per-site cost; "
                f"{(b.patch.median / a.patch.median):.1f}x the time for "
                f"{b.sites / a.sites:.0f}x the sites).", ""]
    out += _inspect_table(pl)
    if not any(s.patch.peak_kb for s in pl.sizes):
        out += ["* No peak memory: GNU time (`/usr/bin/time`, Debian package `time`) is "
                "not installed."]
    out += [f"* {n}" for n in pl.notes]
    return out + [""]


def _inspect_table(pl: PostlinkResult) -> list[str]:
    """`linkfix inspect` on the same images: time against patch, memory against the image."""
    if not any(s.inspect for s in pl.sizes):
        return []
    out = ["`linkfix inspect` on the same images, stdout to /dev/null: the text listing and "
           "`--jsonl`, each against `linkfix patch`'s time (target <= "
           f"{INSPECT_TIME_X:.0f}x) and the image's size (peak memory, target <= "
           f"{INSPECT_MEMORY_X:.0f}x). *validate* is reading the image as inspect does "
           "(mapped, each page handed back once read) and validating its records, nothing "
           "else (`python -c` on linkfix.postlink.image and linkfix.postlink.tables): the "
           "floor inspect stands on (patch validates the same records from the image read "
           "into memory).", ""]
    rows = []
    for s in pl.sizes:
        row = [f"{s.sites:,}", f"{s.image_bytes / 1e6:.1f}", fmt(s.patch.median, 3),
               f"{s.patch.peak_kb / 1024:.0f}" if s.patch.peak_kb else "-",
               f"{s.validate.peak_kb / 1024:.0f}" if s.validate.peak_kb else "-"]
        for form, _argv in INSPECT_FORMATS:
            t = s.inspect.get(form)
            tx, mx = s.inspect_time_x(form), s.inspect_memory_x(form)
            row += [fmt(t.median if t else None, 2), f"{tx:.1f}x" if tx is not None else "-",
                    f"{t.peak_kb / 1024:.0f}" if t and t.peak_kb else "-",
                    f"{mx:.1f}x" if mx is not None else "-"]
        rows.append(row)
    head = ["sites", "image MB", "patch s", "patch peak MB", "validate peak MB"]
    for form, _argv in INSPECT_FORMATS:
        name = "inspect" if form == "text" else f"--{form}"
        head += [f"{name} s", "x patch", f"{name} peak MB", "x image"]
    return out + _table(head, rows) + [""]


def _commands(res: Results) -> list[str]:
    out = ["## Commands", "", "Every command the run executed, in order (paths relative to "
           "the repository root; repeats shown once):", "", "```"]
    seen = set()
    for c in res.commands:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out + ["```", ""]


def _padding(res: Results) -> list[str]:
    out = ["## 5. Padding that executes nothing", "",
           "`bench/prefixcost.py`: 32 copies of one padding shape in an unrolled loop, "
           "cycles per site by rdtsc, pinned to one CPU, medians of 9 runs. `prefixk`: the "
           "body with k redundant CS prefixes; `nopn`: the body then an n-byte long NOP. "
           "gen-stubs (linkfix/stubgen/sitefill.py) pads with prefixes first, at most "
           f"{SITEFILL_CAP} per instruction (the most GNU as itself puts on an "
           "instruction), then with at most two long NOPs, and only past 22 bytes with a "
           "jump over INT3s (the last table: the jump costs more than two NOPs).", ""]
    if res.padding is None:
        return out + [f"Not measured: {res.errors.get('padding', 'not run')}", ""]
    return out + prefixcost_markdown(res.padding) + [""]


def _tables(res: Results) -> list[str]:
    out = ["## 6. Table bytes per site", "",
           "`bench/tablebytes.py`: the linkfix sections of the sample kernel (gcc) and of a "
           "synthetic image, per site.", ""]
    if not res.tables:
        return out + [f"Not measured: {res.errors.get('tables', 'not run')}", ""]
    return out + tablebytes_markdown(res.tables) + [""]


def render(res: Results) -> str:
    lines = ["# Benchmarks", "",
             "Regenerate this file and `docs/benchmarks.png` (all numbers below come from "
             "one run; nothing here is edited by hand):", "",
             "    .venv/bin/python bench/run.py", "",
             f"(`{res.command}` produced this copy; `--quick` is a smoke run that writes to "
             "`build/bench/` instead, and `--only PARTS --merge` redoes those parts' figures "
             "here, keeping the rest.)", "",
             "![benchmarks](benchmarks.png)", ""]
    lines += _summary(res)
    lines += _machine(res)
    lines += _ring0(res)
    lines += _sites(res)
    lines += _pressure(res)
    lines += _postlink(res)
    lines += _padding(res)
    lines += _tables(res)
    lines += genstubs_rerun.section(res.genstubs, res.errors.get("genstubs", "not run"))
    lines += _commands(res)
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["Results", "render", "targets", "median"]
