"""Check the ORC unwind table of a linked (and patched) x86-64 image at every linkfix site.

At each instruction a site holds, the ORC entry in force must have the stack as
deep as the site's own pushes make it, on top of what the entry at the site's
first byte says (a CFA on %rsp: offset + 8 per push/pushf not yet popped; a CFA
on %rbp: unchanged). That is what objtool would have produced had those bytes
been written there by hand.

    python tests/tools/orccheck.py vmlinux [-v]

prints one line per site that disagrees and a summary; exit status 1 if any does.
"""

from __future__ import annotations

import bisect
import struct
import sys
from dataclasses import dataclass

ORC_REG_SP = 5  # arch/x86/include/asm/orc_types.h
DEPTH = {"push": 8, "pushfq": 8, "pop": -8, "popfq": -8}


@dataclass(frozen=True)
class Problem:
    site: int
    insn: int
    text: str
    want: tuple[int, int]
    got: tuple[int, int]


def orc_table(img) -> tuple[list[int], list[tuple[int, int]]]:  # type: ignore[no-untyped-def]
    """Sorted ORC IPs and their (sp_reg, sp_offset)."""
    ips_sec, orc_sec = img.section(".orc_unwind_ip"), img.section(".orc_unwind")
    if ips_sec is None or orc_sec is None:
        raise ValueError("no .orc_unwind_ip/.orc_unwind sections")
    ips = img.read(ips_sec.addr, ips_sec.size)
    orc = img.read(orc_sec.addr, orc_sec.size)
    rows = []
    for i in range(ips_sec.size // 4):
        ip = ips_sec.addr + 4 * i + struct.unpack_from("<i", ips, 4 * i)[0]
        sp_offset, _bp, regs = struct.unpack_from("<hhH", orc, 6 * i)
        rows.append((ip, (regs & 0xF, sp_offset)))
    rows.sort()
    return [r[0] for r in rows], [r[1] for r in rows]


def check(path: str) -> tuple[int, int, list[Problem]]:
    """(sites, instructions checked, problems) for the image at `path`."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs

    from linkfix.postlink import image, tables

    img = image.load(path)
    ips, orc = orc_table(img)
    chk = tables.check_records(tables.load(img))
    cs = Cs(CS_ARCH_X86, CS_MODE_64)
    problems: list[Problem] = []
    n = 0
    for i, site in enumerate(chk.site_addrs):
        code = img.read(site, chk.shape_of(i).site_len)
        assert code is not None
        reg, base = orc[bisect.bisect_right(ips, site) - 1]
        depth = 0
        for insn in cs.disasm(code, site):
            got = orc[bisect.bisect_right(ips, insn.address) - 1]
            # A CFA on %rsp moves with every push; one on %rbp (a function with a
            # frame pointer) does not.
            want = (reg, base + depth) if reg == ORC_REG_SP else (reg, base)
            if got != want:
                problems.append(Problem(site, insn.address, f"{insn.mnemonic} {insn.op_str}",
                                        want, got))
            depth += DEPTH.get(insn.mnemonic, 0)
            n += 1
    return len(chk.site_addrs), n, problems


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    sites, n, problems = check(argv[0])
    for p in problems:
        print(f"site {p.site:#x}: {p.insn:#x} '{p.text}': ORC (reg, sp offset) {p.got}, "
              f"want {p.want}")
    print(f"{argv[0]}: {sites} sites, {n} instructions, {len(problems)} ORC differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
