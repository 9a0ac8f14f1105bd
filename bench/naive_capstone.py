"""A complete post-link pass written the straightforward way: lief and capstone per site.

    naive_capstone.py IMAGE OUT BACKEND_INDEX

It does the work `linkfix patch` does for each site, with no batching: read the
record and the chosen body through lief, disassemble the body with capstone at
its own address, re-target every relative branch and RIP-relative operand that
leaves the body, pad, `Binary.patch_address`, and finally `Binary.write`. It
does not validate the records first, so it is still a little less work than
`linkfix patch`.
"""

from __future__ import annotations

import struct
import sys

import capstone
import lief
from capstone import x86_const
from naive_lief import _entries

from linkfix import layout


def relocate(md: capstone.Cs, body: bytes, body_addr: int, site: int, mask: int) -> bytes:
    """The body re-targeted for `site`; a rel8 branch that no longer reaches is widened."""
    out = bytearray()
    end = body_addr + len(body)
    for insn in md.disasm(body, body_addr):
        raw = bytearray(insn.bytes)
        moved = site + len(out)  # where this instruction lands
        if insn.group(capstone.CS_GRP_BRANCH_RELATIVE):
            target = insn.operands[0].imm & mask
            if not body_addr <= target < end:
                rel = target - (moved + insn.size)
                if insn.imm_size == 1 and not -128 <= rel <= 127:
                    # jmp rel8 -> e9 rel32; jcc rel8 -> 0f 8x rel32
                    raw = (bytearray(b"\xe9\0\0\0\0") if raw[0] == 0xEB
                           else bytearray((0x0F, 0x80 | (raw[0] & 0x0F), 0, 0, 0, 0)))
                    struct.pack_into("<i", raw, len(raw) - 4, target - (moved + len(raw)))
                else:
                    struct.pack_into("<b" if insn.imm_size == 1 else "<i", raw,
                                     insn.imm_offset, rel)
            out += raw
            continue
        for op in insn.operands:
            if op.type == x86_const.X86_OP_MEM and op.mem.base == x86_const.X86_REG_RIP:
                target = insn.address + insn.size + op.mem.disp
                struct.pack_into("<i", raw, insn.disp_offset, target - (moved + insn.size))
        out += raw
    return bytes(out)


def main() -> int:
    src, dst, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    binary = lief.parse(src)
    if binary is None:
        print(f"naive_capstone: {src}: lief cannot parse it", file=sys.stderr)
        return 2
    bits64 = binary.header.identity_class == lief.ELF.Header.CLASS.ELF64
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if bits64 else capstone.CS_MODE_32)
    md.detail = True
    mask = (1 << (64 if bits64 else 32)) - 1
    meta_sec = binary.get_section(layout.META_SECTION)
    _n_real, _n_alts, entries = _entries(bytes(meta_sec.content), meta_sec.virtual_address)
    sites_sec = binary.get_section(layout.SITES_SECTION)
    base = sites_sec.virtual_address
    size = layout.SITE.size
    for i in range(len(sites_sec.content) // size):
        rec_addr = base + i * size
        rel, op, site_len, _check = layout.SITE.unpack(
            bytes(binary.get_content_from_virtual_address(rec_addr, size)))
        site = rec_addr + rel
        addr, length, flags = entries[(op, k)]
        if not flags & layout.FLAG_PRESENT:
            addr, length, flags = entries[(op, 0)]
        body = bytes(binary.get_content_from_virtual_address(addr, length))
        new = relocate(md, body, addr, site, mask)
        binary.patch_address(site, list(new[:site_len]))
    branches_sec = binary.get_section(layout.BRANCHES_SECTION)
    if branches_sec is not None:
        bbase = branches_sec.virtual_address
        bsize = layout.BRANCH.size
        for i in range(len(branches_sec.content) // bsize):
            at = bbase + i * bsize
            rs, rg, ry, op, _b, _kind, _g2, _y2 = layout.BRANCH.unpack(
                bytes(binary.get_content_from_virtual_address(at, bsize)))
            site = at + rs
            addr, length, flags = entries[(op, k)]
            if flags & layout.FLAG_JMP:
                target = at + 4 + rg if k == 0 else at + 8 + ry
                new = b"\xe9" + struct.pack("<i", target - (site + 5))
            else:
                new = bytes(binary.get_content_from_virtual_address(addr, 5))
            binary.patch_address(site, list(new))
    binary.write(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
