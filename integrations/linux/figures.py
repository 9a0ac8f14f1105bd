#!/usr/bin/env python3
"""docs/LINUX.md's figures, from what the harness measured.

    figures.py [--cache DIR] [--write docs/LINUX.md]

Reads out/<config>-baseline/summary.json and out/<config>-linkfix/linkfix-summary.json
(written by `build.sh` and `build.sh linkfix`) for configs B and C and prints the
figures as Markdown; with --write, replaces the part of the file between the
`<!-- figures:begin -->` and `<!-- figures:end -->` lines with them. Standard
library only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kbuild  # noqa: E402

BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _n(x: float | int | None) -> str:
    if x is None:
        return "-"
    return f"{x:,}" if isinstance(x, int) else f"{x:,.2f}".rstrip("0").rstrip(".")


def _full(build: dict) -> str:
    return " (full)" if build.get("full_build") else ""


def _tool(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        return "?"


def _boots(r: dict) -> str:
    out = []
    for tag, b in r["boots"].items():
        kaslr = b.get("kaslr_offset")
        model = sum(b["counters"]["at power-off"].values())
        out.append(f"{tag.removeprefix('boot-')}: {b['result']}, {b['wall_s']} s"
                   + (f", KASLR {kaslr}" if kaslr not in (None, "0x0") else "")
                   + f", model calls {model:,}")
    return "; ".join(out)


def config_figures(c: str, base: dict | None, lf: dict) -> list[str]:
    out = [f"### Config {c}: {kbuild.CONFIGS[c].what}", ""]
    if base is not None:
        bb = base["boot"]
        lfops = next((ln.removeprefix("lfops: ") for ln in
                      bb["modules"].get("lfops", {}).get("dmesg", []) if "checks" in ln), "-")
        out += [f"Baseline (no linkfix): make {base['make_wall_s']} s "
                f"({'full build' if base['full_build'] else 'incremental'}), "
                f"{base['objtool_warnings']} objtool warning(s), boot {bb['result']} in "
                f"{bb['wall_s']} s, lfops: {lfops}.",
                ""]
    out += ["| target | make (s) | objtool warnings = baseline | verify vmlinux | "
            "bzImage payload = vmlinux, verify | ORC (orccheck) | resident table bytes "
            "after boot | lfops | boots |",
            "|---|---|---|---|---|---|---|---|---|"]
    for t, r in lf["targets"].items():
        o = r["orccheck"]
        orc = "no ORC" if o.get("skipped") else f"{o['sites']:,} sites, {o['problems']} problems"
        bz = r.get("bzimage", {})
        res = {b["resident"].get("resident_bytes") for b in r["boots"].values()}
        ops = {b.get("lfops", {}).get("passed") for b in r["boots"].values()}
        out.append(
            f"| {t} | {r['build']['make_wall_s']}{_full(r['build'])} | "
            f"{r['build']['objtool_warnings']}, "
            f"{'equal' if r['objtool']['equal'] else 'DIFFERENT'} | "
            f"rc {r['verify']['rc']} | {bz.get('sections_equal')}, rc "
            f"{bz.get('verify', {}).get('rc')} | {orc} | "
            f"{', '.join(str(x) for x in sorted(res, key=str))} | "
            f"{'pass' if ops == {True} else ops} | {_boots(r)} |")
    out.append("")
    any_t = next(iter(lf["targets"].values()))
    summ = any_t["sites"].get("summary", {})
    total = sum(v["sites"] for v in summ.values())
    out.append("Sites per op: " + ", ".join(f"{op} {v['sites']:,}" for op, v in summ.items()
                                             if v["sites"]) + f"; {total:,} in all, "
               f"{sum(v['bytes'] for v in summ.values()):,} bytes.")
    tb = any_t["tables"]
    boot = next(iter(any_t["boots"].values()))["resident"]
    out.append(f"Tables linked: `.linkfix.*` {tb['linkfix_total']:,} bytes "
               f"({', '.join(f'{k} {v:,}' for k, v in tb['linkfix_sections'].items())}), "
               f"`.altinstructions` +{tb['alt_growth']['.altinstructions']:,}, "
               f"`.altinstr_replacement` +{tb['alt_growth']['.altinstr_replacement']:,}: "
               f"{tb['init_total']:,} bytes, {tb['init_total'] / total:.1f} per site. "
               f"After boot, from the running kernel's /proc/kallsyms: tables "
               f"{', '.join(f'{k} {v:,}' for k, v in boot.get('tables', {}).items())} "
               f"({_n(boot.get('table_bytes'))} bytes) all inside [__init_begin, "
               f"__init_end), which it reported freeing: **{_n(boot.get('resident_bytes'))}"
               f" bytes resident, {_n(boot.get('resident_bytes_per_site'))} per site**.")
    out.append(f"Text against the baseline: function bytes (nm t/T) "
               f"{any_t['function_growth']:+,}; the `.text` section "
               f"{any_t['text_growth']:+,} bytes.")
    g = lf["targets"].get("generic", {})
    if "patch_native" in g:
        out.append(f"`linkfix patch --target native` of the generic vmlinux: "
                   f"{g['patch_native']['seconds']} s (Python's start included); the "
                   f"final `ld` of vmlinux again: {g['final_link']['seconds']} s.")
    if "retarget" in g:
        rt = g["retarget"]
        out.append("Re-targeting the generic vmlinux G: "
                   + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in rt["equal"].items())
                   + " (N1 = G patched native, M1 = G patched model, M2 = N1 patched "
                   "model, N2 = M1 patched native, G2 = M1 patched generic).")
    ms = any_t.get("module_sites", {})
    if ms:
        out.append("Modules (their sites stay generic: dispatcher calls): "
                   + ", ".join(f"{k} {v} site records" for k, v in ms.items()) + ".")
    n = lf.get("noop_make")
    if n:
        out.append(f"A make with nothing to do: {n['make_wall_s']} s; vmlinux unchanged "
                   f"{n['vmlinux_unchanged']}, relinked {n['relinked']}, repatched "
                   f"{n['repatched']}.")
    w = lf.get("written")
    if w:
        cmp = w["compare"]
        mv = cmp["text"].get("moved_sections", {})
        moved = ", ".join(f"{k} {v:+#x}" for k, v in list(mv.items())[:6]) + \
            (", ..." if len(mv) > 6 else "")
        out.append(
            f"Against the kernel built with the native bytes written into the sites "
            f"(`LINKFIX_GENFLAGS=--written native`, make {w['build']['make_wall_s']} s"
            f"{_full(w['build'])}, "
            f"{w['build']['objtool_warnings']} objtool warning(s)): "
            f"{cmp['sites']['count']:,} sites compared, **{cmp['sites']['differences']} "
            f"differing**; ORC entries {cmp['orc']['entries_patched']:,} (patched) and "
            f"{cmp['orc']['entries_written']:,} (written), **{cmp['orc']['differences']} "
            f"differences** over {', '.join(cmp['compared_sections'])}; "
            f"{cmp['text']['differing_outside_sites']:,} text bytes differ outside the "
            f"sites, the references to data the written kernel places elsewhere "
            f"({moved}); "
            f"not compared (moved): {', '.join(cmp['not_compared']) or 'nothing'}.")
    out.append(f"All checks: {'passed' if lf.get('ok') else 'FAILED'}.")
    return out + [""]


def render(cache: Path) -> str:
    env = "" if cache == kbuild.default_cache() else f"LINKFIX_LINUX_CACHE={cache} "
    opt = "" if cache == kbuild.default_cache() else f" --cache {cache}"
    out = [BEGIN, "",
           f"Measured by `{env}integrations/linux/build.sh --configs B,C` and "
           f"`{env}integrations/linux/build.sh linkfix --configs B,C` (or the `linux` "
           f"tests, which run both), then `python3 integrations/linux/figures.py{opt} "
           f"--write docs/LINUX.md`. {os.cpu_count()} cores, {platform.machine()}, "
           f"{_tool(['gcc', '--version'])}, {_tool(['ld', '--version'])}, "
           f"{_tool(['qemu-system-x86_64', '--version'])} (tcg). Make times are those "
           f"of the last run (incremental unless it says full).", ""]
    for c in ("B", "C"):
        base = _load(cache / "out" / f"{c}-baseline" / "summary.json")
        lf = _load(cache / "out" / f"{c}-linkfix" / "linkfix-summary.json")
        if lf is None:
            out += [f"### Config {c}", "", "Not built.", ""]
            continue
        out += config_figures(c, base, lf)
    out.append(END)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=kbuild.default_cache())
    p.add_argument("--write", type=Path, help="the Markdown file to update in place")
    args = p.parse_args(argv)
    text = render(args.cache)
    if args.write is None:
        sys.stdout.write(text)
        return 0
    doc = args.write.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"figures: error: {args.write}: no {BEGIN} ... {END} block", file=sys.stderr)
        return 2
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1].lstrip("\n")
    new = head + text + ("\n" + tail if tail else "")
    tmp = args.write.with_name(args.write.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
