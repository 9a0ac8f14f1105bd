"""Read a linked ELF image: header, PT_LOAD segments, sections, symbols, relocations.

Plain `struct` parsing of the file (read into memory, or mapped read-only when it
is large: then it costs only the pages looked at): it is much faster than
lief on large symbol tables and never writes anything. linkfix produces its
output by copying these bytes and patching them at file offsets, so the only
address translation that matters is vaddr -> file offset through PT_LOAD
(never p_paddr, which a kernel sets to its load address).
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from dataclasses import dataclass
from functools import cached_property

from linkfix.errors import BadInput
from linkfix.fileio import map_regular, read_regular

EM_386 = 3
EM_X86_64 = 62
ET_EXEC = 2
ET_DYN = 3
PT_LOAD = 1
PT_DYNAMIC = 2
PF_X = 1
SHT_SYMTAB = 2
SHT_RELA = 4
SHT_NOBITS = 8
SHT_REL = 9
SHT_DYNSYM = 11
SHT_DYNAMIC_SEC = 6
SHT_RELR = 19
SHF_ALLOC = 0x2

# Dynamic tags naming load-time relocation tables.
DT_NULL = 0
DT_RELA, DT_RELASZ, DT_REL, DT_RELSZ = 7, 8, 17, 18
DT_JMPREL, DT_PLTRELSZ, DT_PLTREL = 23, 2, 20
DT_RELR, DT_RELRSZ = 36, 35

_CLASS = {1: 32, 2: 64}
_MACHINE_CLASS = {EM_386: 32, EM_X86_64: 64}


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
class Reloc:
    """One relocation entry; `slot` is its byte position in the file."""

    slot: int
    offset: int
    type: int
    sym: int
    addend: int  # 0 for REL entries (the addend lives in the relocated field)


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
    """A parsed ELF32/ELF64 little-endian x86 image (ET_EXEC or ET_DYN)."""

    def __init__(self, path: str, data: bytes | mmap.mmap) -> None:
        self.path = path
        self.data = data
        if len(data) < 52 or data[:4] != b"\x7fELF":
            raise BadInput(path, "not an ELF file")
        cls = _CLASS.get(data[4])
        if cls is None:
            raise BadInput(path, f"unknown ELF class {data[4]}")
        if data[5] != 1:
            raise BadInput(path, "not a little-endian ELF file")
        if len(data) < (64 if cls == 64 else 52):
            raise BadInput(path, f"ELF header truncated ({len(data)} bytes, ELF{cls} needs "
                                 f"{64 if cls == 64 else 52})")
        self.bits = cls
        self.w = "Q" if cls == 64 else "I"
        if cls == 64:
            hdr = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
        else:
            hdr = struct.unpack_from("<HHIIIIIHHHHHH", data, 16)
        (self.etype, self.machine, _ver, self.entry, phoff, shoff, _flags, _ehsize,
         phentsize, phnum, shentsize, shnum, shstrndx) = hdr
        if self.machine not in _MACHINE_CLASS:
            raise BadInput(path, f"unsupported e_machine {self.machine} (x86-64 or i386 only)")
        if _MACHINE_CLASS[self.machine] != cls:
            raise BadInput(path, f"ELF{cls} file with e_machine {self.machine}")
        if self.etype not in (ET_EXEC, ET_DYN):
            raise BadInput(path, f"e_type {self.etype}: a linked executable (ET_EXEC or "
                                 "ET_DYN) is required")
        # File ranges of the headers themselves: nothing linkfix writes may land there.
        self.header_ranges = (("the ELF header", 0, 64 if cls == 64 else 52),
                              ("the program header table", phoff, phentsize * phnum),
                              ("the section header table", shoff if shnum else 0,
                               shentsize * shnum if shoff else 0))
        self.segments = self._segments(phoff, phentsize, phnum)
        self.loads = tuple(s for s in self.segments if s[0] == PT_LOAD)
        self.load_segments = tuple(
            Segment(vaddr=v, memsz=m, offset=o, filesz=f, flags=fl)
            for _t, fl, o, v, f, m in self.loads
        )
        self.sections = self._sections(shoff, shentsize, shnum, shstrndx)
        self._by_name = {}
        for s in self.sections:
            self._by_name.setdefault(s.name, s)

    # -- headers ---------------------------------------------------------------------------

    def _check_range(self, what: str, off: int, size: int) -> None:
        if off < 0 or size < 0 or off + size > len(self.data):
            raise BadInput(self.path, f"{what} lies outside the file (truncated image?)")

    def _segments(self, phoff: int, entsize: int, num: int) -> tuple[tuple[int, ...], ...]:
        if self.bits == 64:
            fmt = struct.Struct("<IIQQQQQQ")  # type flags offset vaddr paddr filesz memsz align
        else:
            fmt = struct.Struct("<IIIIIIII")  # type offset vaddr paddr filesz memsz flags align
        if num and entsize < fmt.size:
            raise BadInput(self.path, f"e_phentsize {entsize} too small")
        self._check_range("program header table", phoff, entsize * num)
        out = []
        for i in range(num):
            f = fmt.unpack_from(self.data, phoff + i * entsize)
            if self.bits == 64:
                ptype, flags, off, vaddr, _pa, filesz, memsz, _al = f
            else:
                ptype, off, vaddr, _pa, filesz, memsz, flags, _al = f
            if ptype == PT_LOAD:
                self._check_range("PT_LOAD segment", off, filesz)
            out.append((ptype, flags, off, vaddr, filesz, memsz))
        return tuple(out)

    def _sections(self, shoff: int, entsize: int, num: int, strndx: int) -> tuple[Section, ...]:
        if not shoff or not num:
            return ()
        fmt = struct.Struct("<IIQQQQIIQQ" if self.bits == 64 else "<IIIIIIIIII")
        if entsize < fmt.size:
            raise BadInput(self.path, f"e_shentsize {entsize} too small")
        self._check_range("section header table", shoff, entsize * num)
        raw = [fmt.unpack_from(self.data, shoff + i * entsize) for i in range(num)]
        names = b""
        if 0 < strndx < num:
            _n, _t, _f, _a, off, size, *_ = raw[strndx]
            self._check_range("section name table", off, size)
            names = self.data[off:off + size]
        out = []
        for i, (name, typ, flags, addr, off, size, link, info, _al, ent) in enumerate(raw):
            end = names.find(b"\0", name)
            label = names[name:end if end >= 0 else None].decode("utf-8", "replace")
            if typ != SHT_NOBITS and i:
                self._check_range(f"section {label}", off, size)
            out.append(Section(i, label, typ, flags, addr, off, size, link, info, ent))
        return tuple(out)

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

    def _symtab(self, sec: Section) -> list[Symbol]:
        if sec.link >= len(self.sections):
            return []
        strs = self.sections[sec.link]
        strtab = self.data[strs.offset:strs.offset + strs.size]
        if self.bits == 64:
            fmt = struct.Struct("<IBBHQQ")
        else:
            fmt = struct.Struct("<IIIBBH")
        raw = self.data[sec.offset:sec.offset + sec.size - sec.size % fmt.size]
        out = []
        for ent in fmt.iter_unpack(raw):
            if self.bits == 64:
                name, info, _other, shndx, value, size = ent
            else:
                name, value, size, info, _other, shndx = ent
            end = strtab.find(b"\0", name)
            label = strtab[name:end if end >= 0 else None].decode("utf-8", "replace")
            out.append(Symbol(label, value, size, info & 0xF, shndx))
        return out

    @cached_property
    def symbols(self) -> list[Symbol]:
        """.symtab if present, else .dynsym (empty when the image has neither)."""
        for typ in (SHT_SYMTAB, SHT_DYNSYM):
            for sec in self.sections:
                if sec.type == typ:
                    return self._symtab(sec)
        return []

    def symbol_value(self, name: str) -> int | None:
        """The value of the first defined symbol `name` (no full symbol table parse:
        the name's string offsets are found in the string table, then matched
        against the st_name column)."""
        if "symbols" in self.__dict__:
            return next((s.value for s in self.symbols if s.name == name and s.shndx != 0),
                        None)
        sec = next((s for typ in (SHT_SYMTAB, SHT_DYNSYM) for s in self.sections
                    if s.type == typ), None)
        if sec is None or sec.link >= len(self.sections):
            return None
        strs = self.sections[sec.link]
        strtab = self.data[strs.offset:strs.offset + strs.size]
        key = name.encode() + b"\0"
        offsets = set()
        at = strtab.find(key)
        while at >= 0:
            if at == 0 or strtab[at - 1] == 0:
                offsets.add(at)
            at = strtab.find(key, at + 1)
        if not offsets:
            return None
        ent = 24 if self.bits == 64 else 16
        n = sec.size // ent
        if n == 0:
            return None
        cols = memoryview(self.data[sec.offset:sec.offset + n * ent]).cast("I")
        names = cols[::ent // 4]
        fmt = struct.Struct("<IBBHQQ" if self.bits == 64 else "<IIIBBH")
        for j, v in enumerate(names):
            if v in offsets:
                f = fmt.unpack_from(self.data, sec.offset + j * ent)
                value, shndx = (f[4], f[3]) if self.bits == 64 else (f[1], f[5])
                if shndx != 0:
                    return value
        return None

    @cached_property
    def _code_symbols(self) -> tuple[list[int], list[Symbol]]:
        # Functions and plain labels with an address, sorted; used to name sites.
        syms = sorted(
            (s for s in self.symbols
             if s.name and s.shndx != 0 and s.type in (0, 1, 2) and s.value),
            key=lambda s: (s.value, s.type != 2, s.name),
        )
        return [s.value for s in syms], syms

    def symbolize(self, vaddr: int) -> str | None:
        """`name+0xoff` for the nearest symbol at or below `vaddr`."""
        values, syms = self._code_symbols
        i = bisect.bisect_right(values, vaddr) - 1
        if i < 0:
            return None
        # Several symbols may share the address: prefer a sized function symbol.
        best = syms[i]
        j = i
        while j >= 0 and values[j] == values[i]:
            if syms[j].type == 2:
                best = syms[j]
            j -= 1
        off = vaddr - best.value
        if best.size and off >= best.size:
            return None
        return f"{best.name}+{off:#x}"

    # -- relocations -----------------------------------------------------------------------

    def _reloc_entries(self, off: int, size: int, rela: bool, lo: int = 0,
                       hi: int = 1 << 64) -> list[Reloc]:
        fmt = self.reloc_struct(rela)
        self._check_range("relocation table", off, size)
        raw = self.data[off:off + size - size % fmt.size]
        shift, mask = (32, 0xFFFFFFFF) if self.bits == 64 else (8, 0xFF)
        out = []
        for i, ent in enumerate(fmt.iter_unpack(raw)):
            if lo <= ent[0] < hi:
                addend = ent[2] if rela else 0
                out.append(Reloc(off + i * fmt.size, ent[0], ent[1] & mask, ent[1] >> shift,
                                 addend))
        return out

    def reloc_struct(self, rela: bool) -> struct.Struct:
        if self.bits == 64:
            return struct.Struct("<QQq" if rela else "<QQ")
        return struct.Struct("<IIi" if rela else "<II")

    def encode_info(self, sym: int, typ: int) -> int:
        return (sym << 32 | typ) if self.bits == 64 else (sym << 8 | typ)

    @cached_property
    def static_relocs(self) -> tuple[RelocTable, ...]:
        """Link-time relocation sections kept by `ld --emit-relocs` (not loaded)."""
        out = []
        for sec in self.sections:
            if sec.type in (SHT_RELA, SHT_REL) and not sec.flags & SHF_ALLOC and sec.info:
                out.append(RelocTable(self, sec, sec.type == SHT_RELA))
        return tuple(out)

    def _dynamic_tags(self) -> dict[int, int]:
        tags: dict[int, int] = {}
        for ptype, _fl, off, va, filesz, _m in self.segments:
            if ptype != PT_DYNAMIC:
                continue
            fmt = struct.Struct("<qQ" if self.bits == 64 else "<iI")
            self._check_range("PT_DYNAMIC", off, filesz)
            # The loader reads the dynamic table at its address: a p_offset that
            # disagrees would hide load-time relocations from this reader.
            mapped = self.offset_of(va, max(filesz, 1))
            if mapped != off:
                where = f"file offset {mapped:#x}" if mapped is not None else "no file bytes"
                raise BadInput(self.path, f"PT_DYNAMIC: p_offset {off:#x} disagrees with its "
                                          f"address {va:#x} ({where})")
            dyn = next((sec for sec in self.sections if sec.type == SHT_DYNAMIC_SEC), None)
            if dyn is not None and (dyn.addr, dyn.offset) != (va, off):
                raise BadInput(self.path, f"PT_DYNAMIC at {va:#x} (file offset {off:#x}) "
                                          f"disagrees with section {dyn.name}")
            for i in range(filesz // fmt.size):
                tag, val = fmt.unpack_from(self.data, off + i * fmt.size)
                if tag == DT_NULL:
                    break
                tags.setdefault(tag, val)
        return tags

    @cached_property
    def dynamic_reloc_offsets(self) -> list[int]:
        """Sorted addresses every load-time relocation writes (RELA, REL, JMPREL, RELR)."""
        tags = self._dynamic_tags()
        offsets: list[int] = []
        tables = [(DT_RELA, DT_RELASZ, True), (DT_REL, DT_RELSZ, False)]
        if DT_JMPREL in tags:
            tables.append((DT_JMPREL, DT_PLTRELSZ, tags.get(DT_PLTREL) == DT_RELA))
        for addr_tag, size_tag, rela in tables:
            if addr_tag in tags and tags.get(size_tag):
                off = self.offset_of(tags[addr_tag], tags[size_tag])
                if off is None:
                    raise BadInput(self.path, "dynamic relocation table outside PT_LOAD")
                offsets += [r.offset for r in self._reloc_entries(off, tags[size_tag], rela)
                            if r.type != 0]
        if DT_RELR in tags and tags.get(DT_RELRSZ):
            offsets += self._relr(tags[DT_RELR], tags[DT_RELRSZ])
        if not tags:
            # No PT_DYNAMIC (or none parsed): fall back to allocated reloc sections.
            for sec in self.sections:
                if sec.type in (SHT_RELA, SHT_REL) and sec.flags & SHF_ALLOC:
                    offsets += [r.offset for r in
                                self._reloc_entries(sec.offset, sec.size, sec.type == SHT_RELA)
                                if r.type != 0]
        return sorted(offsets)

    def _relr(self, addr: int, size: int) -> list[int]:
        off = self.offset_of(addr, size)
        if off is None:
            raise BadInput(self.path, "DT_RELR table outside PT_LOAD")
        word = self.bits // 8
        fmt = "<Q" if word == 8 else "<I"
        out: list[int] = []
        where = 0
        for i in range(size // word):
            (ent,) = struct.unpack_from(fmt, self.data, off + i * word)
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
                where += (self.bits - 1) * word
        return out


# Up to this size an image is read into memory (bytes are faster to search than a
# mapping); a larger one is mapped, so that it never needs its size in RAM twice.
READ_LIMIT = 1 << 30


def load(path: str) -> Image:
    try:
        size = os.stat(path).st_size
        data = read_regular(path) if size <= READ_LIMIT else map_regular(path)
    except OSError as exc:
        raise BadInput(path, f"cannot read: {exc.strerror}") from None
    return Image(path, data)
