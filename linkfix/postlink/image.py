"""A linked ELF image as linkfix sees it: bytes, PT_LOAD address map, sections, symbols.

The structures are read by one of two readers, chosen by LINKFIX_ELF_READER:
`lief` (linkfix/postlink/elflief.py: lief parses the headers and .symtab, every fact
compared with the raw bytes) or `hand` (linkfix/postlink/elfraw.py: plain `struct`
decoding). Both run the same checks first and give the same facts or the same
refusal (tests/postlink/test_reader_diff.py); a mapped image is always read by hand
(lief would hold a copy of it). docs/READER.md has the measurements.

The file is read into memory, or mapped read-only when it is large (then it
costs only the pages looked at), and never written: linkfix produces its output
by copying these bytes and patching them at file offsets, so the only address
translation that matters is vaddr -> file offset through PT_LOAD (never p_paddr,
which a kernel sets to its load address).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from linkfix.errors import BadInput
from linkfix.fileio import map_regular, read_regular
from linkfix.postlink import elfrelocs
from linkfix.postlink.elfraw import (  # noqa: F401 - the names of ELF constants users take from here
    EM_386,
    EM_X86_64,
    ET_DYN,
    ET_EXEC,
    PF_X,
    PT_DYNAMIC,
    PT_LOAD,
    SHF_ALLOC,
    SHT_DYNAMIC_SEC,
    SHT_DYNSYM,
    SHT_NOBITS,
    SHT_REL,
    SHT_RELA,
    SHT_RELR,
    SHT_SYMTAB,
    Data,
    ElfRead,
    Section,
    Segment,
    Symbol,
    SymbolTable,
    read_raw,
    sym_struct,
)
from linkfix.postlink.elfrelocs import Reloc

if TYPE_CHECKING:
    from linkfix.postlink.symindex import CodeSymbols

READER_ENV = "LINKFIX_ELF_READER"
READERS = ("lief", "hand")
DEFAULT_READER = "hand"


def selected_reader() -> str:
    """The reader LINKFIX_ELF_READER names (the default when it is unset or empty)."""
    name = os.environ.get(READER_ENV) or DEFAULT_READER
    if name not in READERS:
        raise BadInput(None, f"{READER_ENV}={name!r}: not an ELF reader (lief or hand)")
    return name


def read_elf(path: str, data: Data, reader: str | None = None, from_path: bool = False
             ) -> ElfRead:
    """The checked ELF structures of `data` by `reader` (None: the selected one);
    `from_path` says `data` is the content of the file `path`."""
    reader = reader or selected_reader()
    if reader == "lief" and isinstance(data, bytes):
        from linkfix.postlink import elflief  # imports lief: only a command that reads an image
        return elflief.read(path, data, from_path)
    # A mapped image (over READ_LIMIT) is read by hand even with lief selected: lief
    # keeps a whole copy of the file in memory, which the mapping is there to avoid.
    if reader not in READERS:
        raise ValueError(f"unknown ELF reader {reader!r}")
    return read_raw(path, data)


@dataclass(frozen=True)
class RelocTable:
    """A link-time relocation section; entries are decoded on demand, by address range."""

    image: Image
    section: Section
    rela: bool

    def entries_in(self, lo: int, hi: int) -> list[Reloc]:
        """Entries whose r_offset lies in [lo, hi) (a kernel has millions of them)."""
        return self.image._reloc_entries(self.section.offset, self.section.size, self.rela,
                                         lo, hi)


class Image:
    """A parsed ELF32/ELF64 little-endian x86 image (ET_EXEC or ET_DYN).

    `reader` is "lief" or "hand"; None takes the one LINKFIX_ELF_READER selects.
    `from_path`: `data` is the content of the file `path` (as load() reads it).
    """

    def __init__(self, path: str, data: Data, reader: str | None = None, *,
                 from_path: bool = False) -> None:
        self.path = path
        self.data = data
        elf = read_elf(path, data, reader, from_path)
        self.reader = elf.reader
        hdr = elf.header
        self.bits = hdr.bits
        self.w = "Q" if hdr.bits == 64 else "I"
        self.etype, self.machine, self.entry = hdr.etype, hdr.machine, hdr.entry
        # File ranges of the headers themselves: nothing linkfix writes may land there.
        self.header_ranges = (("the ELF header", 0, hdr.ehsize),
                              ("the program header table", hdr.phoff,
                               hdr.phentsize * hdr.phnum),
                              ("the section header table", hdr.shoff if hdr.shnum else 0,
                               hdr.shentsize * hdr.shnum if hdr.shoff else 0))
        self.segments = elf.segments
        self.loads = tuple(s for s in self.segments if s[0] == PT_LOAD)
        self.load_segments = tuple(
            Segment(vaddr=v, memsz=m, offset=o, filesz=f, flags=fl)
            for _t, fl, o, v, f, m in self.loads
        )
        self.sections = elf.sections
        self._symbol_source = elf.symbols
        self._symtab = elf.symtab
        if elf.symtab is not None:  # checked, and its strings copied: hand its pages back
            for sec in (elf.symtab.sec, elf.symtab.strs):
                self.release(sec.offset, sec.size)
        self._by_name: dict[str, Section] = {}
        for s in self.sections:
            self._by_name.setdefault(s.name, s)

    # -- headers ---------------------------------------------------------------------------

    def guarded_ranges(self) -> list[tuple[str, int, int]]:
        """(what, file offset, size) of everything a site must never overlap.

        The ELF, program and section headers, and every section not loaded
        (symbols, strings, relocations, debug information): a site's bytes lie
        in allocated code, so overlapping one of these means the tables are corrupt,
        and patching would overwrite the structures the output is read by.
        """
        out = [r for r in self.header_ranges if r[2] > 0]
        for s in self.sections:
            if s.index and s.size and s.type != SHT_NOBITS and not s.flags & SHF_ALLOC:
                out.append((f"section {s.name or '#' + str(s.index)}", s.offset, s.size))
        return out

    @cached_property
    def ambiguous_ranges(self) -> list[tuple[str, int, int]]:
        """(what, vaddr, vaddr_end) where PT_LOAD segments disagree about the bytes.

        Two segments covering the same addresses (the loader uses one, a file
        offset the other), or mapping the same file bytes at two addresses (a
        write at one changes the other): a site or table there cannot be patched
        with a known result.
        """
        out: list[tuple[str, int, int]] = []
        segs = self.load_segments
        for i, a in enumerate(segs):
            for j in range(i + 1, len(segs)):
                b = segs[j]
                what = f"PT_LOAD segments {i} and {j}"
                lo, hi = max(a.vaddr, b.vaddr), min(a.vaddr + a.memsz, b.vaddr + b.memsz)
                if lo < hi:
                    out.append((f"{what} (overlapping addresses)", lo, hi))
                flo = max(a.offset, b.offset)
                fhi = min(a.offset + a.filesz, b.offset + b.filesz)
                if flo < fhi:
                    for seg in (a, b):
                        out.append((f"{what} (the same file bytes)",
                                    flo - seg.offset + seg.vaddr, fhi - seg.offset + seg.vaddr))
        return out

    def file_to_vaddr_ranges(self, off: int, size: int) -> list[tuple[int, int]]:
        """Every [vaddr, vaddr_end) at which PT_LOAD segments map file bytes [off, off+size)."""
        out = []
        for seg in self.load_segments:
            lo = max(off, seg.offset)
            hi = min(off + size, seg.offset + seg.filesz)
            if lo < hi:
                out.append((lo - seg.offset + seg.vaddr, hi - seg.offset + seg.vaddr))
        return out

    # -- addresses -------------------------------------------------------------------------

    def section(self, name: str) -> Section | None:
        return self._by_name.get(name)

    def section_at(self, vaddr: int) -> Section | None:
        """The allocated section containing `vaddr`, if any."""
        for s in self.sections:
            if s.flags & SHF_ALLOC and s.size and s.addr <= vaddr < s.addr + s.size:
                return s
        return None

    def load_for(self, vaddr: int, size: int, executable: bool = False) -> Segment | None:
        """The PT_LOAD whose file-backed bytes hold [vaddr, vaddr+size), if any."""
        for seg in self.load_segments:
            if seg.vaddr <= vaddr and vaddr + size <= seg.vaddr + seg.filesz:
                if executable and not seg.executable:
                    continue
                return seg
        return None

    def offset_of(self, vaddr: int, size: int = 1) -> int | None:
        seg = self.load_for(vaddr, size)
        if seg is None:
            return None
        return vaddr - seg.vaddr + seg.offset

    def read(self, vaddr: int, size: int) -> bytes | None:
        off = self.offset_of(vaddr, max(size, 1))
        if off is None:
            return None
        return self.data[off:off + size]

    # -- symbols ---------------------------------------------------------------------------

    @cached_property
    def symbols(self) -> list[Symbol]:
        """.symtab if present, else .dynsym (empty when the image has neither)."""
        return self._symbol_source.all()

    def symbol_value(self, name: str) -> int | None:
        """The value of the first defined symbol `name` (without decoding the whole
        table unless it already is)."""
        if "symbols" in self.__dict__:
            return next((s.value for s in self.symbols if s.name == name and s.shndx != 0),
                        None)
        if self.reader == "hand" and self._symtab is not None:
            return _table_value(self, self._symtab, self._st_names, name)
        return self._symbol_source.value(name)

    @cached_property
    def _st_names(self) -> bytes:
        """Every symbol's st_name (read once: the tables need 8 names)."""
        assert self._symtab is not None
        return _st_names(self, self._symtab)

    @cached_property
    def _code_symbols(self) -> CodeSymbols:
        # Functions and plain labels with an address, sorted; used to name sites.
        from linkfix.postlink import symindex
        if self.reader == "hand" and self._symtab is not None:
            return symindex.CodeSymbols.from_table(self, self._symtab)
        return symindex.CodeSymbols.from_symbols(self.symbols)

    def index_symbols(self) -> None:
        """Make the index `symbolize` reads now: it sorts the symbols, which takes
        memory for a moment, better spent before anything else is held."""
        self._code_symbols  # noqa: B018 - a cached property

    def symbolize(self, vaddr: int) -> str | None:
        """`name+0xoff` for the nearest symbol at or below `vaddr`."""
        return self._code_symbols.name(vaddr)

    def release(self, off: int, size: int) -> None:
        """Hand back the pages of a mapped image over file bytes [off, off + size):
        they count as this process's memory while mapped, and are read again
        (from the page cache) if they are looked at later. Nothing for bytes."""
        data = self.data
        if isinstance(data, mmap.mmap) and size > 0:
            lo = max(0, off - off % mmap.PAGESIZE)
            hi = min(len(data), off + size)
            if lo < hi:
                data.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    # -- relocations -----------------------------------------------------------------------

    def _reloc_entries(self, off: int, size: int, rela: bool, lo: int = 0,
                       hi: int = 1 << 64) -> list[Reloc]:
        return elfrelocs.reloc_entries(self.path, self.data, self.bits, off, size, rela, lo, hi)

    def reloc_struct(self, rela: bool) -> struct.Struct:
        return elfrelocs.reloc_struct(self.bits, rela)

    def encode_info(self, sym: int, typ: int) -> int:
        return elfrelocs.encode_info(self.bits, sym, typ)

    @cached_property
    def static_relocs(self) -> tuple[RelocTable, ...]:
        """Link-time relocation sections kept by `ld --emit-relocs` (not loaded)."""
        out = []
        for sec in self.sections:
            if sec.type in (SHT_RELA, SHT_REL) and not sec.flags & SHF_ALLOC and sec.info:
                out.append(RelocTable(self, sec, sec.type == SHT_RELA))
        return tuple(out)

    @cached_property
    def dynamic_reloc_offsets(self) -> list[int]:
        """Sorted addresses every load-time relocation writes (RELA, REL, JMPREL, RELR)."""
        tags = elfrelocs.dynamic_tags(self)
        offsets = elfrelocs.dynamic_reloc_offsets(self, tags)
        if not tags:
            # No PT_DYNAMIC (or none parsed): fall back to allocated reloc sections.
            for sec in self.sections:
                if sec.type in (SHT_RELA, SHT_REL) and sec.flags & SHF_ALLOC:
                    offsets += [r.offset for r in
                                self._reloc_entries(sec.offset, sec.size, sec.type == SHT_RELA)
                                if r.type != 0]
        return sorted(offsets)


# -- symbols by name, from the raw table ----------------------------------------------------


def _st_names(img: Image, tab: SymbolTable) -> bytes:
    """Every symbol's st_name, 4 bytes each in table order."""
    ent = sym_struct(img.bits).size
    with memoryview(img.data) as whole:
        mv = whole[tab.sec.offset:tab.sec.offset + tab.count * ent]
        words = mv.cast("I")
        col = words[::ent // 4]
        out = col.tobytes()
        for v in (col, words, mv):
            v.release()
    img.release(tab.sec.offset, tab.count * ent)
    return out


def _table_value(img: Image, tab: SymbolTable, names: bytes, name: str) -> int | None:
    """The value of the first defined symbol `name`, as SymbolTable.value gives it:
    each string-table offset of the name is found in the st_name column `names`
    (_st_names) by bytes.find, at C speed and with no int object a symbol."""
    offsets = tab.name_offsets(name)
    if not offsets or tab.count == 0:
        return None
    hits = []
    for off in offsets:
        key = off.to_bytes(4, "little")
        at = names.find(key)
        while at >= 0:
            if at % 4 == 0:
                hits.append(at // 4)
            at = names.find(key, at + (4 if at % 4 == 0 else 1))
    fmt = sym_struct(img.bits)
    for j in sorted(hits):
        f = fmt.unpack_from(img.data, tab.sec.offset + j * fmt.size)
        value, shndx = (f[4], f[3]) if img.bits == 64 else (f[1], f[5])
        if shndx != 0:
            return value
    return None


# Up to this size an image is read into memory (bytes are faster to search than a
# mapping); a larger one is mapped, so that it never needs its size in RAM twice.
READ_LIMIT = 1 << 30


def load(path: str, reader: str | None = None, mapped: bool = False) -> Image:
    """The image at `path`, read into memory; mapped when it is large, or with
    `mapped` when the hand reader reads it (lief needs the bytes in memory)."""
    if mapped:
        try:
            mapped = (reader or selected_reader()) == "hand"
        except BadInput:
            mapped = False  # Image refuses the setting, after the file is read
    try:
        size = os.stat(path).st_size
        data = read_regular(path) if size <= READ_LIMIT and not mapped else map_regular(path)
    except OSError as exc:
        raise BadInput(path, f"cannot read: {exc.strerror}") from None
    return Image(path, data, reader, from_path=True)
