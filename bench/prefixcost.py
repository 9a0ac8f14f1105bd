"""What padding costs in user space: redundant prefixes, long NOPs, a jump over INT3s.

For each body (an ALU instruction, `pushf; pop %rax`) a C program runs an
unrolled loop of 32 copies of one padding shape and counts cycles with rdtsc,
pinned to one CPU. Shapes: the bare body; the body with k CS prefixes on its
first instruction (k = 1..6); the body followed by a k-byte long NOP; and, for
12 to 22 bytes of padding, two long NOPs against one `jmp` over INT3s. The
cost of a shape is its cycles per site minus the bare body's. linkfix's
PREFIX_CAP (linkfix/stubgen/sitefill.py) is the largest k whose prefix cost is within
the noise (the spread of the bare body's repeats), and NOP_LIMIT says two NOPs
are used before a jump.

    .venv/bin/python bench/prefixcost.py          # prints the table
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BUILD, BenchError, ensure_dir, median, pinned, run  # noqa: E402

UNROLL = 32
ITERS = 400_000
REPEATS = 9
PREFIX_COUNTS = (1, 2, 3, 4, 5, 6)
NOP_PAD = (1, 2, 3, 4, 5, 8, 11)
JUMP_PAD = (12, 16, 22)
BODIES = {
    "alu": ("add $1, %%eax", "0x83,0xc0,0x01"),
    "save_fl": ("pushf; pop %%rax", "0x9c,0x58"),
}
_NOP = {
    1: "0x90", 2: "0x66,0x90", 3: "0x0f,0x1f,0x00", 4: "0x0f,0x1f,0x40,0x00",
    5: "0x0f,0x1f,0x44,0x00,0x00", 6: "0x66,0x0f,0x1f,0x44,0x00,0x00",
    7: "0x0f,0x1f,0x80,0,0,0,0", 8: "0x0f,0x1f,0x84,0,0,0,0,0",
    9: "0x2e,0x0f,0x1f,0x84,0,0,0,0,0", 10: "0x66,0x2e,0x0f,0x1f,0x84,0,0,0,0,0",
    11: "0x66,0x66,0x2e,0x0f,0x1f,0x84,0,0,0,0,0",
}


@dataclass
class PrefixResult:
    cycles: dict[str, dict[str, float]] = field(default_factory=dict)  # body -> shape -> c/site
    noise: dict[str, float] = field(default_factory=dict)  # body -> spread of the bare runs
    cap: int = 0
    # padding bytes -> (two NOPs, jmp over INT3s), cycles over the bare body
    jump_vs_nops: dict[int, tuple[float, float]] = field(default_factory=dict)
    error: str | None = None


def _nops(n: int) -> str:
    if n <= 11:
        return _NOP[n]
    return _NOP[11] + "," + _NOP[n - 11]


def _shapes(body_bytes: str) -> dict[str, str]:
    """Shape name -> the `.byte` list of one site."""
    out = {"bare": body_bytes}
    for k in PREFIX_COUNTS:
        out[f"prefix{k}"] = ",".join(["0x2e"] * k + [body_bytes])
    for n in NOP_PAD:
        out[f"nop{n}"] = body_bytes + "," + _nops(n)
    for n in JUMP_PAD:
        out[f"twonops{n}"] = body_bytes + "," + _nops(n)
        out[f"jmp{n}"] = body_bytes + f",0xeb,{n - 2}" + ",0xcc" * (n - 2)
    return out


_TSC = '  __asm__ __volatile__("lfence; rdtsc" : "=a"(lo), "=d"(hi));\n'


def _program(shapes: dict[str, str]) -> str:
    funcs = []
    table = []
    for i, (name, data) in enumerate(shapes.items()):
        site = f'".byte {data}\\n"'
        funcs.append(
            f"static unsigned long run_{i}(unsigned long n) {{\n"
            "  unsigned long t0, t1; unsigned int lo, hi;\n"
            + _TSC + "  t0 = lo | (unsigned long)hi << 32;\n"
            "  for (unsigned long j = 0; j < n; j++)\n"
            f'    __asm__ __volatile__(".rept {UNROLL}\\n" {site} ".endr\\n"\n'
            '                         ::: "rax", "cc", "memory");\n'
            + _TSC + "  t1 = lo | (unsigned long)hi << 32;\n"
            "  return t1 - t0;\n}\n")
        table.append(f'  {{"{name}", run_{i}}},')
    return ("#include <stdio.h>\n"
            + "".join(funcs)
            + "struct shape { const char *name; unsigned long (*fn)(unsigned long); };\n"
            + "static const struct shape shapes[] = {\n" + "\n".join(table) + "\n};\n"
            + "int main(void) {\n"
            + "  for (unsigned i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {\n"
            + f"    shapes[i].fn({ITERS // 10});\n"
            + f"    unsigned long c = shapes[i].fn({ITERS});\n"
            + f'    printf("%s %.4f\\n", shapes[i].name, (double)c / ({ITERS}.0 * {UNROLL}));\n'
            + "  }\n  return 0;\n}\n")


def measure(quick: bool = False) -> PrefixResult:
    res = PrefixResult()
    out_dir = ensure_dir(os.path.join(BUILD, "prefixcost"))
    repeats = 3 if quick else REPEATS
    runs: dict[str, dict[str, list[float]]] = {}
    try:
        for body, (_text, data) in BODIES.items():
            src = os.path.join(out_dir, f"{body}.c")
            exe = os.path.join(out_dir, body)
            with open(src, "w") as f:
                f.write(_program(_shapes(data)))
            run(["gcc", "-O2", "-o", exe, src])
            per: dict[str, list[float]] = {}
            for _ in range(repeats):
                text = subprocess.run(pinned([exe]), capture_output=True, text=True,
                                      check=True).stdout
                for line in text.splitlines():
                    name, value = line.split()
                    per.setdefault(name, []).append(float(value))
            runs[body] = per
    except (OSError, subprocess.CalledProcessError) as exc:
        res.error = f"prefix benchmark failed: {exc}"
        return res
    for body, per in runs.items():
        res.cycles[body] = {name: median(v) for name, v in per.items()}
        bare = sorted(per["bare"])
        # the spread of the bare body's middle runs: what a shape must beat to count
        res.noise[body] = max(0.02, bare[len(bare) * 3 // 4] - bare[len(bare) // 4])
    cap = 0
    for k in PREFIX_COUNTS:
        if all(res.cycles[b][f"prefix{k}"] - res.cycles[b]["bare"] <= res.noise[b]
               for b in BODIES):
            cap = k
        else:
            break
    res.cap = cap
    # The ALU body: pushf/popf are microcoded and too noisy to rank two NOPs and a jump.
    alu = res.cycles["alu"]
    for n in JUMP_PAD:
        res.jump_vs_nops[n] = (alu[f"twonops{n}"] - alu["bare"], alu[f"jmp{n}"] - alu["bare"])
    return res


def markdown(res: PrefixResult) -> list[str]:
    if res.error:
        return [f"Not measured: {res.error}"]
    names = ["bare", *(f"prefix{k}" for k in PREFIX_COUNTS), *(f"nop{n}" for n in NOP_PAD)]
    head = "| shape | " + " | ".join(f"{b} c/site" for b in BODIES) + " |"
    lines = [head, "| --- |" + " ---: |" * len(BODIES)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{res.cycles[b][name]:.3f}" for b in BODIES)
                     + " |")
    lines += ["", "Noise (spread of the bare runs, cycles/site): " + ", ".join(
        f"{b} {res.noise[b]:.3f}" for b in BODIES) + f". Largest prefix count within it on "
        f"every body: **{res.cap}** (sitefill.PREFIX_CAP).", "",
        "After the ALU body:", "",
        "| padding bytes | two NOPs (cycles over bare) | jmp over INT3 (cycles over bare) |",
        "| ---: | ---: | ---: |"]
    for n, (two, jmp) in res.jump_vs_nops.items():
        lines.append(f"| {n} | {two:.3f} | {jmp:.3f} |")
    return lines


def main() -> int:
    res = measure("--quick" in sys.argv)
    if res.error:
        raise BenchError(res.error)
    print("\n".join(markdown(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
