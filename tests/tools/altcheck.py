"""Read back what the linux profile puts in a relocatable object, from its bytes and
relocations (pyelftools, not linkfix's reader): site records, `struct alt_instr`
entries and their replacements, and the ANNOTATE_NOENDBR list."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

R_X86_64_64, R_X86_64_PC32, R_X86_64_PLT32 = 1, 2, 4
Place = tuple[str, int]  # (section name, offset)


@dataclass(frozen=True)
class Reloc:
    offset: int  # in the section holding it
    type: int
    symbol: str  # the symbol's name, or its section's for a section symbol
    place: Place | None  # where a defined symbol + addend points
    addend: int


@dataclass(frozen=True)
class AltInstr:
    site: Place
    repl: Place
    cpuid: int
    instrlen: int
    replacementlen: int
    copy: bytes  # the replacement's bytes, relocated fields as assembled (zero)
    relocs: tuple[Reloc, ...]  # in the replacement, offsets relative to its start


@dataclass
class Objects:
    sites: dict[Place, tuple[int, int]] = field(default_factory=dict)  # -> (op, site_len)
    branches: dict[Place, tuple[Place, Place, int]] = field(default_factory=dict)
    alts: list[AltInstr] = field(default_factory=list)  # in section order
    noendbr: set[Place] = field(default_factory=set)
    text: dict[str, bytes] = field(default_factory=dict)  # executable sections' bytes


def _relocs(elf: ELFFile, name: str) -> list[Reloc]:
    sec = elf.get_section_by_name(f".rela{name}")
    if not isinstance(sec, RelocationSection):
        return []
    symtab = elf.get_section(sec["sh_link"])
    out = []
    for r in sec.iter_relocations():
        sym = symtab.get_symbol(r["r_info_sym"])
        shndx = sym["st_shndx"]
        place = None
        sname = sym.name
        if isinstance(shndx, int) and shndx:
            target = elf.get_section(shndx)
            sname = sname or target.name
            place = (target.name, sym["st_value"] + r["r_addend"])
        out.append(Reloc(r["r_offset"], r["r_info_type"], sname, place, r["r_addend"]))
    return out


def _at(relocs: list[Reloc], offset: int) -> Reloc:
    return next(r for r in relocs if r.offset == offset)


def read(path: Path) -> Objects:
    out = Objects()
    with path.open("rb") as f:
        elf = ELFFile(f)
        for sec in elf.iter_sections():
            if sec["sh_flags"] & 4 and sec["sh_type"] == "SHT_PROGBITS":  # SHF_EXECINSTR
                out.text[sec.name] = sec.data()

        def data(name: str) -> bytes:
            sec = elf.get_section_by_name(name)
            return sec.data() if sec is not None else b""

        sites, rs = data(".linkfix.sites"), _relocs(elf, ".linkfix.sites")
        for at in range(0, len(sites), 8):
            op, length = struct.unpack_from("<HB", sites, at + 4)
            place = _at(rs, at).place
            assert place is not None
            out.sites[place] = (op, length)
        br, rb = data(".linkfix.branches"), _relocs(elf, ".linkfix.branches")
        for at in range(0, len(br), 24):
            site, gen, yes = (_at(rb, at + i).place for i in (0, 4, 8))
            assert site is not None and gen is not None and yes is not None
            out.branches[site] = (gen, yes, struct.unpack_from("<H", br, at + 12)[0])
        alt, ra = data(".altinstructions"), _relocs(elf, ".altinstructions")
        repl, rr = data(".altinstr_replacement"), _relocs(elf, ".altinstr_replacement")
        assert len(alt) % 12 == 0
        for at in range(0, len(alt), 12):
            site, new = _at(ra, at).place, _at(ra, at + 4).place
            assert site is not None and new is not None
            assert new[0] == ".altinstr_replacement"
            cpuid, ilen, rlen = struct.unpack_from("<HBB", alt, at + 8)
            lo = new[1]
            mine = tuple(Reloc(r.offset - lo, r.type, r.symbol, r.place, r.addend)
                         for r in rr if lo <= r.offset < lo + rlen)
            out.alts.append(AltInstr(site, new, cpuid, ilen, rlen, repl[lo:lo + rlen], mine))
        for r in _relocs(elf, ".discard.noendbr"):
            assert r.type == R_X86_64_64 and r.place is not None
            out.noendbr.add(r.place)
    return out


def masked(code: bytes, fields: list[tuple[int, int]]) -> bytes:
    out = bytearray(code)
    for pos, size in fields:
        out[pos:pos + size] = bytes(size)
    return bytes(out)


def nop_runs(code: bytes) -> list[int]:
    """Offsets where a one-byte NOP (0x90) follows another, decoding from the start."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs

    prev, runs = False, []
    for insn in Cs(CS_ARCH_X86, CS_MODE_64).disasm(code, 0):
        nop = insn.size == 1 and code[insn.address] == 0x90
        if nop and prev:
            runs.append(insn.address - 1)
        prev = nop
    return runs
