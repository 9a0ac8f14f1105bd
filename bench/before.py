"""The ring-0 figures of format 2, the "before" of docs/BENCHMARKS.md.

They were measured by bench/run.py at commit BEFORE (format 2, one padding
NOP or a taken jump per site) and are read back from that commit's
docs/BENCHMARKS.md with git, so they are the published figures, not retyped.
"""

from __future__ import annotations

import re
import subprocess

from common import ROOT

BEFORE = "3723cd7"
_WORKLOAD = re.compile(r"^\| Ring 0 (\S+): workload loop, patched native vs no paravirt, "
                       r"instructions \| [^|]+ \| ([+-][0-9.]+) % \|", re.M)
_SECTION = re.compile(r"^### (\S+): instructions per op\n\n(.*?)\n\n", re.M | re.S)


def _doc() -> str | None:
    try:
        return subprocess.run(["git", "show", f"{BEFORE}:docs/BENCHMARKS.md"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def workload() -> dict[str, float]:
    """arch (gcc builds) -> workload overhead in % of the no-paravirt build."""
    doc = _doc() or ""
    return {arch: float(v) for arch, v in _WORKLOAD.findall(doc) if "," not in arch}


def per_op() -> dict[str, dict[str, list[str]]]:
    """arch -> op -> the cells of its row (no paravirt, generic, patched native, ...)."""
    doc = _doc() or ""
    out: dict[str, dict[str, list[str]]] = {}
    for arch, body in _SECTION.findall(doc):
        rows = [r.strip("|").split("|") for r in body.splitlines()[2:]]
        out[arch] = {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}
    return out


def markdown(now_workload: dict[str, float | None]) -> list[str]:
    wl = workload()
    ops = per_op()
    if not wl and not ops:
        return [f"Before: not available (git cannot show {BEFORE}:docs/BENCHMARKS.md)."]
    lines = [f"### Before and after: format 2 (commit {BEFORE}) against this build", "",
             "Format 2 made every site as long as its longest body: native paid a padding "
             "NOP at every site, and a taken jump where a hypervisor body was over 11 bytes.",
             "", "| arch (gcc) | workload, patched native vs no paravirt, before | after |",
             "| --- | ---: | ---: |"]
    for arch, before in wl.items():
        now = now_workload.get(arch)
        lines.append(f"| {arch} | {before:+.2f} % | "
                     + (f"{now:+.2f} % |" if now is not None else "- |"))
    for arch, rows in ops.items():
        if " " in arch:
            continue
        lines += ["", f"{arch}, before: instructions per op (no paravirt / patched native / "
                      "patched xen / patched lguest)", "",
                  "| op | no paravirt | patched native | patched xen | patched lguest |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for op, c in rows.items():
            lines.append(f"| {op} | {c[0]} | {c[2]} | {c[3]} | {c[4]} |")
    return lines
