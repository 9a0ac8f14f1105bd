"""The naive post-link pass `linkfix patch` is compared with: lief all the way.

    naive_lief.py IMAGE OUT BACKEND_INDEX

lief.parse the image, walk the site records, and for every site read the
chosen body through lief, splice it (re-targeting the rel32 of a whole-body
call; other relocations are not done, so this is a lower bound of the work of
a complete lief-based pass) and padding with `Binary.patch_address`, then
`Binary.write`. Only the per-site lief calls and lief's writer are what is
measured against; the output is not meant to be used.
"""

from __future__ import annotations

import struct
import sys

import lief

from linkfix import layout
from linkfix.padding import pad


def main() -> int:
    src, dst, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    binary = lief.parse(src)
    if binary is None:
        print(f"naive_lief: {src}: lief cannot parse it", file=sys.stderr)
        return 2
    meta_sec = binary.get_section(layout.META_SECTION)
    sites_sec = binary.get_section(layout.SITES_SECTION)
    meta = bytes(meta_sec.content)
    n_backends = struct.unpack_from("<H", meta, 14)[0]
    rec = layout.site_struct(n_backends)
    table = bytes(sites_sec.content)
    base = sites_sec.virtual_address
    for i in range(len(table) // rec.size):
        fields = rec.unpack_from(table, i * rec.size)
        rec_addr = base + i * rec.size
        site = rec_addr + fields[0]
        site_len = fields[2]
        body_off, body_len, flags = fields[4 + 4 * k: 7 + 4 * k]
        if not flags & layout.FLAG_PRESENT:
            continue
        body_addr = rec_addr + 8 + 8 * k + body_off
        body = bytes(binary.get_content_from_virtual_address(body_addr, body_len))
        if flags & layout.FLAG_CALL:
            target = body_addr + 5 + struct.unpack_from("<i", body, 1)[0]
            body = b"\xe8" + struct.pack("<i", target - (site + 5))
        binary.patch_address(site, list(body + pad(site_len - body_len)))
    binary.write(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
