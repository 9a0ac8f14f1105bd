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

from linkfix import layout
from linkfix.padding import pad


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
    meta = bytes(binary.get_section(layout.META_SECTION).content)
    n_backends = struct.unpack_from("<H", meta, 14)[0]
    rec = layout.site_struct(n_backends)
    sites_sec = binary.get_section(layout.SITES_SECTION)
    base = sites_sec.virtual_address
    n = len(sites_sec.content) // rec.size
    for i in range(n):
        rec_addr = base + i * rec.size
        fields = rec.unpack(bytes(binary.get_content_from_virtual_address(rec_addr, rec.size)))
        site, site_len = rec_addr + fields[0], fields[2]
        body_off, body_len, flags = fields[4 + 4 * k: 7 + 4 * k]
        if not flags & layout.FLAG_PRESENT:
            continue
        body_addr = rec_addr + 8 + 8 * k + body_off
        body = bytes(binary.get_content_from_virtual_address(body_addr, body_len))
        new = relocate(md, body, body_addr, site, mask)
        binary.patch_address(site, list(new + pad(site_len - len(new))))
    binary.write(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
