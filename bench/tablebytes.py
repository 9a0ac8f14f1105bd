"""Table bytes per site: what the linkfix tables cost in an image.

The sample kernel (both arches, gcc) and a 100,000-site synthetic image from
tests/tools/synthimage.py: the bytes of each linkfix section, per site, next to
Linux's `struct alt_instr` (14 bytes per alternative: an x86 kernel with n
alternatives per site spends 14 n bytes of records per site, plus the
replacement bytes).

    .venv/bin/python bench/tablebytes.py
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import BUILD, ROOT, BenchError, ensure_dir, run  # noqa: E402

from linkfix import layout  # noqa: E402
from linkfix.postlink import (
    image,
    tables,  # noqa: E402
)

LINUX_ALT_INSTR = 14
SECTIONS = (layout.SITES_SECTION, layout.BRANCHES_SECTION, layout.REPL_SECTION,
            layout.META_SECTION)


@dataclass
class ImageTables:
    name: str
    op_sites: int
    branch_sites: int
    alternatives: int  # per op site, generic included (the spec's backends + 1)
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def sites(self) -> int:
        return self.op_sites + self.branch_sites

    def per_site(self, names: tuple[str, ...] = SECTIONS) -> float:
        return sum(self.sizes.get(n, 0) for n in names) / max(1, self.sites)


def describe(name: str, path: str) -> ImageTables:
    img = image.load(path)
    t = tables.load(img)
    out = ImageTables(name, t.n_op_sites, t.n_branch_sites, len(t.meta.backends) + 1)
    for sec in SECTIONS:
        s = img.section(sec)
        out.sizes[sec] = s.size if s is not None else 0
    return out


def measure(quick: bool = False) -> list[ImageTables]:
    res = []
    for arch in ("x86_64", "i386"):
        out = ensure_dir(os.path.join(BUILD, f"tables_{arch}"))
        run(["make", "-s", "-C", os.path.join(ROOT, "sample_kernel"), f"ARCH={arch}",
             f"O={out}", "LINKFIX_TARGET="])
        res.append(describe(f"sample kernel {arch}", os.path.join(out, "vmlinux")))
    n = 10_000 if quick else 100_000
    path = os.path.join(ensure_dir(os.path.join(BUILD, "tables_synth")), f"synth_{n}.elf")
    sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
    import synthimage

    synthimage.build_fast(path, n, 64, seed=1)
    res.append(describe(f"synthetic, {n:,} sites", path))
    return res


def placements() -> list[str]:
    """Per op of the sample specs: site size, and where each backend's body runs with
    what it executes (the trade the site budget makes, from gen-stubs' manifest)."""
    import site_table

    lines = []
    for spec in site_table.SPECS:
        m = site_table.manifest(spec)
        backends = m["backends"]
        lines += [f"{m['arch']}: site bytes, then per backend where its body runs and the "
                  "instructions a patched site executes (out of line: the call, the body "
                  "and its `ret`)", "",
                  "| op | site bytes | " + " | ".join(backends) + " |",
                  "| --- | ---: |" + " --- |" * len(backends)]
        for op in m["ops"]:
            cells = []
            for b in backends:
                body = op["bodies"].get(b)
                cells.append("dispatch" if body is None else
                             f"{body['placement']}, {body['executed_insns']} insn")
            lines.append(f"| {op['name']} | {op['site_size']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def markdown(res: list[ImageTables]) -> list[str]:
    lines = ["| image | op sites | branch sites | records B/site | copies + header B/site | "
             "all tables B/site | Linux alt_instr records B/site |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in res:
        records = r.per_site((layout.SITES_SECTION, layout.BRANCHES_SECTION))
        rest = r.per_site((layout.REPL_SECTION, layout.META_SECTION))
        # Linux: one 14-byte record per alternative a site can take (each backend).
        linux = LINUX_ALT_INSTR * (r.alternatives - 1)
        lines.append(f"| {r.name} | {r.op_sites:,} | {r.branch_sites:,} | {records:.2f} | "
                     f"{rest:.2f} | {r.per_site():.2f} | {linux} |")
    lines += ["", f"An op site record is {layout.SITE_REC_SIZE} bytes and a branch site record "
              f"{layout.BRANCH_REC_SIZE}, whatever the "
              "number of backends; each op's alternatives are stored once "
              "(`.linkfix.repl`), so their cost per site falls as sites are added. Linux "
              "spends 14 bytes of `struct alt_instr` per alternative per site (12 in 6.1), "
              "plus each site's replacement bytes.", ""]
    return lines + placements()


def main() -> int:
    try:
        res = measure("--quick" in sys.argv)
    except OSError as exc:
        raise BenchError(str(exc)) from None
    print("\n".join(markdown(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
