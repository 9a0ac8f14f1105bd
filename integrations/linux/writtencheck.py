#!/usr/bin/env python3
"""Compare a patched vmlinux with the kernel built with the native bytes written in.

    writtencheck.py PATCHED WRITTEN [--linkfix CMD] [--json OUT]

PATCHED is an ordinary linkfix build patched for a target (`linkfix patch`, from
Makefile.postlink); WRITTEN is the same tree and config built with
`make LINKFIX_GENFLAGS="--written <target>"`, whose sites the compiler already got
holding the target's bytes with no alternatives (linkfix/stubgen/written.py), so that
objtool made their unwind data from those instructions as if a developer had written
them there. The two compile to the same code at the same addresses; only init
memory (the alternatives objtool was shown) differs.

Checked, each counted:
  layout     every executable section of PATCHED at the same address and size in
             WRITTEN (those that are not are listed; only the others are compared);
  sites      the bytes of every site `linkfix inspect` lists, the same in both;
  orc        the ORC entry in effect at every address where either table starts one,
             over the compared sections: the same in both (orc.py's comparison);
             the differences inside sites are counted apart;
  text       the bytes of the compared sections outside the sites (informative: a
             data section that moved changes the displacements and addresses that
             point into it; the sections placed elsewhere are listed with how far).

Exits 0 only if the layout is comparable, the sites are there, and no site byte and
no ORC entry differs. Standard library only; it runs linkfix (inspect) as a command.
"""

from __future__ import annotations

import argparse
import bisect
import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import orc  # noqa: E402

SHF_ALLOC, SHF_EXECINSTR = 0x2, 0x4


def exec_sections(elf: orc.Elf) -> dict[str, orc.Section]:
    return {s.name: s for s in elf.sections
            if s.flags & SHF_ALLOC and s.flags & SHF_EXECINSTR and s.size and s.type != 8}


def read_at(elf: orc.Elf, sec: orc.Section, addr: int, n: int) -> bytes:
    off = sec.offset + addr - sec.addr
    return elf.data[off:off + n]


def sites(linkfix: list[str], vmlinux: Path) -> list[tuple[int, int, str]]:
    """(address, size, op) of every site, from `linkfix inspect --jsonl`."""
    r = subprocess.run([*linkfix, "inspect", "--jsonl", str(vmlinux)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise orc.OrcError(f"{vmlinux}: linkfix inspect failed: {r.stderr.strip()[-300:]}")
    out = []
    for line in r.stdout.splitlines():
        rec = json.loads(line)
        if rec.get("type") == "site":
            out.append((int(rec["address"], 16), int(rec["size"]), rec["op"]))
    return sorted(out)


def check(patched: Path, written: Path, linkfix: list[str]) -> dict:
    ea, eb = orc.Elf.from_file(patched), orc.Elf.from_file(written)
    xa, xb = exec_sections(ea), exec_sections(eb)
    same = sorted((s for n, s in xa.items()
                   if n in xb and (xb[n].addr, xb[n].size) == (s.addr, s.size)),
                  key=lambda s: s.addr)
    moved = sorted(set(xa) - {s.name for s in same})
    res: dict = {"patched": str(patched), "written": str(written),
                 "compared_sections": [s.name for s in same], "not_compared": moved}
    starts = [s.addr for s in same]

    def section_of(addr: int) -> orc.Section | None:
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and addr < same[i].addr + same[i].size:
            return same[i]
        return None

    ta, tb = orc.OrcTable(ea), orc.OrcTable(eb)
    all_sites = sites(linkfix, patched)
    site_diffs, outside = [], 0
    for addr, size, op in all_sites:
        sec = section_of(addr)
        if sec is None:
            outside += 1
            continue
        a, b = read_at(ea, sec, addr, size), read_at(eb, sec, addr, size)
        if a != b:
            site_diffs.append(f"{addr:#x} {ta.describe(addr)} {op}: "
                              f"patched {a.hex()} written {b.hex()}")
    res["sites"] = {"count": len(all_sites), "in_compared_sections": len(all_sites) - outside,
                    "differences": len(site_diffs), "first": site_diffs[:20]}

    diffs = orc.compare(ta, tb, [(s.addr, s.addr + s.size) for s in same])
    site_starts = [a for a, _, _ in all_sites]

    def in_site(addr: int) -> bool:
        i = bisect.bisect_right(site_starts, addr) - 1
        return i >= 0 and addr < all_sites[i][0] + all_sites[i][1]

    at_sites = [d for d in diffs if in_site(d.addr_a)]
    res["orc"] = {"entries_patched": len(ta), "entries_written": len(tb),
                  "differences": len(diffs), "differences_in_sites": len(at_sites),
                  "first": [str(d) for d in diffs[:20]]}

    # Text outside the sites: informative (see the module's docstring).
    site_bytes = {a: n for a, n, _ in all_sites}
    differing = 0
    for s in same:
        a, b = ea.contents(s), eb.contents(s)
        if a == b:
            continue
        differing += sum(x != y for x, y in zip(a, b, strict=True))
        for addr, n in site_bytes.items():
            if s.addr <= addr < s.addr + s.size:
                differing -= sum(p != q for p, q in zip(read_at(ea, s, addr, n),
                                                         read_at(eb, s, addr, n),
                                                         strict=True))
    # Allocated sections placed elsewhere in WRITTEN (by how much): what the text
    # bytes that differ outside the sites point at.
    moved = {s.name: eb.by_name[s.name].addr - s.addr for s in ea.sections
             if s.flags & SHF_ALLOC and s.size and s.name in eb.by_name
             and eb.by_name[s.name].addr != s.addr}
    res["text"] = {"bytes_compared": sum(s.size for s in same),
                   "differing_outside_sites": differing, "moved_sections": moved}
    res["ok"] = bool(same) and not moved_sites(res) and not site_diffs and not diffs \
        and len(all_sites) > 0
    return res


def moved_sites(res: dict) -> bool:
    """True if some site lies in a section that could not be compared."""
    return res["sites"]["in_compared_sections"] != res["sites"]["count"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("patched", type=Path)
    p.add_argument("written", type=Path)
    p.add_argument("--linkfix", default="linkfix", help="the linkfix command")
    p.add_argument("--json", type=Path, help="write the result here as JSON")
    args = p.parse_args(argv)
    try:
        res = check(args.patched, args.written, shlex.split(args.linkfix))
    except (orc.OrcError, OSError) as exc:
        print(f"writtencheck: error: {exc}", file=sys.stderr)
        return 2
    s, o, t = res["sites"], res["orc"], res["text"]
    print(f"{s['count']} sites ({s['in_compared_sections']} in compared sections), "
          f"{s['differences']} differing; {o['differences']} ORC differences "
          f"({o['differences_in_sites']} inside sites) over "
          f"{', '.join(res['compared_sections'])}; {t['differing_outside_sites']} text "
          f"bytes differ outside the sites")
    for line in s["first"] + o["first"]:
        print("  " + line)
    if res["not_compared"]:
        print(f"  not compared (moved or only in {args.patched}): "
              f"{', '.join(res['not_compared'])}")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        tmp.replace(args.json)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
