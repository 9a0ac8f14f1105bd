"""The floor of any per-site loop in CPython: `pyloop_floor.py N`.

For N 40-byte records: one struct.unpack_from and one 5-byte slice
assignment per record, nothing else (no ELF, no checks, no I/O). Whatever a
post-link pass written as a Python loop over sites does, it costs at least
this much per site.
"""

from __future__ import annotations

import struct
import sys


def main() -> int:
    n = int(sys.argv[1])
    rec = struct.Struct("<iHBB" + "iBBH" * 4)
    table = bytearray(rec.size * n)
    out = bytearray(16 * n)
    body = b"\x0f\x1f\x44\x00\x00"
    for i in range(n):
        fields = rec.unpack_from(table, i * rec.size)
        at = 16 * i + fields[0]
        out[at:at + 5] = body
    return 0


if __name__ == "__main__":
    sys.exit(main())
