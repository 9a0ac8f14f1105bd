"""Relocation entries, the dynamic table and RELR, decoded from the raw bytes.

Both readers use this: lief is not asked for relocations (a kernel has millions,
and patching needs each entry's file position, which lief does not give).
Load-time relocation tables are found at their addresses, through the PT_LOAD
segments of linkfix.image.Image.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from linkfix.errors import BadInput
from linkfix.postlink.elfraw import (
    PT_DYNAMIC,
    SHT_DYNAMIC_SEC,
    Data,
    RawSegment,
    Section,
    check_range,
)

# Dynamic tags naming load-time relocation tables.
DT_NULL = 0
DT_RELA, DT_RELASZ, DT_REL, DT_RELSZ = 7, 8, 17, 18
DT_JMPREL, DT_PLTRELSZ, DT_PLTREL = 23, 2, 20
DT_RELR, DT_RELRSZ = 36, 35


@dataclass(frozen=True)
class Reloc:
    """One relocation entry; `slot` is its byte position in the file."""

    slot: int
    offset: int
    type: int
    sym: int
    addend: int  # 0 for REL entries (the addend lives in the relocated field)


class AddressMap(Protocol):
    path: str
    data: Data
    bits: int
    segments: tuple[RawSegment, ...]
    sections: tuple[Section, ...]

    def offset_of(self, vaddr: int, size: int = 1) -> int | None: ...


def reloc_struct(bits: int, rela: bool) -> struct.Struct:
    if bits == 64:
        return struct.Struct("<QQq" if rela else "<QQ")
    return struct.Struct("<IIi" if rela else "<II")


def encode_info(bits: int, sym: int, typ: int) -> int:
    return (sym << 32 | typ) if bits == 64 else (sym << 8 | typ)


def reloc_entries(path: str, data: Data, bits: int, off: int, size: int, rela: bool,
                  lo: int = 0, hi: int = 1 << 64) -> list[Reloc]:
    """The entries of the table at file offset `off` whose r_offset lies in [lo, hi)."""
    fmt = reloc_struct(bits, rela)
    check_range(path, data, "relocation table", off, size)
    raw = data[off:off + size - size % fmt.size]
    shift, mask = (32, 0xFFFFFFFF) if bits == 64 else (8, 0xFF)
    out = []
    for i, ent in enumerate(fmt.iter_unpack(raw)):
        if lo <= ent[0] < hi:
            addend = ent[2] if rela else 0
            out.append(Reloc(off + i * fmt.size, ent[0], ent[1] & mask, ent[1] >> shift, addend))
    return out


def dynamic_tags(img: AddressMap) -> dict[int, int]:
    """The first value of every tag in PT_DYNAMIC (empty without one)."""
    tags: dict[int, int] = {}
    for ptype, _fl, off, va, filesz, _m in img.segments:
        if ptype != PT_DYNAMIC:
            continue
        fmt = struct.Struct("<qQ" if img.bits == 64 else "<iI")
        check_range(img.path, img.data, "PT_DYNAMIC", off, filesz)
        # The loader reads the dynamic table at its address: a p_offset that
        # disagrees would hide load-time relocations from this reader.
        mapped = img.offset_of(va, max(filesz, 1))
        if mapped != off:
            where = f"file offset {mapped:#x}" if mapped is not None else "no file bytes"
            raise BadInput(img.path, f"PT_DYNAMIC: p_offset {off:#x} disagrees with its "
                                     f"address {va:#x} ({where})")
        dyn = next((sec for sec in img.sections if sec.type == SHT_DYNAMIC_SEC), None)
        if dyn is not None and (dyn.addr, dyn.offset) != (va, off):
            raise BadInput(img.path, f"PT_DYNAMIC at {va:#x} (file offset {off:#x}) "
                                     f"disagrees with section {dyn.name}")
        for i in range(filesz // fmt.size):
            tag, val = fmt.unpack_from(img.data, off + i * fmt.size)
            if tag == DT_NULL:
                break
            tags.setdefault(tag, val)
    return tags


def dynamic_reloc_offsets(img: AddressMap, tags: dict[int, int]) -> list[int]:
    """Addresses the tables the dynamic tags name relocate (RELA, REL, JMPREL, RELR)."""
    offsets: list[int] = []
    tables = [(DT_RELA, DT_RELASZ, True), (DT_REL, DT_RELSZ, False)]
    if DT_JMPREL in tags:
        tables.append((DT_JMPREL, DT_PLTRELSZ, tags.get(DT_PLTREL) == DT_RELA))
    for addr_tag, size_tag, rela in tables:
        if addr_tag in tags and tags.get(size_tag):
            off = img.offset_of(tags[addr_tag], tags[size_tag])
            if off is None:
                raise BadInput(img.path, "dynamic relocation table outside PT_LOAD")
            offsets += [r.offset for r in reloc_entries(img.path, img.data, img.bits, off,
                                                        tags[size_tag], rela)
                        if r.type != 0]
    if DT_RELR in tags and tags.get(DT_RELRSZ):
        offsets += relr_offsets(img, tags[DT_RELR], tags[DT_RELRSZ])
    return offsets


def relr_offsets(img: AddressMap, addr: int, size: int) -> list[int]:
    """The addresses a DT_RELR table (at `addr`, `size` bytes) relocates."""
    off = img.offset_of(addr, size)
    if off is None:
        raise BadInput(img.path, "DT_RELR table outside PT_LOAD")
    word = img.bits // 8
    fmt = "<Q" if word == 8 else "<I"
    out: list[int] = []
    where = 0
    for i in range(size // word):
        (ent,) = struct.unpack_from(fmt, img.data, off + i * word)
        if ent & 1 == 0:
            out.append(ent)
            where = ent + word
        else:
            bits = ent >> 1
            k = 0
            while bits:
                if bits & 1:
                    out.append(where + k * word)
                bits >>= 1
                k += 1
            where += (img.bits - 1) * word
    return out
