"""Part 2: what one site costs in user space, for every site shape of the debate.

Builds bench/userspace/sites.c for x86_64 and i386 with the real gen-stubs
output of bench/userspace/ops_<arch>.toml, patches the binary with
`linkfix patch --target native` (the linkfix sites then hold the native
bodies), times every variant pinned to one CPU with rdtsc, and counts its
instructions exactly with callgrind.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from dataclasses import dataclass, field

import sitemodel
from common import BENCH, BUILD, LOG, BenchError, ensure_dir, linkfix_cmd, median, pinned, rel, run

SRC = os.path.join(BENCH, "userspace")
OPS = ("save_fl", "flag_off", "c_func")
OP_TITLES = {
    "save_fl": "`pushf; pop` (save_fl)",
    "flag_off": "store to a flag word",
    "c_func": "call a C function",
}
UNROLL = 8


@dataclass(frozen=True)
class Shape:
    key: str
    title: str
    clobbers: str  # what the compiler must assume the site clobbers


# In table order. "lfpatched" runs the lfgen loops of the patched image.
SHAPES = (
    Shape("inline", "hand-written inline instruction (C call for c_func)", "body's own"),
    Shape("inlinea", "the same, result in %rax like the op (save_fl only)", "%rax"),
    Shape("lfpatched", "linkfix patched: body + one long NOP", "op's declared (none here)"),
    Shape("lfmodel", "linkfix patched, compile-time model", "op's declared (none here)"),
    Shape("linux6", "Linux today: `call *pv_ops(%rip)`, 6 bytes", "%rax"),
    Shape("s10", "2007 10-byte site: push/`call *`/pop, %eax clobbered", "%rax"),
    Shape("s11", "11-byte site: push/direct `call`/pop", "none"),
    Shape("s12", "12-byte site: push/`call *`/pop", "none"),
    Shape("lfgen", "linkfix generic: `call` dispatch thunk + pad", "op's declared (none here)"),
)

_PUSH = {
    "x86_64": ["%rcx", "%rdx", "%rsi", "%rdi", "%r8", "%r9", "%r10", "%r11"],
    "i386": ["%ecx", "%edx"],
}
_AX = {"x86_64": "%rax", "i386": "%eax"}


def _sym(arch: str, s: str) -> str:
    return f"{s}(%rip)" if arch == "x86_64" else s


def shape_asm(arch: str, shape: str, op: str) -> str | None:
    """The instructions of one site of `shape` (as sites.c emits them), or None."""
    word = 8 if arch == "x86_64" else 4
    idx = OPS.index(op)
    fn = {"save_fl": "fn_save_fl", "flag_off": "fn_flag_off", "c_func": "bench_cfunc"}[op]
    push_noax = [f"push {r}" for r in _PUSH[arch]]
    pop_noax = [f"pop {r}" for r in reversed(_PUSH[arch])]
    push, pop = push_noax, pop_noax
    if op != "save_fl":  # no output register: %rax is saved too
        push = [f"push {_AX[arch]}", *push_noax]
        pop = [*pop_noax, f"pop {_AX[arch]}"]
    if shape == "inlinea":
        return f"pushf; pop {_AX[arch]}" if op == "save_fl" else None
    if shape == "inline":
        return {"save_fl": f"pushf; pop {_AX[arch]}",
                "flag_off": "movl $0, " + _sym(arch, "bench_flag"),
                "c_func": "call bench_cfunc"}[op]
    if shape == "linux6":
        return "call *" + _sym(arch, f"bench_callee_ops+{idx * word}")
    if shape == "s10":
        return "; ".join([*push_noax, "call *" + _sym(arch, f"bench_ops+{idx * word}"),
                          *pop_noax])
    if shape == "s11":
        return "; ".join([*push, f"call {fn}", *pop])
    if shape == "s12":
        return "; ".join([*push, "call *" + _sym(arch, f"bench_ops+{idx * word}"), *pop])
    return None


def display(text: str) -> str:
    """`text` with runs of push/pop shortened, for a table cell."""
    parts = [p.strip() for p in text.split(";")]
    out: list[str] = []
    i = 0
    while i < len(parts):
        verb = parts[i].split(" ")[0]
        j = i
        while j < len(parts) and parts[j].split(" ")[0] == verb and verb in ("push", "pop"):
            j += 1
        if j - i > 2:
            regs = [p.split(" ", 1)[1] for p in parts[i:j]]
            out.append(f"{verb} {regs[0]}..{regs[-1]} ({j - i})")
            i = j
        else:
            out.append(parts[i])
            i += 1
    return "; ".join(out)


def asm_len(arch: str, text: str, workdir: str) -> int:
    """Bytes GNU as emits for `text`."""
    src = os.path.join(workdir, "len.s")
    obj = os.path.join(workdir, "len.o")
    with open(src, "w") as f:
        f.write(f"\t.text\n\t{text}\n")
    run(["as", "--64" if arch == "x86_64" else "--32", "-o", obj, src], log=False)
    out = run(["size", "-A", obj], log=False).stdout
    m = re.search(r"^\.text\s+(\d+)", out, re.M)
    if not m:
        raise BenchError(f"size -A {obj}: no .text")
    return int(m.group(1))


# ---- build -------------------------------------------------------------------

CFLAGS = ["-O2", "-fno-pie", "-no-pie", "-fcf-protection=none", "-fno-stack-protector",
          "-falign-functions=64", "-Wall", "-Werror"]


@dataclass
class Build:
    arch: str
    gen_dir: str
    binary: str
    manifest: dict
    patched: str | None = None
    patch_error: str | None = None


def write_model_header(arch: str, manifest: dict, path: str) -> None:
    """lf_model.h: each op's patched native site, with the op's clobbers."""
    text = ("/* lf_model.h: generated by bench/usersites.py from linkfix.json: the sites\n"
            " * `linkfix patch --target native` writes, assembled at compile time. */\n"
            + sitemodel.header(arch, manifest, lambda op: f"LFM_{op}",
                               lambda op: list(op["clobbers"])))
    with open(path, "w") as f:
        f.write(text)


def build(arch: str) -> Build:
    out = ensure_dir(os.path.join(BUILD, f"sites_{arch}"))
    gen = os.path.join(out, "gen")
    run(linkfix_cmd("gen-stubs", os.path.join(SRC, f"ops_{arch}.toml"), "-o", gen, "-q"))
    with open(os.path.join(gen, "linkfix.json")) as f:
        manifest = json.load(f)
    write_model_header(arch, manifest, os.path.join(out, "lf_model.h"))
    binary = os.path.join(out, "sites")
    flags = [*CFLAGS, "-mno-red-zone"] if arch == "x86_64" else [*CFLAGS, "-m32"]
    run(["gcc", *flags, "-I", gen, "-I", out, "-o", binary,
         os.path.join(SRC, "sites.c"), os.path.join(gen, "linkfix_ops.c"),
         os.path.join(gen, "linkfix_thunks.S"),
         f"-Wl,-T,{os.path.join(SRC, 'linkfix_insert.lds')}", f"-L{gen}"])
    b = Build(arch, gen, binary, manifest)
    patched = binary + ".native"
    try:
        run(linkfix_cmd("patch", binary, "-o", patched, "--target", "native", "-q"))
        b.patched = patched
    except BenchError as exc:
        b.patch_error = str(exc)
    return b


# ---- measure -----------------------------------------------------------------


@dataclass
class ArchResult:
    arch: str
    tsc_hz: float = 0.0
    samples: dict[str, list[float]] = field(default_factory=dict)  # variant -> ticks/op
    instr: dict[str, float] = field(default_factory=dict)  # variant -> instructions/op
    sizes: dict[str, int] = field(default_factory=dict)  # variant -> site bytes
    asm: dict[str, str] = field(default_factory=dict)  # variant -> site instructions
    patched_real: bool = False
    patch_error: str | None = None
    callgrind_error: str | None = None

    def ticks(self, variant: str) -> float | None:
        """Best (lowest) ticks per site of all repeats: this VM's noise is bimodal
        (some repeats run ~25 % slow for every variant alike), so the median of a
        variant depends on how many of its repeats fell in the slow mode."""
        s = self.samples.get(variant)
        return min(s) if s else None

    def median_ticks(self, variant: str) -> float | None:
        s = self.samples.get(variant)
        return median(s) if s else None

    def net_ticks(self, variant: str, best: bool = True) -> float | None:
        get = self.ticks if best else self.median_ticks
        t, e = get(variant), get("empty_none")
        return None if t is None or e is None else t - e

    def ns(self, ticks: float | None) -> float | None:
        return None if ticks is None or not self.tsc_hz else ticks / self.tsc_hz * 1e9

    def net_instr(self, variant: str) -> float | None:
        i, e = self.instr.get(variant), self.instr.get("empty_none")
        return None if i is None or e is None else i - e


def _time(binary: str, n: int, repeats: int, procs: int, variants: list[str],
          rename: dict[str, str], res: ArchResult) -> None:
    for _ in range(procs):
        out = run(pinned([binary, "time", str(n), str(repeats), *variants])).stdout
        for line in out.splitlines():
            parts = line.split()
            if parts[0] == "tsc_hz":
                res.tsc_hz = float(parts[1])
            elif parts[0] == "patched_target":
                continue
            else:
                name = rename.get(parts[0], parts[0])
                res.samples.setdefault(name, []).append(float(parts[2]))


def _callgrind_dumps(binary: str, n: int, variants: list[str], workdir: str) -> dict[str, int]:
    """Instructions callgrind counted up to the end of each run_* loop since the
    previous one ended (so including the glue in main between them)."""
    for old in glob.glob(os.path.join(workdir, "cg.out*")):
        os.unlink(old)
    out_file = os.path.join(workdir, "cg.out")
    run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
         "--dump-after=run_*", binary, "count", str(n), *variants])
    dumps: dict[str, int] = {}
    for path in glob.glob(out_file + ".*"):
        with open(path) as f:
            text = f.read()
        trig = re.search(r"^desc: Trigger: --dump-after=run_(\S+)", text, re.M)
        total = re.search(r"^totals:\s+(\d+)", text, re.M)
        if trig and total:
            dumps[trig.group(1)] = int(total.group(1))
    return dumps


def _callgrind(binary: str, n: int, variants: list[str], rename: dict[str, str],
               workdir: str, res: ArchResult) -> None:
    """Exact instructions per op. Two runs, n and 2n iterations: the glue in main
    is the same in both, so the difference is exactly n iterations of the loop.
    (callgrind's --zero-before cannot be combined with --dump-after on the same
    functions: only the last option given for a pattern takes effect.)"""
    one = _callgrind_dumps(binary, n, variants, workdir)
    two = _callgrind_dumps(binary, 2 * n, variants, workdir)
    for v in variants:
        if v not in one or v not in two:
            raise BenchError(f"callgrind {rel(binary)}: no dump for run_{v}")
        res.instr[rename.get(v, v)] = (two[v] - one[v]) / (n * UNROLL)


def measure(arch: str, quick: bool) -> ArchResult:
    b = build(arch)
    res = ArchResult(arch)
    workdir = os.path.dirname(b.binary)
    # site sizes and instructions
    for op in b.manifest["ops"]:
        for key in ("lfgen", "lfpatched", "lfmodel"):
            res.sizes[f"{key}_{op['name']}"] = op["site_size"]
        res.asm[f"lfgen_{op['name']}"] = f"call __lf_dispatch_{op['name']} + pad"
        body = op["bodies"]["native"]["text"]
        res.asm[f"lfpatched_{op['name']}"] = f"{body} + pad" if op["site_size"] > \
            op["bodies"]["native"]["length"] else body
        res.asm[f"lfmodel_{op['name']}"] = res.asm[f"lfpatched_{op['name']}"]
    for s in SHAPES:
        for op in OPS:
            text = shape_asm(arch, s.key, op)
            if text is not None:
                res.asm[f"{s.key}_{op}"] = text
                res.sizes[f"{s.key}_{op}"] = asm_len(arch, text, workdir)

    all_variants = run([b.binary, "list"], log=False).stdout.split()
    n, repeats, procs = (30_000, 3, 1) if quick else (200_000, 20, 5)
    _time(b.binary, n, repeats, procs, all_variants, {}, res)
    lf_loops = [f"lfgen_{op}" for op in OPS]
    as_patched = {f"lfgen_{op}": f"lfpatched_{op}" for op in OPS}
    if b.patched:
        res.patched_real = True
        _time(b.patched, n, repeats, procs, ["empty_none", *lf_loops],
              {"empty_none": "_e", **as_patched}, res)
    else:
        res.patch_error = b.patch_error
    res.samples.pop("_e", None)

    if shutil.which("valgrind"):
        cg_n = 1000
        try:
            _callgrind(b.binary, cg_n, all_variants, {}, workdir, res)
            if b.patched:
                _callgrind(b.patched, cg_n, lf_loops, as_patched, workdir, res)
        except BenchError as exc:
            res.callgrind_error = str(exc)
    else:
        res.callgrind_error = "valgrind not installed (apt-get install valgrind)"
    LOG.comment(f"{rel(b.binary)}: {len(all_variants)} variants x {repeats} repeats "
                f"x {procs} processes, {n} iterations of {UNROLL} sites each")
    return res
