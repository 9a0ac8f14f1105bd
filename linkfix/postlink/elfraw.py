"""The ELF structures linkfix reads, decoded from the raw bytes, and the checks on them.

Plain `struct` decoding of the ELF header, the program and section headers and
the symbol tables, with every check that makes a hostile file a one-line
refusal. Both readers run these checks first (linkfix/postlink/elflief.py hands lief
only a file that passed them): a check here is the same refusal, with the same
message, whichever reader is selected. Some of them exist because lief reads
the structure differently from the ELF specification's plain reading (it
ignores e_phentsize/e_shentsize, skips a program header table at offset 0,
reads at most 10,000 program headers, reads a name past the end of its string
table, takes no symbols from a .symtab whose sh_link is 0): such a file is
refused by both, rather than read two ways.
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from typing import Protocol

from linkfix.errors import BadInput

EM_386 = 3
EM_X86_64 = 62
ET_EXEC = 2
ET_DYN = 3
PT_LOAD = 1
PT_DYNAMIC = 2
PF_X = 1
SHT_SYMTAB = 2
SHT_STRTAB = 3
SHT_RELA = 4
SHT_NOBITS = 8
SHT_REL = 9
SHT_DYNSYM = 11
SHT_DYNAMIC_SEC = 6
SHT_RELR = 19
SHF_ALLOC = 0x2

CLASS_BITS = {1: 32, 2: 64}
MACHINE_BITS = {EM_386: 32, EM_X86_64: 64}
# lief reads at most this many program headers (LIEF::ELF::Parser::NB_MAX_SEGMENTS).
MAX_PHNUM = 10000

Data = bytes | mmap.mmap


@dataclass(frozen=True)
class Segment:
    vaddr: int
    memsz: int
    offset: int
    filesz: int
    flags: int

    @property
    def executable(self) -> bool:
        return bool(self.flags & PF_X)


@dataclass(frozen=True)
class Section:
    index: int
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    entsize: int


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int
    size: int
    type: int  # STT_*
    shndx: int


@dataclass(frozen=True)
class Header:
    """The ELF header fields linkfix uses."""

    bits: int
    etype: int
    machine: int
    entry: int
    phoff: int
    phentsize: int
    phnum: int
    shoff: int
    shentsize: int
    shnum: int
    shstrndx: int

    @property
    def ehsize(self) -> int:
        return 64 if self.bits == 64 else 52


# A program header as the readers hand it on: (p_type, p_flags, p_offset, p_vaddr,
# p_filesz, p_memsz).
RawSegment = tuple[int, int, int, int, int, int]


def phdr_struct(bits: int) -> struct.Struct:
    # type flags offset vaddr paddr filesz memsz align / type offset vaddr paddr filesz memsz
    # flags align
    return struct.Struct("<IIQQQQQQ" if bits == 64 else "<IIIIIIII")


def shdr_struct(bits: int) -> struct.Struct:
    return struct.Struct("<IIQQQQIIQQ" if bits == 64 else "<IIIIIIIIII")


def sym_struct(bits: int) -> struct.Struct:
    return struct.Struct("<IBBHQQ" if bits == 64 else "<IIIBBH")


def check_range(path: str, data: Data, what: str, off: int, size: int) -> None:
    if off < 0 or size < 0 or off + size > len(data):
        raise BadInput(path, f"{what} lies outside the file (truncated image?)")


def cstring(table: bytes, at: int) -> str:
    end = table.find(b"\0", at)
    return table[at:end if end >= 0 else None].decode("utf-8", "replace")


# -- headers -----------------------------------------------------------------------------


def read_header(path: str, data: Data) -> Header:
    if len(data) < 52 or data[:4] != b"\x7fELF":
        raise BadInput(path, "not an ELF file")
    bits = CLASS_BITS.get(data[4])
    if bits is None:
        raise BadInput(path, f"unknown ELF class {data[4]}")
    if data[5] != 1:
        raise BadInput(path, "not a little-endian ELF file")
    ehsize = 64 if bits == 64 else 52
    if len(data) < ehsize:
        raise BadInput(path, f"ELF header truncated ({len(data)} bytes, ELF{bits} needs "
                             f"{ehsize})")
    fmt = "<HHIQQQIHHHHHH" if bits == 64 else "<HHIIIIIHHHHHH"
    (etype, machine, _ver, entry, phoff, shoff, _flags, _ehsize, phentsize, phnum,
     shentsize, shnum, shstrndx) = struct.unpack_from(fmt, data, 16)
    if machine not in MACHINE_BITS:
        raise BadInput(path, f"unsupported e_machine {machine} (x86-64 or i386 only)")
    if MACHINE_BITS[machine] != bits:
        raise BadInput(path, f"ELF{bits} file with e_machine {machine}")
    if etype not in (ET_EXEC, ET_DYN):
        raise BadInput(path, f"e_type {etype}: a linked executable (ET_EXEC or ET_DYN) is "
                             "required")
    return Header(bits, etype, machine, entry, phoff, phentsize, phnum, shoff, shentsize,
                  shnum, shstrndx)


def read_segments(path: str, data: Data, hdr: Header) -> tuple[RawSegment, ...]:
    fmt = phdr_struct(hdr.bits)
    num, entsize, phoff = hdr.phnum, hdr.phentsize, hdr.phoff
    if num and entsize < fmt.size:
        raise BadInput(path, f"e_phentsize {entsize} too small")
    if num and entsize != fmt.size:
        raise BadInput(path, f"e_phentsize {entsize}: ELF{hdr.bits} program headers are "
                             f"{fmt.size} bytes")
    if num and not phoff:
        raise BadInput(path, f"e_phoff is 0 with {num} program headers")
    if num > MAX_PHNUM:
        raise BadInput(path, f"e_phnum {num}: more than {MAX_PHNUM} program headers")
    check_range(path, data, "program header table", phoff, entsize * num)
    out = []
    for i in range(num):
        f = fmt.unpack_from(data, phoff + i * entsize)
        if hdr.bits == 64:
            ptype, flags, off, vaddr, _pa, filesz, memsz, _al = f
        else:
            ptype, off, vaddr, _pa, filesz, memsz, flags, _al = f
        if ptype == PT_LOAD:
            check_range(path, data, "PT_LOAD segment", off, filesz)
        elif filesz:  # (lief would cut such a segment's p_filesz to the file's size)
            check_range(path, data, f"segment {i} (p_type {ptype:#x})", off, filesz)
        out.append((ptype, flags, off, vaddr, filesz, memsz))
    return tuple(out)


def has_name_table(hdr: Header) -> bool:
    """Whether e_shstrndx names a section (0 is SHN_UNDEF: the sections have no names)."""
    return 0 < hdr.shstrndx < hdr.shnum


def read_sections(path: str, data: Data, hdr: Header) -> tuple[Section, ...]:
    if not hdr.shoff or not hdr.shnum:
        return ()
    fmt = shdr_struct(hdr.bits)
    entsize, num = hdr.shentsize, hdr.shnum
    if entsize < fmt.size:
        raise BadInput(path, f"e_shentsize {entsize} too small")
    if entsize != fmt.size:
        raise BadInput(path, f"e_shentsize {entsize}: ELF{hdr.bits} section headers are "
                             f"{fmt.size} bytes")
    check_range(path, data, "section header table", hdr.shoff, entsize * num)
    raw = [fmt.unpack_from(data, hdr.shoff + i * entsize) for i in range(num)]
    names = b""
    if has_name_table(hdr):
        _n, _t, _f, _a, off, size, *_ = raw[hdr.shstrndx]
        check_range(path, data, "section name table", off, size)
        names = bytes(data[off:off + size])
        if names[-1:] != b"\0":
            raise BadInput(path, f"section name table ({size} bytes) does not end with a "
                                 "NUL byte")
        for i, ent in enumerate(raw):
            if ent[0] >= size:
                raise BadInput(path, f"section #{i}: sh_name {ent[0]} lies outside the "
                                     f"section name table ({size} bytes)")
    out = []
    for i, (name, typ, flags, addr, off, size, link, info, _al, ent) in enumerate(raw):
        label = cstring(names, name) if names else ""
        if typ != SHT_NOBITS and i:
            check_range(path, data, f"section {label}", off, size)
        out.append(Section(i, label, typ, flags, addr, off, size, link, info, ent))
    return tuple(out)


# -- symbols -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SymbolTable:
    """The symbol table linkfix uses (.symtab, else .dynsym) and its string table.

    `symbol_table` checks what any reader relies on: the string table inside the file and
    NUL-terminated, every st_name inside it. The symbols are decoded from the raw
    bytes here (the hand reader) or by lief and compared with these (linkfix/postlink/elflief.py).
    """

    path: str
    data: Data
    bits: int
    sec: Section
    strs: Section
    strtab: bytes

    @property
    def count(self) -> int:
        return self.sec.size // sym_struct(self.bits).size

    def entries(self) -> bytes:
        return bytes(self.data[self.sec.offset:self.sec.offset + self.count
                               * sym_struct(self.bits).size])

    def symbols(self) -> list[Symbol]:
        out = []
        for ent in sym_struct(self.bits).iter_unpack(self.entries()):
            if self.bits == 64:
                name, info, _other, shndx, value, size = ent
            else:
                name, value, size, info, _other, shndx = ent
            out.append(Symbol(cstring(self.strtab, name), value, size, info & 0xF, shndx))
        return out

    def name_offsets(self, name: str) -> set[int]:
        """Every st_name at which the string table holds exactly `name`."""
        key = name.encode() + b"\0"
        offsets = set()
        at = self.strtab.find(key)
        while at >= 0:
            offsets.add(at)
            at = self.strtab.find(key, at + 1)
        return offsets

    def value(self, name: str) -> int | None:
        """The value of the first defined symbol `name` (no full decode: the name's
        string offsets are found in the string table, then matched against the
        st_name column)."""
        offsets = self.name_offsets(name)
        n, ent = self.count, sym_struct(self.bits).size
        if not offsets or n == 0:
            return None
        column = self._names
        fmt = sym_struct(self.bits)
        hits = []
        for off in offsets:  # each position of the name, by C-speed list.index
            j = -1
            while True:
                try:
                    j = column.index(off, j + 1)
                except ValueError:
                    break
                hits.append(j)
        for j in sorted(hits):
            f = fmt.unpack_from(self.data, self.sec.offset + j * ent)
            value, shndx = (f[4], f[3]) if self.bits == 64 else (f[1], f[5])
            if shndx != 0:
                return value
        return None

    @functools.cached_property
    def _names(self) -> list[int]:
        """Every symbol's st_name, in table order (read once: the tables need 8 names)."""
        n, ent = self.count, sym_struct(self.bits).size
        raw = memoryview(self.data[self.sec.offset:self.sec.offset + n * ent]).cast("I")
        return raw[::ent // 4].tolist()


def symbol_section(sections: tuple[Section, ...]) -> Section | None:
    """.symtab if present, else .dynsym (the first section of the type)."""
    return next((s for typ in (SHT_SYMTAB, SHT_DYNSYM) for s in sections if s.type == typ),
                None)


def symbol_table(path: str, data: Data, bits: int,
                 sections: tuple[Section, ...]) -> SymbolTable | None:
    """The checked symbol table, or None when the image has neither table."""
    sec = symbol_section(sections)
    if sec is None:
        return None
    what = f"symbol table {sec.name or '#' + str(sec.index)}"
    check_range(path, data, f"section {sec.name}", sec.offset, sec.size)
    if not 0 < sec.link < len(sections):
        raise BadInput(path, f"{what}: sh_link {sec.link} is not a section")
    strs = sections[sec.link]
    check_range(path, data, f"section {strs.name}", strs.offset, strs.size)
    table = SymbolTable(path, data, bits, sec, strs,
                        bytes(data[strs.offset:strs.offset + strs.size]))
    if table.count:
        if table.strtab[-1:] != b"\0":
            raise BadInput(path, f"{what}: its string table {strs.name or '#' + str(strs.index)} "
                                 "does not end with a NUL byte")
        ent = sym_struct(bits).size
        names = memoryview(table.entries()).cast("I")[::ent // 4]
        if max(names) >= len(table.strtab):
            raise BadInput(path, f"{what}: a symbol name lies outside its string table "
                                 f"{strs.name or '#' + str(strs.index)}")
    return table


# -- the hand reader ---------------------------------------------------------------------


class SymbolSource(Protocol):
    def all(self) -> list[Symbol]: ...

    def value(self, name: str) -> int | None: ...


@dataclass(frozen=True)
class RawSymbols:
    """Symbols decoded from the raw bytes."""

    table: SymbolTable | None

    def all(self) -> list[Symbol]:
        return self.table.symbols() if self.table is not None else []

    def value(self, name: str) -> int | None:
        return self.table.value(name) if self.table is not None else None


@dataclass(frozen=True)
class ElfRead:
    """What a reader hands linkfix.image.Image: the checked ELF structures."""

    reader: str
    header: Header
    segments: tuple[RawSegment, ...]
    sections: tuple[Section, ...]
    symtab: SymbolTable | None
    symbols: SymbolSource


def read_raw(path: str, data: Data) -> ElfRead:
    """The hand reader: every structure decoded from the raw bytes, every check run."""
    hdr = read_header(path, data)
    segments = read_segments(path, data, hdr)
    sections = read_sections(path, data, hdr)
    table = symbol_table(path, data, hdr.bits, sections)
    return ElfRead("hand", hdr, segments, sections, table, RawSymbols(table))
