"""Build, patch and boot the sample kernel; parse what it prints.

Shared by run_matrix.py and tests/test_sample_kernel.py. Every build goes
through the real Makefile, every patch through `linkfix patch`, every boot
through QEMU (TCG) under a time limit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parent
REPO = SRC.parent
ARCHES = ("x86_64", "i386")
BACKENDS = ("native", "xen", "lguest")
# one self-test line per op, then the branch sites (spec order)
OPS = ("irq_disable", "irq_enable", "save_fl", "restore_fl", "read_cr2", "read_cr3",
       "write_cr3", "set_pte", "flush_tlb", "io_delay", "safe_halt", "backend_is")
BENCH_OPS = OPS[:10]
# The toolchains the sample kernel is built with: make arguments, as Kbuild takes them.
TOOLCHAINS = {"gcc": (), "clang": ("CC=clang",), "llvm": ("LLVM=1",)}
TOOLCHAIN_TEXT = {"gcc": "gcc + GNU ld", "clang": "clang + GNU ld", "llvm": "clang + ld.lld"}

# isa-debug-exit: status = (code << 1) | 1
EXIT_PASS = 33
EXIT_FAIL = 35
EXIT_FAULT = 37
EXIT_MEANING = {EXIT_PASS: "passed", EXIT_FAIL: "op failed", EXIT_FAULT: "CPU exception",
                0: "triple fault", 124: "timeout"}

QEMU_FLAGS = ("-nodefaults", "-display", "none", "-no-reboot", "-accel", "tcg",
              "-debugcon", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04")
QEMU_BINARY = {"x86_64": "qemu-system-x86_64", "i386": "qemu-system-i386"}

_OP_LINE = re.compile(r"^op (\S+): (ok|FAIL) \((.*)\)$")
_BENCH_LINE = re.compile(r"^bench (\S+): (\d+)\.(\d\d) insns/op \((\d+) total\)$")
_WORKLOAD_LINE = re.compile(r"^bench workload: (\d+) insns \((\d+) iterations\)$")


def linkfix_command(python: str = sys.executable) -> str:
    return f"{python} -m linkfix"


def env() -> dict[str, str]:
    """The environment for make and linkfix: this repository's package first."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("V", None)
    e.pop("MAKEFLAGS", None)
    return e


def toolchain_available(name: str) -> bool:
    need = {"gcc": ("gcc", "ld"), "clang": ("clang", "ld"), "llvm": ("clang", "ld.lld")}[name]
    return all(shutil.which(tool) for tool in need)


def make(arch: str, out: Path, *args: str, python: str = sys.executable, jobs: int = 2,
         src: Path = SRC, check: bool = True,
         toolchain: str = "gcc") -> subprocess.CompletedProcess[str]:
    """`make -C src ARCH=arch O=out args...` with this interpreter's linkfix."""
    cmd = ["make", "-C", str(src), "--no-print-directory", f"-j{jobs}", f"ARCH={arch}",
           f"O={out}", f"LINKFIX={linkfix_command(python)}", f"PYTHON={python}",
           *TOOLCHAINS[toolchain], *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env())
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return res


def linkfix(*args: str, python: str = sys.executable,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([python, "-m", "linkfix", *args], capture_output=True, text=True,
                         env=env())
    if check and res.returncode != 0:
        raise RuntimeError(f"linkfix {' '.join(args)} failed ({res.returncode}):\n"
                           f"{res.stdout}{res.stderr}")
    return res


def build_generic(arch: str, out: Path, python: str = sys.executable,
                  toolchain: str = "gcc") -> Path:
    """Build the unpatched image (LINKFIX_TARGET empty); return vmlinux.generic."""
    make(arch, out, "LINKFIX_TARGET=", python=python, toolchain=toolchain)
    return out / "vmlinux.generic"


def patch(generic: Path, backend: str, out: Path, python: str = sys.executable) -> Path:
    linkfix("patch", "-q", str(generic), "-o", str(out), "--target", backend, python=python)
    return out


def qemu_available(arch: str = "x86_64") -> bool:
    return shutil.which(QEMU_BINARY[arch]) is not None


@dataclass
class Boot:
    """What one boot printed and how QEMU exited."""
    status: int
    output: str
    header: str = ""
    ops: dict[str, tuple[str, str]] = field(default_factory=dict)  # op -> (ok|FAIL, detail)
    bench: dict[str, tuple[int, int]] = field(default_factory=dict)  # op -> (insns*100, total)
    workload: int | None = None  # instructions of the whole workload loop

    @property
    def passed(self) -> int:
        return sum(1 for verdict, _ in self.ops.values() if verdict == "ok")

    @property
    def ok(self) -> bool:
        return (self.status == EXIT_PASS and self.passed == len(OPS)
                and set(self.ops) == set(OPS))

    def op_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("op ")]

    def meaning(self) -> str:
        return EXIT_MEANING.get(self.status, "unexpected status")


def parse(status: int, output: str) -> Boot:
    boot = Boot(status, output)
    for line in output.splitlines():
        if line.startswith(("selftest: arch=", "bench: arch=")):
            boot.header = line
        m = _OP_LINE.match(line)
        if m:
            boot.ops[m.group(1)] = (m.group(2), m.group(3))
        m = _BENCH_LINE.match(line)
        if m:
            boot.bench[m.group(1)] = (int(m.group(2)) * 100 + int(m.group(3)), int(m.group(4)))
        m = _WORKLOAD_LINE.match(line)
        if m:
            boot.workload = int(m.group(1))
    return boot


def boot(image: Path, arch: str, append: str = "", icount: bool = False,
         timeout: int = 60) -> Boot:
    """Boot `image` under QEMU TCG (under `timeout`); parse its debug console."""
    cmd = ["timeout", str(timeout), QEMU_BINARY[arch], *QEMU_FLAGS, "-kernel", str(image)]
    if append:
        cmd += ["-append", append]
    if icount:
        cmd += ["-icount", "shift=0,sleep=off"]
    res = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    return parse(res.returncode, res.stdout + res.stderr)


_SITE_LINE = re.compile(r"^LFSITE ([0-9a-f]+) ([0-9a-f]+)$", re.M)


def dumped_sites(output: str) -> dict[int, bytes]:
    """The `sitedump` lines of a boot: site address -> its bytes in memory."""
    return {int(a, 16): bytes.fromhex(b) for a, b in _SITE_LINE.findall(output)}


def file_sites(image: Path) -> dict[int, bytes]:
    """Every site's bytes in an image file, read through linkfix's own tables."""
    from linkfix.postlink import image as lf_image
    from linkfix.postlink import tables
    img = lf_image.load(str(image))
    chk = tables.check_records(tables.load(img))
    out = {}
    for i, s in enumerate(chk.site_addrs):
        got = img.read(s, chk.shape_of(i).site_len)
        assert got is not None
        out[s] = bytes(got)
    return out


def site_differences(booted: dict[int, bytes], patched: dict[int, bytes]) -> list[str]:
    """Sites whose bytes after boot patching differ from `linkfix patch`'s, named."""
    out = [f"site {s:#x}: booted {booted.get(s, b'').hex() or 'missing'}, linkfix patch "
           f"{want.hex()}" for s, want in sorted(patched.items()) if booted.get(s) != want]
    out += [f"site {s:#x}: dumped but not a site of the file" for s in booted
            if s not in patched]
    return out
