"""Read an ELF image with lief: its header, program and section headers and symbols.

lief is imported here, when an image is first read (never for `--help` or
gen-stubs). Before lief sees the bytes they pass every check of linkfix/postlink/elfraw.py
(the header, every table inside the file, entry sizes and counts, string tables
NUL-terminated and every name inside its table): a hostile file is linkfix's
one-line refusal, not lief's. lief parses only the headers and the one symbol
table linkfix uses (no relocations, notes, versions or overlay; relocations and
the dynamic table are read by linkfix/postlink/elfrelocs.py).

Every fact lief gives is compared with the raw bytes, and a disagreement is a
refusal: lief's answer is used only where both readings agree. Where lief
cannot represent a value (a processor-specific segment or i386 section type) the
raw value is taken; where e_shstrndx names no section, the sections have no
names (lief would read them from section 0).
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

from linkfix.errors import BadInput
from linkfix.postlink.elfraw import (
    SHT_SYMTAB,
    ElfRead,
    Header,
    RawSegment,
    Section,
    Symbol,
    SymbolTable,
    has_name_table,
    read_raw,
    sym_struct,
)

PT_LOPROC, PT_HIPROC = 0x70000000, 0x7FFFFFFF
SHT_LOPROC, SHT_HIPROC = 0x70000000, 0x7FFFFFFF
_LIEF_UNKNOWN_SEGMENT = (1 << 64) - 1  # LIEF::ELF::Segment::TYPE::UNKNOWN
_TYPE_MASK = 0xFFFFFFFF  # lief adds an architecture id above bit 32 to some types


@cache
def _lief() -> ModuleType:
    gc.collect()  # (what is garbage now is not kept by the freeze below)
    import lief

    lief.logging.disable()  # a warning on stderr would break the one-line contract
    # lief's bindings are some 80,000 objects that live as long as the process; the
    # collector would walk them all in every full collection and again at exit (0.4 s
    # and more). Frozen, they are left alone; nanobind would then list them as leaked
    # at exit (on stderr), so that report is off.
    lief.disable_leak_warning()
    gc.freeze()
    return lief


def _config(lief: ModuleType, table: SymbolTable | None) -> Any:
    cfg = lief.ELF.ParserConfig()
    cfg.parse_relocations = False
    cfg.parse_symbol_versions = False
    cfg.parse_notes = False
    cfg.parse_overlay = False
    cfg.parse_symtab_symbols = table is not None and table.sec.type == SHT_SYMTAB
    # lief finds .dynsym only through the dynamic table (DT_SYMTAB, DT_STRTAB, a count
    # from the hash tables); linkfix reads the section, so a .dynsym is decoded by
    # elfraw (it is the table only in an image without .symtab: a stripped one).
    cfg.parse_dyn_symbols = False
    return cfg


def _parse(path: str, data: bytes, from_path: bool, cfg: Any) -> Any:
    lief = _lief()
    # lief reads the file itself when `data` is the file's content (load(): lief copies
    # bytes it is given, which costs it twice the time), else the bytes. Either way,
    # whatever lief read is compared with `data`.
    source: Any = path if from_path else data
    try:
        binary = lief.ELF.parse(source, cfg)
    except Exception as exc:  # noqa: BLE001 - whatever lief raises, the file is unreadable
        raise BadInput(path, f"lief cannot read the image ({type(exc).__name__})") from None
    if binary is None:
        raise BadInput(path, "lief cannot read the image")
    return binary


def _disagree(path: str, what: str, got: object, want: object) -> BadInput:
    def show(v: object) -> str:
        return f"{v:#x}" if isinstance(v, int) else repr(v)

    return BadInput(path, f"lief reads {what} as {show(got)}, the file holds {show(want)}")


def _check(path: str, what: str, got: object, want: object) -> None:
    if got != want:
        raise _disagree(path, what, got, want)


def _header(path: str, binary: Any, raw: Header) -> Header:
    h = binary.header
    got = Header(bits=64 if int(h.identity_class) == 2 else 32, etype=int(h.file_type),
                 machine=int(h.machine_type), entry=h.entrypoint,
                 phoff=h.program_header_offset, phentsize=h.program_header_size,
                 phnum=h.numberof_segments, shoff=h.section_header_offset,
                 shentsize=h.section_header_size, shnum=h.numberof_sections,
                 shstrndx=h.section_name_table_idx)
    for field in raw.__dataclass_fields__:
        _check(path, f"the ELF header's {field}", getattr(got, field), getattr(raw, field))
    return got


def _segments(path: str, binary: Any, raw: tuple[RawSegment, ...]) -> tuple[RawSegment, ...]:
    segs = list(binary.segments)
    _check(path, "the number of program headers", len(segs), len(raw))
    out = []
    for i, (seg, want) in enumerate(zip(segs, raw, strict=True)):
        ptype = int(seg.type)
        if ptype == _LIEF_UNKNOWN_SEGMENT and PT_LOPROC <= want[0] <= PT_HIPROC:
            ptype = want[0]  # a processor-specific type lief does not know for x86
        got = (ptype & _TYPE_MASK, seg.raw_flags, seg.file_offset, seg.virtual_address,
               seg.physical_size, seg.virtual_size)
        _check(path, f"program header {i}", got, want)
        out.append(got)
    return tuple(out)


def _name(value: str | bytes) -> str:
    # lief gives bytes for a name that is not UTF-8; linkfix shows U+FFFD there
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _sections(path: str, binary: Any, hdr: Header,
              raw: tuple[Section, ...]) -> tuple[Section, ...]:
    secs = list(binary.sections)
    _check(path, "the number of sections", len(secs), len(raw))
    named = has_name_table(hdr)
    out = []
    for i, (sec, want) in enumerate(zip(secs, raw, strict=True)):
        stype = int(sec.type)
        if stype == 0 and SHT_LOPROC <= want.type <= SHT_HIPROC:
            stype = want.type  # lief keeps no processor-specific section type for i386
        got = Section(i, _name(sec.name) if named else "", stype & _TYPE_MASK, sec.flags,
                      sec.virtual_address, sec.file_offset, sec.size, sec.link,
                      sec.information, sec.entry_size)
        _check(path, f"section #{i}", got, want)
        out.append(got)
    return tuple(out)


@dataclass
class LiefSymbols:
    """Symbols as lief read them, each compared with the raw table before use."""

    path: str
    binary: Any
    table: SymbolTable | None

    def all(self) -> list[Symbol]:
        table = self.table
        if table is None:
            return []
        what = f"symbol table {table.sec.name or '#' + str(table.sec.index)}"
        syms = self.binary.symtab_symbols
        _check(self.path, f"the number of symbols in {what}", len(syms), table.count)
        cols = _raw_columns(table)
        strtab = table.strtab
        out = []
        for j, (s, st_name, value, size, info, shndx) in enumerate(zip(syms, *cols,
                                                                       strict=True)):
            raw_name = s.name
            nb = raw_name.encode() if isinstance(raw_name, str) else bytes(raw_name)
            end = st_name + len(nb)
            got = (s.value, s.size, s.information, s.shndx)
            if got != (value, size, info, shndx) or not (
                    strtab.startswith(nb, st_name) and end < len(strtab) and strtab[end] == 0):
                raise _disagree(self.path, f"symbol {j} of {what}", (_name(raw_name), *got),
                                (_name(_cstr(strtab, st_name)), value, size, info, shndx))
            out.append(Symbol(_name(raw_name), value, size, info & 0xF, shndx))
        return out

    def value(self, name: str) -> int | None:
        table = self.table
        if table is None:
            return None
        got = self._lief_value(name)
        want = table.value(name)
        _check(self.path, f"the value of symbol {name}", got, want)
        return got

    def _lief_value(self, name: str) -> int | None:
        sym = self.binary.get_symtab_symbol(name)
        if sym is None:
            return None
        if sym.shndx != 0:
            return sym.value
        # the first symbol of the name is undefined: the first defined one, if any
        return next((s.value for s in self.binary.symtab_symbols if s.name == name and s.shndx),
                    None)


def _cstr(table: bytes, at: int) -> bytes:
    end = table.find(b"\0", at)
    return table[at:end if end >= 0 else None]


def _raw_columns(table: SymbolTable) -> tuple[list[int], ...]:
    """st_name, st_value, st_size, st_info, st_shndx of every entry of the raw table."""
    ent = sym_struct(table.bits).size
    raw = memoryview(table.entries())
    words = raw.cast("I")
    halves = raw.cast("H")
    octets = raw.cast("B")
    if table.bits == 64:
        quads = raw.cast("Q")
        return (words[0::6].tolist(), quads[1::3].tolist(), quads[2::3].tolist(),
                octets[4::ent].tolist(), halves[3::ent // 2].tolist())
    return (words[0::4].tolist(), words[1::4].tolist(), words[2::4].tolist(),
            octets[12::ent].tolist(), halves[7::ent // 2].tolist())


def read(path: str, data: bytes, from_path: bool = False) -> ElfRead:
    """The image's ELF structures as lief reads them, checked against the raw bytes;
    `from_path`: `data` was read from the file `path` (lief may read it there)."""
    raw = read_raw(path, data)  # every check, before lief sees the file
    binary = _parse(path, data, from_path, _config(_lief(), raw.symtab))
    with warnings.catch_warnings():
        # nanobind warns (on stderr) about an enum value lief has no name for
        warnings.simplefilter("ignore")
        hdr = _header(path, binary, raw.header)
        segments = _segments(path, binary, raw.segments)
        sections = _sections(path, binary, hdr, raw.sections)
    symbols = raw.symbols if raw.symtab is None or raw.symtab.sec.type != SHT_SYMTAB else \
        LiefSymbols(path, binary, raw.symtab)
    return ElfRead("lief", hdr, segments, sections, raw.symtab, symbols)
