#!/usr/bin/env python3
"""Build the sample kernel for every arch, patch it for every backend, boot it.

    run_matrix.py [--arch A ...] [--toolchain T ...] [--out DIR] [--verbose]
    run_matrix.py --bench [--arch A ...] [--toolchain T ...] [--out DIR]

Toolchains: gcc (gcc + GNU ld), clang (CC=clang: clang + GNU ld), llvm
(LLVM=1: clang + ld.lld); by default every one whose tools are installed.

Matrix: for each arch, one generic image (`make LINKFIX_TARGET=`), patched
with `linkfix patch` for each backend; each patched image is booted, and the
generic image is booted with `linkfix=<backend>` on its command line. A row
passes when QEMU exits with 33 (self-test passed), every op line says ok, and
(generic rows) the op lines equal those of the image patched for that backend.
Exit status 0 only if every row passes.

--bench: boot with `-icount shift=0,sleep=off` (rdtsc counts instructions) a
PARAVIRT=n build, the generic image and each patched image, and print the
instructions per op as a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import skernel
from skernel import ARCHES, BACKENDS, BENCH_OPS, OPS, TOOLCHAIN_TEXT


def matrix(arches: list[str], toolchains: list[str], out: Path, verbose: bool) -> int:
    rows: list[tuple[str, ...]] = []
    failed = 0
    for tc, arch in ((tc, arch) for tc in toolchains for arch in arches):
        where = out / tc / arch
        generic = skernel.build_generic(arch, where, toolchain=tc)
        for backend in BACKENDS:
            patched = skernel.patch(generic, backend, where / f"vmlinux.{backend}")
            runs = {
                "patched": skernel.boot(patched, arch),
                "generic": skernel.boot(generic, arch, append=f"linkfix={backend}"),
                "boot-patched": skernel.boot(generic, arch,
                                             append=f"linkfix={backend} bootpatch sitedump"),
            }
            for mode, b in runs.items():
                verdict = "PASS" if b.ok else "FAIL"
                note = b.meaning()
                if mode != "patched" and b.ok:
                    if b.op_lines() == runs["patched"].op_lines():
                        note += ", op lines = patched"
                    else:
                        verdict, note = "FAIL", "op lines differ from the patched image's"
                if mode == "boot-patched" and verdict == "PASS":
                    diffs = skernel.site_differences(skernel.dumped_sites(b.output),
                                                     skernel.file_sites(patched))
                    if diffs:
                        verdict, note = "FAIL", f"{len(diffs)} sites differ: {diffs[0]}"
                    else:
                        note += ", sites = linkfix patch"
                failed += verdict != "PASS"
                rows.append((TOOLCHAIN_TEXT[tc], arch, backend, mode, f"{b.passed}/{len(OPS)}",
                             str(b.status), f"{verdict} ({note})"))
                if verbose or verdict != "PASS":
                    print(f"--- {tc} {arch} {backend} {mode}: QEMU output")
                    print(b.output.rstrip())
    _table(("toolchain", "arch", "backend", "mode", "ops ok", "exit", "verdict"), rows)
    print(f"{len(rows) - failed} of {len(rows)} boots passed")
    return 1 if failed else 0


def bench(arches: list[str], toolchains: list[str], out: Path, verbose: bool) -> int:
    failed = 0
    for tc, arch in ((tc, arch) for tc in toolchains for arch in arches):
        where = out / tc
        skernel.make(arch, where / f"{arch}-noparavirt", "PARAVIRT=n", toolchain=tc)
        generic = skernel.build_generic(arch, where / arch, toolchain=tc)
        images: list[tuple[str, Path, str]] = [
            ("no paravirt", where / f"{arch}-noparavirt" / "vmlinux", "bench")]
        for backend in BACKENDS:
            patched = skernel.patch(generic, backend, where / arch / f"vmlinux.{backend}")
            images.append((f"generic ({backend})", generic, f"bench linkfix={backend}"))
            images.append((f"patched {backend}", patched, "bench"))
            images.append((f"boot-patched {backend}", generic,
                           f"bench linkfix={backend} bootpatch"))
        columns: list[tuple[str, dict[str, tuple[int, int]]]] = []
        workloads: list[tuple[str, int]] = []
        for name, image, append in images:
            b = skernel.boot(image, arch, append=append, icount=True)
            if (b.status != skernel.EXIT_PASS or set(b.bench) != set(BENCH_OPS)
                    or b.workload is None):
                failed += 1
                print(f"--- {tc} {arch} {name}: benchmark failed (exit {b.status})")
                print(b.output.rstrip())
                continue
            if verbose:
                print(b.output.rstrip())
            columns.append((name, b.bench))
            workloads.append((name, b.workload))
        print(f"\n{arch}, {TOOLCHAIN_TEXT[tc]}: instructions per op (QEMU -icount shift=0, "
              f"rdtsc over 1000 iterations, empty loop subtracted)\n")
        base = dict(columns).get("no paravirt")
        native = dict(columns).get("patched native")
        head = ["op", *(n for n, _ in columns)]
        if base and native:
            head.append("patched native - no paravirt")
        rows = []
        for op in BENCH_OPS:
            row = [op, *(_insns(c[op][0]) for _, c in columns)]
            if base and native:
                row.append(_delta(native[op][0] - base[op][0]))
            rows.append(tuple(row))
        _table(tuple(head), rows, markdown=True)
        print(f"\n{arch}, {TOOLCHAIN_TEXT[tc]}: workload (100 x an irq-save section with "
              "read_cr3 and set_pte, then clearing a 4 KiB page)\n")
        nopv = dict(workloads).get("no paravirt")
        _table(("image", "instructions", "vs no paravirt"),
               [(name, str(n), f"{(n - nopv) * 100 / nopv:+.2f} %" if nopv else "-")
                for name, n in workloads], markdown=True)
    return 1 if failed else 0


def _insns(hundredths: int) -> str:
    return f"{hundredths // 100}.{hundredths % 100:02d}"


def _delta(hundredths: int) -> str:
    sign = "+" if hundredths >= 0 else "-"
    return sign + _insns(abs(hundredths))


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]], markdown: bool = False) -> None:
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    if markdown:
        print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in rows:
            print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        return
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", action="append", choices=ARCHES,
                   help="only this arch (repeatable; default: all)")
    p.add_argument("--toolchain", action="append", choices=sorted(skernel.TOOLCHAINS),
                   help="only this toolchain (repeatable; default: every one installed)")
    p.add_argument("--out", type=Path, default=skernel.SRC / "out" / "matrix",
                   help="build directory (default: sample_kernel/out/matrix)")
    p.add_argument("--bench", action="store_true", help="instruction counts per op")
    p.add_argument("--verbose", action="store_true", help="print every kernel's output")
    args = p.parse_args(argv)
    arches = args.arch or list(ARCHES)
    toolchains = args.toolchain or [t for t in skernel.TOOLCHAINS
                                    if skernel.toolchain_available(t)]
    absent = [t for t in toolchains if not skernel.toolchain_available(t)]
    if absent:
        print(f"run_matrix: toolchain {', '.join(absent)} not installed (apt-get install "
              "clang lld)", file=sys.stderr)
        return 2
    missing = [skernel.QEMU_BINARY[a] for a in arches if not skernel.qemu_available(a)]
    if missing:
        print(f"run_matrix: {', '.join(missing)} not found (apt-get install qemu-system-x86)",
              file=sys.stderr)
        return 2
    try:
        if args.bench:
            return bench(arches, toolchains, args.out.resolve(), args.verbose)
        return matrix(arches, toolchains, args.out.resolve(), args.verbose)
    except RuntimeError as exc:
        print(f"run_matrix: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
