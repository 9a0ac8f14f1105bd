#!/usr/bin/env python3
"""Build, check and boot Linux 6.1 with the linkfix series, next to the baseline.

    integrations/linux/build.sh linkfix [--configs B[,C]] [--targets native,model,generic]

For each config: apply patches/ (series.py) to a copy of the unpacked tree, build
variant `linkfix` (build/<config>-linkfix, CONFIG_LINKFIX=y) once per target
(CONFIG_LINKFIX_TARGET_*: native, model, generic; changing the target rebuilds
arch/x86/linkfix/ops.o, relinks and repatches, nothing else), and for each target:
keep a copy of vmlinux in out/<config>-linkfix/<target>/, compare the objtool
warnings with the baseline's (out/<config>-baseline/objtool-warnings.txt, built by
`build.sh` without linkfix), run `linkfix verify` on vmlinux and on the bzImage's
payload (which must hold vmlinux's sections: bzimage.py), run the ORC checker
(tests/tools/orccheck.py), build the modules and boot (generic: once with the
default backend and once with linkfix=model); a boot must print the model's
counters, pass lfops, and show from /proc/kallsyms that no table outlives init
memory. The generic image is also re-targeted byte for byte and timed against the
final link. With ORC (config B): the written build (build/B-written, the native
bytes compiled into the sites) and writtencheck.py's comparison with the patched
native vmlinux. Last a no-op make. Everything goes to
out/<config>-linkfix/linkfix-summary.json, the figures to figures.md (figures.py).

LINKFIX (the linkfix command make runs) defaults to this checkout's venv with
PYTHONPATH set to the checkout; override with --linkfix.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import bzimage  # noqa: E402
import figures  # noqa: E402
import kbuild  # noqa: E402
import orc  # noqa: E402
import series  # noqa: E402
import writtencheck  # noqa: E402

TARGETS = ("native", "model", "generic")
COUNTER = re.compile(r"linkfix: model (at boot|at power-off): (\w+) (\d+)$")
INIT_COUNTER = re.compile(r"linkfix-init: counter: (\w+) (\d+)$")
REPORT = re.compile(r"linkfix: target (\w+), patched (\w+), backend (\w+)$")


def default_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def linkfix_argv(python: str) -> list[str]:
    return ["env", f"PYTHONPATH={ROOT}", python, "-m", "linkfix"]


def set_target(b: kbuild.Build, target: str) -> bool:
    """Select CONFIG_LINKFIX_TARGET_<target> in b's .config; True if it changed."""
    kbuild.ensure_config(b)  # a fresh build tree: tinyconfig + the config's options
    cfg = kbuild.read_config(b.builddir / ".config")
    if cfg.get(f"CONFIG_LINKFIX_TARGET_{target.upper()}") == "y":
        return False
    args = []
    for t in TARGETS:
        args += ["-e" if t == target else "-d", f"LINKFIX_TARGET_{t.upper()}"]
    kbuild.run([str(b.srctree / "scripts" / "config"), "--file",
                str(b.builddir / ".config"), *args])
    b.make("olddefconfig")
    cfg = kbuild.read_config(b.builddir / ".config")
    if cfg.get("CONFIG_LINKFIX_TARGET") != f'"{target}"':
        raise kbuild.Fail(f"{b.name}: olddefconfig did not keep LINKFIX_TARGET={target}")
    return True


def run_cmd(argv: list[str]) -> dict:
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True)
    return {"command": shlex.join(argv), "rc": r.returncode,
            "seconds": round(time.monotonic() - t0, 3),
            "output": (r.stdout + r.stderr).strip().splitlines()[-20:]}


def counters(log: Path) -> dict:
    """The model's counters: printed by the kernel at boot and at power-off (its reboot
    notifier), and read by /init from /proc/linkfix before it ends the machine."""
    out: dict = {"report": None, "at boot": {}, "at power-off": {}, "by /init": {}}
    for line in log.read_text(errors="replace").replace("\r", "").splitlines():
        if m := INIT_COUNTER.match(line):
            out["by /init"][m.group(1)] = int(m.group(2))
        elif m := COUNTER.search(line):
            out[m.group(1)][m.group(2)] = int(m.group(3))
        elif m := REPORT.search(line):
            out["report"] = {"target": m.group(1), "patched": m.group(2),
                             "backend": m.group(3)}
    return out


def sites_per_op(lf: list[str], vmlinux: Path) -> dict:
    r = subprocess.run([*lf, "inspect", "--summary", "--json", str(vmlinux)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-500:]}
    return json.loads(r.stdout)


def function_bytes(vmlinux: Path) -> int:
    """The sizes of every function symbol (nm t/T). In config B .text's section size
    does not move: SRSO places srso_alias_untrain_ret and the return thunk at fixed
    alignments, and the padding before them absorbs the growth."""
    r = subprocess.run(["nm", "-S", "--defined-only", str(vmlinux)], capture_output=True,
                       text=True, check=True)
    return sum(int(p[1], 16) for p in (ln.split() for ln in r.stdout.splitlines())
               if len(p) == 4 and p[2] in ("t", "T"))


def table_bytes(sec: dict, base: dict) -> dict:
    lf = {k: v for k, v in sec.items() if k.startswith(".linkfix.")}
    alt = {k: sec.get(k, 0) - base.get(k, 0)
           for k in (".altinstructions", ".altinstr_replacement")}
    return {"linkfix_sections": lf, "linkfix_total": sum(lf.values()),
            "alt_growth": alt, "init_total": sum(lf.values()) + sum(alt.values())}


def final_link_time(b: kbuild.Build, out: Path) -> dict:
    """Time the last ld of link-vmlinux.sh again (vmlinux.o, the export and version
    objects, the second kallsyms object), as .vmlinux.cmd gives its flags."""
    bd = b.builddir
    cmd = (bd / ".vmlinux.cmd").read_text().split("\n", 1)[0].split(":=", 1)[1]
    argv = shlex.split(cmd.split(";", 1)[0])
    ld, kbuild_ldflags, ldflags_vmlinux = argv[1], argv[2], argv[3]
    objs = ["vmlinux.o", ".vmlinux.export.o", "init/version-timestamp.o"]
    full = [*shlex.split(ld), *shlex.split(kbuild_ldflags), *shlex.split(ldflags_vmlinux),
            "--script=arch/x86/kernel/vmlinux.lds", "-o", str(out), "--whole-archive",
            *[o for o in objs if (bd / o).is_file()], "--no-whole-archive",
            ".tmp_vmlinux.kallsyms2.o"]
    t0 = time.monotonic()
    r = subprocess.run(full, cwd=bd, capture_output=True, text=True)
    res = {"command": shlex.join(full), "rc": r.returncode,
           "seconds": round(time.monotonic() - t0, 3)}
    out.unlink(missing_ok=True)
    return res


def orccheck(vml: Path) -> dict:
    res = run_cmd(["env", f"PYTHONPATH={ROOT}", default_python(),
                   str(ROOT / "tests" / "tools" / "orccheck.py"), str(vml)])
    m = re.search(r"(\d+) sites, (\d+) instructions, (\d+) ORC differences",
                  "\n".join(res["output"]))
    res["sites"], res["instructions"], res["problems"] = \
        (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (None, None, None)
    return res


def payload_check(b: kbuild.Build, lf: list[str], target: str, keep: Path) -> dict:
    """What boots is what linkfix wrote: the bzImage's payload (bzimage.py) holds
    vmlinux's allocated sections byte for byte, and `linkfix verify` passes on it."""
    bz = b.builddir / "arch" / "x86" / "boot" / "bzImage"
    out = keep / "payload.elf"
    try:
        data = bzimage.payload(bz.read_bytes(), str(bz))
    except (bzimage.PayloadError, OSError) as exc:
        return {"error": str(exc), "sections_equal": False, "verify": {"rc": None}}
    out.write_bytes(data)
    diffs = bzimage.compare_sections(orc.Elf(data, str(out)),
                                     orc.Elf.from_file(b.builddir / "vmlinux"))
    res = {"payload_bytes": len(data), "sections_equal": not diffs, "differences": diffs,
           "verify": run_cmd([*lf, "verify", "--target", target, str(out)])}
    out.unlink()
    return res


INIT_SYM = re.compile(r"linkfix-init: init-symbol: ([0-9a-f]+) \S (\w+)$")
FREED = "Freeing unused kernel image (initmem) memory"


def resident(log: Path, nsites: int | None) -> dict:
    """Table bytes the running kernel keeps after boot: from its own /proc/kallsyms,
    each linkfix table's [start, end) and .altinstructions, less what lies in the
    init memory [__init_begin, __init_end) that it reported freeing."""
    text = log.read_text(errors="replace").replace("\r", "")
    syms = {m.group(2): int(m.group(1), 16) for m in map(INIT_SYM.search, text.splitlines())
            if m}
    res: dict = {"freed_initmem": FREED in text, "symbols": len(syms)}
    lo, hi = syms.get("__init_begin"), syms.get("__init_end")
    tables = sorted({n[:-len("_start")] for n in syms if n.endswith("_start")})
    pairs = [(t, syms[t + "_start"], syms.get(t + "_end")) for t in tables]
    pairs.append(("__alt_instructions", syms.get("__alt_instructions"),
                  syms.get("__alt_instructions_end")))
    if lo is None or hi is None or not tables or any(a is None or e is None
                                                       for _, a, e in pairs):
        res["error"] = "the running kernel's /proc/kallsyms lacks the table symbols"
        return res
    kept, total = 0, 0
    for _, a, e in pairs:
        total += e - a
        kept += (e - a) - max(0, min(e, hi) - max(a, lo))
    res.update({"tables": {t: e - a for t, a, e in pairs}, "table_bytes": total,
                "resident_bytes": kept if res["freed_initmem"] else total,
                "sites": nsites})
    res["resident_bytes_per_site"] = None if not nsites else res["resident_bytes"] / nsites
    return res


def total_sites(inspected: dict) -> int | None:
    """Every site `linkfix inspect --summary --json` counted, op and branch sites."""
    summ = inspected.get("summary")
    return None if not isinstance(summ, dict) else sum(v["sites"] for v in summ.values())


def module_results(boot: dict) -> dict:
    """lfops's own verdict (it fails to load if a check fails) and its line."""
    lines = boot.get("modules", {}).get("lfops", {}).get("dmesg", [])
    verdict = next((ln for ln in lines if "checks passed" in ln), None)
    m = re.search(r"(\d+) of (\d+) checks passed", verdict or "")
    return {"line": verdict, "passed": m is not None and m.group(1) == m.group(2)}


def module_sites(b: kbuild.Build) -> dict:
    """Site records each built module carries (its sites stay generic: nothing
    patches a .ko)."""
    out = {}
    for ko in sorted((b.cache / "modules" / b.name).glob("*/*.ko")):
        elf = orc.Elf.from_file(ko)
        sec = elf.by_name.get(".linkfix.sites")
        out[ko.stem] = 0 if sec is None else sec.size // 8
    return out


def retarget(lf: list[str], generic: Path, work: Path) -> dict:
    """Re-targeting is byte-exact: from the generic vmlinux G, patch(G, model) equals
    patch(patch(G, native), model), patch(G, native) equals patch(patch(G, model),
    native), and patch(patch(G, model), generic) is G again."""
    names = {"N1": (generic, "native"), "M1": (generic, "model"), "M2": ("N1", "model"),
             "N2": ("M1", "native"), "G2": ("M1", "generic")}
    files: dict[str, Path] = {}
    runs = {}
    for name, (src, t) in names.items():
        files[name] = work / f"vmlinux.{name}"
        inp = files[src] if isinstance(src, str) else src
        runs[name] = run_cmd([*lf, "patch", "-q", "--target", t, "-o", str(files[name]),
                              str(inp)])
    same = {"M1 == M2": files["M1"].read_bytes() == files["M2"].read_bytes(),
            "N1 == N2": files["N1"].read_bytes() == files["N2"].read_bytes(),
            "G2 == G": files["G2"].read_bytes() == generic.read_bytes()}
    for f in files.values():
        f.unlink(missing_ok=True)
    return {"runs": {k: v["rc"] for k, v in runs.items()}, "equal": same,
            "ok": all(v["rc"] == 0 for v in runs.values()) and all(same.values())}


def written_build(c: str, tree: Path, lf: list[str], patched: Path, args) -> dict:
    """Config c built with the native bytes written into every site
    (LINKFIX_GENFLAGS=--written native), and writtencheck.py's comparison of the
    patched native vmlinux with it: site bytes and ORC, address by address."""
    w = kbuild.Build(kbuild.CONFIGS[c], "written", args.cache, tree,
                     extra_opts=["-e", "LINKFIX"], extra_require=["LINKFIX=y"],
                     make_vars=[f"LINKFIX={shlex.join(lf)}",
                                "LINKFIX_GENFLAGS=--written native"],
                     jobs=args.jobs, nice=args.nice)
    set_target(w, "native")
    res: dict = {"build": kbuild.build(w, verbose=args.verbose)}
    vml = w.builddir / "vmlinux"
    res["verify"] = run_cmd([*lf, "verify", "--target", "native", str(vml)])
    res["compare"] = writtencheck.check(patched, vml, lf)
    res["ok"] = res["verify"]["rc"] == 0 and res["compare"]["ok"]
    return res


def one_target(b: kbuild.Build, target: str, lf: list[str], base: dict, args) -> dict:
    changed = set_target(b, target)
    res: dict = {"target": target, "retargeted": changed}
    res["build"] = kbuild.build(b, verbose=args.verbose)
    vml = b.builddir / "vmlinux"
    keep = b.outdir / target
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vml, keep / "vmlinux")
    shutil.copyfile(b.outdir / "objtool-warnings.txt", keep / "objtool-warnings.txt")
    warn = (b.outdir / "objtool-warnings.txt").read_text().splitlines()
    res["objtool"] = {"warnings": warn, "baseline": base["warnings"],
                      "equal": warn == base["warnings"]}
    res["verify"] = run_cmd([*lf, "verify", "--target", target, str(vml)])
    res["bzimage"] = payload_check(b, lf, target, keep)
    if ".orc_unwind" not in kbuild.sizes(vml):
        res["orccheck"] = {"skipped": "no ORC in this config (frame pointers)",
                           "problems": 0, "sites": None, "instructions": None}
    else:
        res["orccheck"] = orccheck(vml)
    sec = kbuild.sizes(vml)
    res["text_bytes"] = sec.get(".text")
    res["text_growth"] = None if base["text"] is None else sec.get(".text", 0) - base["text"]
    res["tables"] = table_bytes(sec, base["sizes"])
    res["function_bytes"] = function_bytes(vml)
    res["function_growth"] = None if base["functions"] is None else \
        res["function_bytes"] - base["functions"]
    if target == "generic":
        # linkfix patch's time against the relink: patch a copy of the generic image
        res["patch_native"] = run_cmd([*lf, "patch", "-q", "--target", "native", "-o",
                                       str(keep / "vmlinux.native"), str(vml)])
        (keep / "vmlinux.native").unlink(missing_ok=True)
        res["final_link"] = final_link_time(b, keep / "vmlinux.ld")
        res["retarget"] = retarget(lf, vml, keep)
    res["sites"] = sites_per_op(lf, vml)
    kos = [] if args.no_modules else kbuild.build_modules(b, sorted(
        p for p in (HERE / "modules").iterdir() if p.is_dir()))
    initrd = kbuild.make_initramfs(b.outdir / "initramfs.cpio", kos)
    boots = {}
    for tag, append in ([("boot-generic", ""), ("boot-generic-model", "linkfix=model")]
                        if target == "generic" else [(f"boot-{target}", "")]):
        r = kbuild.boot(b, initrd, append=append, accel=args.accel, timeout=args.timeout,
                        tag=tag, expect_modules=[k.stem for k in kos])
        r["counters"] = counters(Path(r["log"]))
        if not r["counters"]["at boot"]:
            r["result"] = "fail"
            r["reasons"].append("no model counters printed")
        r["resident"] = resident(Path(r["log"]), total_sites(res["sites"]))
        if r["resident"].get("resident_bytes") != 0:
            r["result"] = "fail"
            r["reasons"].append(f"tables resident after boot: {r['resident']}")
        if kos:
            r["lfops"] = module_results(r)
            if not r["lfops"]["passed"]:
                r["result"] = "fail"
                r["reasons"].append("lfops did not pass all its checks")
        boots[tag] = r
    res["boots"] = boots
    res["module_sites"] = module_sites(b) if kos else {}
    return res


def run_config(c: str, args) -> dict:
    cache = args.cache
    pristine, _ = kbuild.ensure_tree(cache)
    tree = series.ensure_series(cache, pristine)
    lf = shlex.split(args.linkfix) if args.linkfix else linkfix_argv(args.python or
                                                                        default_python())
    b = kbuild.Build(kbuild.CONFIGS[c], "linkfix", cache, tree,
                     extra_opts=["-e", "LINKFIX"], extra_require=["LINKFIX=y"],
                     make_vars=[f"LINKFIX={shlex.join(lf)}"], jobs=args.jobs,
                     nice=args.nice)
    bout = cache / "out" / f"{c}-baseline"
    bsum = json.loads((bout / "summary.json").read_text()) \
        if (bout / "summary.json").is_file() else {}
    bwarn = (bout / "objtool-warnings.txt").read_text().splitlines() \
        if (bout / "objtool-warnings.txt").is_file() else None
    bvml = cache / "build" / f"{c}-baseline" / "vmlinux"
    base = {"warnings": bwarn, "text": bsum.get("text_bytes"),
            "sizes": kbuild.sizes(bvml) if bvml.is_file() else {},
            "functions": function_bytes(bvml) if bvml.is_file() else None}
    summary: dict = {"config": c, "srctree": str(tree), "builddir": str(b.builddir),
                     "series": [p.name for p in sorted(series.PATCHES.glob("*.patch"))],
                     "baseline": {"objtool_warnings": bwarn, "text_bytes": base["text"]},
                     "targets": {}}
    out = b.outdir
    for t in args.targets.split(","):
        summary["targets"][t] = one_target(b, t, lf, base, args)
        out.mkdir(parents=True, exist_ok=True)
        kbuild.write_atomic(out / "linkfix-summary.json", json.dumps(summary, indent=2) + "\n")
    native = out / "native" / "vmlinux"
    if "native" in summary["targets"] and ".orc_unwind" in kbuild.sizes(native):
        summary["written"] = written_build(c, tree, lf, native, args)
        kbuild.write_atomic(out / "linkfix-summary.json", json.dumps(summary, indent=2) + "\n")
        # a make with nothing to do: no relink, no repatch
    vml = b.builddir / "vmlinux"
    before = vml.stat().st_mtime_ns
    noop = kbuild.build(b, verbose=args.verbose)
    log = (b.outdir / "build.log").read_text(errors="replace")
    summary["noop_make"] = {**noop, "vmlinux_unchanged": vml.stat().st_mtime_ns == before,
                            "relinked": bool(re.search(r"^  LD      vmlinux$", log, re.M)),
                            "repatched": "LINKFIX vmlinux" in log}
    ok = summary["noop_make"]["vmlinux_unchanged"] and all(
             r["objtool"]["equal"] and r["verify"]["rc"] == 0
             and r["orccheck"]["problems"] == 0
             and r["bzimage"]["sections_equal"] and r["bzimage"]["verify"]["rc"] == 0
             and r.get("retarget", {"ok": True})["ok"]
             and all(x["result"] == "pass" for x in r["boots"].values())
             for r in summary["targets"].values())
    ok = ok and summary.get("written", {"ok": True})["ok"]
    summary["ok"] = ok
    kbuild.write_atomic(out / "linkfix-summary.json", json.dumps(summary, indent=2) + "\n")
    kbuild.write_atomic(out / "figures.md", "\n".join(
        figures.config_figures(c, bsum or None, summary)) + "\n")
    kbuild.log(f"{c}-linkfix: {'all checks passed' if ok else 'FAILED'}; "
               f"{out / 'linkfix-summary.json'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="B")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--cache", type=Path, default=kbuild.default_cache())
    p.add_argument("--python", help="the Python that runs linkfix (default: .venv)")
    p.add_argument("--linkfix", help="the linkfix command (default: env PYTHONPATH=... "
                   "PYTHON -m linkfix)")
    p.add_argument("--no-modules", action="store_true")
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    p.add_argument("--timeout", type=int, default=120)
    p.add_argument("--jobs", "-j", type=int, default=2)
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    try:
        results = [run_config(c.strip().upper(), args) for c in args.configs.split(",")]
    except kbuild.Fail as e:
        print(f"lfbuild: error: {e}", file=sys.stderr)
        return 2
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
