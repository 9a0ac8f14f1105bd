"""The naive post-link pass `linkfix patch` is compared with: lief all the way.

    naive_lief.py IMAGE OUT BACKEND_INDEX

lief.parse the image, walk the site records, and for every site read the
chosen stored copy through lief, splice it (re-targeting the rel32 of a call
copy and a branch site's jump; other relocations are not done, so this is a
lower bound of the work of a complete lief-based pass) with
`Binary.patch_address`, then `Binary.write`. Only the per-site lief calls and
lief's writer are what is measured against; the output is not meant to be used.
"""

from __future__ import annotations

import struct
import sys

import lief

from linkfix import layout


def _entries(meta: bytes, meta_addr: int) -> tuple[int, int, dict[tuple[int, int], tuple]]:
    """n_real_ops, n_alts, and (op, k) -> (copy address, len, flags) from the header."""
    n_ops, n_backends = struct.unpack_from("<HH", meta, 12)
    names_size = struct.unpack_from("<H", meta, 18)[0]
    at = 28 + n_ops + names_size
    at += -at % 4
    table = at + layout.BOUNDS.size
    out = {}
    for op in range(n_ops):
        for k in range(n_backends + 1):
            e = table + layout.BODY.size * (op * (n_backends + 1) + k)
            rel, _crc, length, flags = struct.unpack_from("<iIBB", meta, e)
            out[(op, k)] = (meta_addr + e + rel if rel else 0, length, flags)
    return n_ops - n_backends, n_backends + 1, out


def main() -> int:
    src, dst, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    binary = lief.parse(src)
    if binary is None:
        print(f"naive_lief: {src}: lief cannot parse it", file=sys.stderr)
        return 2
    meta_sec = binary.get_section(layout.META_SECTION)
    sites_sec = binary.get_section(layout.SITES_SECTION)
    branches_sec = binary.get_section(layout.BRANCHES_SECTION)
    meta = bytes(meta_sec.content)
    _n_real, _n_alts, entries = _entries(meta, meta_sec.virtual_address)
    table = bytes(sites_sec.content)
    base = sites_sec.virtual_address
    for i in range(len(table) // layout.SITE.size):
        rel, op, site_len, _check = layout.SITE.unpack_from(table, i * layout.SITE.size)
        site = base + i * layout.SITE.size + rel
        addr, length, flags = entries[(op, k)]
        if not flags & layout.FLAG_PRESENT:
            addr, length, flags = entries[(op, 0)]
        body = bytes(binary.get_content_from_virtual_address(addr, length))
        if flags & (layout.FLAG_CALL | layout.FLAG_OOL):
            target = addr + 5 + struct.unpack_from("<i", body, 1)[0]
            body = b"\xe8" + struct.pack("<i", target - (site + 5)) + body[5:]
        binary.patch_address(site, list(body[:site_len]))
    if branches_sec is not None:
        btable = bytes(branches_sec.content)
        bbase = branches_sec.virtual_address
        for i in range(len(btable) // layout.BRANCH.size):
            at = bbase + i * layout.BRANCH.size
            rs, rg, ry, op, _b, _kind, _g2, _y2 = layout.BRANCH.unpack_from(
                btable, i * layout.BRANCH.size)
            site = at + rs
            addr, length, flags = entries[(op, k)]
            if flags & layout.FLAG_JMP:
                target = at + 4 + rg if k == 0 else at + 8 + ry
                body = b"\xe9" + struct.pack("<i", target - (site + 5))
            else:
                body = bytes(binary.get_content_from_virtual_address(addr, 5))
            binary.patch_address(site, list(body))
    binary.write(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
