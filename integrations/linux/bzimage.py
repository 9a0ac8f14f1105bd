#!/usr/bin/env python3
"""Take the kernel out of an x86 bzImage: the ELF the decompressor loads.

    bzimage.py BZIMAGE OUT.elf [--vmlinux VMLINUX]

The boot protocol's setup header (Documentation/x86/boot.rst) gives the payload:
`setup_sects` at 0x1f1 (0 means 4), `payload_offset` and `payload_length` at 0x248,
counted from the protected-mode code, which starts (setup_sects + 1) * 512 bytes into
the file. On x86 the payload is `vmlinux.bin` (vmlinux with `objcopy -R .comment -S`),
with vmlinux.relocs after it when the kernel is relocatable, compressed with the
config's KERNEL_* method; gzip and xz are read here (the kernel's 4-byte size
trailer after the stream is ignored). With --vmlinux, every allocated section of the
payload must hold exactly the bytes of the same section in VMLINUX: what boots is
what `linkfix patch` wrote. Standard library only; exit 0 ok, 1 mismatch, 2 error.
"""

from __future__ import annotations

import argparse
import lzma
import struct
import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import orc  # noqa: E402

SHT_NOBITS = 8
SHF_ALLOC = 0x2


class PayloadError(Exception):
    pass


def payload(image: bytes, path: str) -> bytes:
    """The decompressed payload of a bzImage's bytes."""
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise PayloadError(f"{path}: not a bzImage (no HdrS setup header)")
    setup_sects = image[0x1F1] or 4
    start = (setup_sects + 1) * 512
    off, length = struct.unpack_from("<II", image, 0x248)
    raw = image[start + off:start + off + length]
    if len(raw) != length or not length:
        raise PayloadError(f"{path}: payload_offset/payload_length point past the file")
    if raw[:6] == b"\xfd7zXZ\x00":
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elif raw[:2] == b"\x1f\x8b":
        dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
    else:
        raise PayloadError(f"{path}: payload compressed as {raw[:4].hex()}: only gzip "
                           f"and xz are read (CONFIG_KERNEL_GZIP, CONFIG_KERNEL_XZ)")
    try:
        out = dec.decompress(raw)
    except (lzma.LZMAError, zlib.error) as exc:
        raise PayloadError(f"{path}: payload does not decompress: {exc}") from None
    if not out.startswith(b"\x7fELF"):
        raise PayloadError(f"{path}: the decompressed payload is not an ELF file")
    return out


def compare_sections(elf_payload: orc.Elf, vmlinux: orc.Elf) -> list[str]:
    """Allocated sections whose bytes, address or presence differ (by name)."""
    out = []
    for s in elf_payload.sections:
        if not s.flags & SHF_ALLOC or not s.size:
            continue
        other = vmlinux.by_name.get(s.name)
        if other is None:
            out.append(f"{s.name}: not in vmlinux")
        elif (other.addr, other.size) != (s.addr, s.size):
            out.append(f"{s.name}: at {s.addr:#x}+{s.size:#x}, in vmlinux at "
                       f"{other.addr:#x}+{other.size:#x}")
        elif s.type != SHT_NOBITS and elf_payload.contents(s) != vmlinux.contents(other):
            out.append(f"{s.name}: bytes differ from vmlinux")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bzimage", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--vmlinux", type=Path)
    args = p.parse_args(argv)
    try:
        data = payload(args.bzimage.read_bytes(), str(args.bzimage))
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(args.out)
        if args.vmlinux is None:
            return 0
        diffs = compare_sections(orc.Elf(data, str(args.out)),
                                 orc.Elf.from_file(args.vmlinux))
    except (PayloadError, orc.OrcError, OSError) as exc:
        print(f"bzimage: error: {exc}", file=sys.stderr)
        return 2
    for d in diffs:
        print(f"bzimage: {args.bzimage}: {d}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
