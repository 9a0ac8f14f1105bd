#!/usr/bin/env python3
"""Read and compare the ORC unwind tables of an x86-64 Linux 6.1 vmlinux.

Standard library only. The layout is that of 6.1's arch/x86/include/asm/orc_types.h:

    .orc_unwind_ip  s32 per entry, self-relative: ip[i] = sh_addr + 4*i + value[i]
    .orc_unwind     struct orc_entry, __packed, 6 bytes:
                        s16 sp_offset; s16 bp_offset;
                        then (little-endian bitfields in one 16-bit word)
                        sp_reg:4 (bits 0-3), bp_reg:4 (4-7), type:2 (8-9), end:1 (10)

Both sections are sorted by ip at build time (scripts/sorttable, which puts a
terminator entry -- sp_reg undefined, end 0 -- before any other entry at the same ip).
The entry that applies to an address X is the last one with ip <= X (the kernel's
__orc_find). Entries print the way `objtool orc dump` prints them.

    orc.py info VMLINUX
    orc.py dump VMLINUX [--range START-END | --symbol NAME]...
    orc.py lookup VMLINUX ADDR|SYMBOL[+OFF]...
    orc.py diff A B [--range START-END]... [--symbol NAME]... [--section NAME] [--by-symbol]

diff compares the entry in effect at every address where either table starts an
entry, prints each difference on one line and exits 1 if there is any. Ranges are
addresses (the same in both files); --symbol and --by-symbol compare symbol-relative
offsets, each symbol resolved in its own file, so two kernels whose layouts differ
can still be compared function by function. Without ranges, diff covers both whole
tables.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

# arch/x86/include/asm/orc_types.h
ORC_REG_UNDEFINED = 0
ORC_REG_PREV_SP = 1
ORC_REG_DX = 2
ORC_REG_DI = 3
ORC_REG_BP = 4
ORC_REG_SP = 5
ORC_REG_R10 = 6
ORC_REG_R13 = 7
ORC_REG_BP_INDIRECT = 8
ORC_REG_SP_INDIRECT = 9
REG_NAMES = {1: "prevsp", 2: "dx", 3: "di", 4: "bp", 5: "sp", 6: "r10", 7: "r13",
             8: "bp(ind)", 9: "sp(ind)"}
# include/linux/objtool.h: UNWIND_HINT_TYPE_{CALL,REGS,REGS_PARTIAL}
TYPE_NAMES = {0: "call", 1: "regs", 2: "regs (partial)"}
ORC_ENTRY_SIZE = 6
ORC_IP_SIZE = 4

SHF_EXECINSTR = 0x4
STT_NOTYPE, STT_FUNC = 0, 2
SHN_UNDEF, SHN_LORESERVE = 0, 0xFF00


class OrcError(Exception):
    pass


# ---------------------------------------------------------------------------
# a minimal ELF64 little-endian reader
# ---------------------------------------------------------------------------


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
    entsize: int


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int
    size: int
    type: int
    shndx: int


class Elf:
    def __init__(self, data: bytes, path: str = "?"):
        self.data = data
        self.path = path
        if data[:4] != b"\x7fELF":
            raise OrcError(f"{path}: not an ELF file")
        if data[4] != 2 or data[5] != 1:
            raise OrcError(f"{path}: not ELF64 little-endian")
        (self.e_type, self.e_machine, _v, _entry, _phoff, shoff, _flags, _ehsize, _phes,
         _phnum, shentsize, shnum, shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
        if self.e_machine != 62:
            raise OrcError(f"{path}: not x86-64 (e_machine {self.e_machine})")
        if shoff == 0:
            raise OrcError(f"{path}: no section headers")
        if shnum == 0:  # more than SHN_LORESERVE sections: count in section 0's sh_size
            shnum = struct.unpack_from("<Q", data, shoff + 32)[0]
        if shstrndx == 0xFFFF:
            shstrndx = struct.unpack_from("<I", data, shoff + 40)[0]
        raw = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
               for i in range(shnum)]
        stroff = raw[shstrndx][4]

        def cstr(off: int) -> str:
            end = data.index(b"\0", off)
            return data[off:end].decode("utf-8", "replace")

        self.sections = [Section(i, cstr(stroff + r[0]), r[1], r[2], r[3], r[4], r[5],
                                 r[6], r[9]) for i, r in enumerate(raw)]
        self.by_name = {}
        for s in self.sections:
            self.by_name.setdefault(s.name, s)
        self._symbols: list[Symbol] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Elf:
        return cls(Path(path).read_bytes(), str(path))

    def section(self, name: str) -> Section:
        try:
            return self.by_name[name]
        except KeyError:
            raise OrcError(f"{self.path}: no {name} section") from None

    def contents(self, s: Section) -> bytes:
        return self.data[s.offset:s.offset + s.size]

    def symbols(self) -> list[Symbol]:
        if self._symbols is None:
            st = self.by_name.get(".symtab")
            out: list[Symbol] = []
            if st is not None:
                strtab = self.sections[st.link]
                sdata = self.data
                for name, info, _other, shndx, value, size in struct.iter_unpack(
                        "<IBBHQQ", self.contents(st)):
                    off = strtab.offset + name
                    nm = sdata[off:sdata.index(b"\0", off)].decode("utf-8", "replace")
                    out.append(Symbol(nm, value, size, info & 0xF, shndx))
            self._symbols = out
        return self._symbols


class Symbolizer:
    """address -> symbol+offset, over the code symbols of executable sections."""

    def __init__(self, elf: Elf):
        exec_secs = {s.index for s in elf.sections if s.flags & SHF_EXECINSTR}
        rows = []
        self.funcs: dict[str, list[Symbol]] = {}
        for sym in elf.symbols():
            if sym.shndx not in exec_secs or not sym.name or sym.name.startswith(".L"):
                continue
            if sym.type == STT_FUNC:
                rows.append((sym.value, 1, sym.name))
                self.funcs.setdefault(sym.name, []).append(sym)
            elif sym.type == STT_NOTYPE:
                rows.append((sym.value, 0, sym.name))
        rows.sort()
        self.addrs = [r[0] for r in rows]
        self.names = [r[2] for r in rows]
        self.elf = elf

    def describe(self, addr: int) -> str:
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0:
            return "?"
        off = addr - self.addrs[i]
        return f"{self.names[i]}+{off:#x}"

    def resolve(self, text: str) -> int:
        """An address: hex (with or without 0x), or SYMBOL, or SYMBOL+OFFSET."""
        try:
            return int(text, 16)
        except ValueError:
            pass
        name, _, off = text.partition("+")
        base = self.symbol(name).value
        return base + (int(off, 0) if off else 0)

    def symbol(self, name: str) -> Symbol:
        syms = self.funcs.get(name)
        if not syms:
            for sym in self.elf.symbols():
                if sym.name == name and SHN_UNDEF < sym.shndx < SHN_LORESERVE:
                    return sym
            raise OrcError(f"{self.elf.path}: no symbol {name}")
        if len(syms) > 1:
            raise OrcError(f"{self.elf.path}: {len(syms)} functions named {name}")
        return syms[0]


# ---------------------------------------------------------------------------
# ORC
# ---------------------------------------------------------------------------


class OrcEntry(NamedTuple):
    sp_offset: int
    bp_offset: int
    sp_reg: int
    bp_reg: int
    type: int
    end: int

    @classmethod
    def unpack(cls, raw: bytes, off: int = 0) -> OrcEntry:
        sp, bp, bits = struct.unpack_from("<hhH", raw, off)
        return cls(sp, bp, bits & 0xF, (bits >> 4) & 0xF, (bits >> 8) & 0x3, (bits >> 10) & 1)

    def pack(self) -> bytes:
        bits = self.sp_reg | self.bp_reg << 4 | self.type << 8 | self.end << 10
        return struct.pack("<hhH", self.sp_offset, self.bp_offset, bits)

    @staticmethod
    def _reg(reg: int, offset: int) -> str:
        if reg == ORC_REG_BP_INDIRECT:
            return f"(bp{offset:+d})"
        if reg == ORC_REG_SP_INDIRECT:
            return f"(sp){offset:+d}"
        if reg == ORC_REG_UNDEFINED:
            return "(und)"
        return f"{REG_NAMES.get(reg, '?')}{offset:+d}"

    def __str__(self) -> str:  # objtool orc dump's format
        return (f"sp:{self._reg(self.sp_reg, self.sp_offset)} "
                f"bp:{self._reg(self.bp_reg, self.bp_offset)} "
                f"type:{TYPE_NAMES.get(self.type, '?')} end:{self.end}")

    @property
    def terminator(self) -> bool:
        """sorttable's 'no unwind data here' entry (sp_reg undefined, end 0)."""
        return self.sp_reg == ORC_REG_UNDEFINED and not self.end


class OrcTable:
    def __init__(self, elf: Elf):
        self.elf = elf
        ip_sec = elf.section(".orc_unwind_ip")
        orc_sec = elf.section(".orc_unwind")
        if ip_sec.size % ORC_IP_SIZE or orc_sec.size % ORC_ENTRY_SIZE:
            raise OrcError(f"{elf.path}: ORC section sizes {ip_sec.size}, {orc_sec.size} "
                           "are not multiples of 4 and 6")
        n = ip_sec.size // ORC_IP_SIZE
        if orc_sec.size // ORC_ENTRY_SIZE != n:
            raise OrcError(f"{elf.path}: {n} ORC ips but {orc_sec.size // 6} entries")
        self.ip_section, self.orc_section = ip_sec, orc_sec
        rel = struct.unpack_from(f"<{n}i", elf.data, ip_sec.offset)
        self.ips = [ip_sec.addr + ORC_IP_SIZE * i + v for i, v in enumerate(rel)]
        raw = elf.contents(orc_sec)
        self.entries = [OrcEntry.unpack(raw, ORC_ENTRY_SIZE * i) for i in range(n)]
        self._sym: Symbolizer | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> OrcTable:
        return cls(Elf.from_file(path))

    def __len__(self) -> int:
        return len(self.ips)

    @property
    def symbolizer(self) -> Symbolizer:
        if self._sym is None:
            self._sym = Symbolizer(self.elf)
        return self._sym

    def is_sorted(self) -> bool:
        return all(a <= b for a, b in itertools.pairwise(self.ips))

    def entry_file_offset(self, i: int) -> int:
        """Where entry i's 6 bytes are in the file (to make edited copies)."""
        return self.orc_section.offset + ORC_ENTRY_SIZE * i

    def index(self, addr: int) -> int | None:
        """Index of the entry that applies to addr: the last with ip <= addr."""
        i = bisect.bisect_right(self.ips, addr) - 1
        return i if i >= 0 else None

    def lookup(self, addr: int) -> OrcEntry | None:
        i = self.index(addr)
        return None if i is None else self.entries[i]

    def indexes_in(self, start: int, end: int) -> range:
        """Indexes of the entries with start <= ip < end."""
        return range(bisect.bisect_left(self.ips, start), bisect.bisect_left(self.ips, end))

    def describe(self, addr: int) -> str:
        return self.symbolizer.describe(addr)


# ---------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    addr_a: int
    addr_b: int
    where: str
    a: OrcEntry | None
    b: OrcEntry | None

    def __str__(self) -> str:
        addr = f"{self.addr_a:#x}" if self.addr_a == self.addr_b \
            else f"{self.addr_a:#x}/{self.addr_b:#x}"
        return f"{addr} {self.where}: a: {self.a or '(none)'} | b: {self.b or '(none)'}"


def compare_range(a: OrcTable, b: OrcTable, start_a: int, start_b: int, length: int,
                  where: str | None = None) -> list[Difference]:
    """Compare the entries in effect over [start, start+length) of each table.

    The points compared are the start and every ip either table has in the range
    (relative to its own start), so a redundant entry that changes nothing is not a
    difference, and one changed entry is exactly one difference."""
    rel = {0}
    for t, s in ((a, start_a), (b, start_b)):
        rel.update(t.ips[i] - s for i in t.indexes_in(s, s + length))
    out = []
    for off in sorted(rel):
        ea, eb = a.lookup(start_a + off), b.lookup(start_b + off)
        if ea != eb:
            desc = f"{where}+{off:#x}" if where else a.describe(start_a + off)
            out.append(Difference(start_a + off, start_b + off, desc, ea, eb))
    return out


def compare(a: OrcTable, b: OrcTable, ranges: list[tuple[int, int]] | None = None
            ) -> list[Difference]:
    """Compare over address ranges [start, end), the same in both; default: all of
    both tables."""
    if ranges is None:
        lo = min(a.ips[:1] + b.ips[:1])
        hi = max(a.ips[-1:] + b.ips[-1:]) + 1
        ranges = [(lo, hi)]
    out = []
    for start, end in ranges:
        out += compare_range(a, b, start, start, end - start)
    return out


def compare_symbols(a: OrcTable, b: OrcTable, names: list[str] | None = None
                    ) -> tuple[list[Difference], list[str]]:
    """Compare function by function, each resolved in its own file. names=None: every
    function with a unique name and a size in both. Returns (differences, notes)."""
    sa, sb = a.symbolizer, b.symbolizer
    notes: list[str] = []
    if names is None:
        names = sorted(n for n, syms in sa.funcs.items()
                       if len(syms) == 1 and syms[0].size
                       and len(sb.funcs.get(n, ())) == 1)
        only_a = sorted(set(sa.funcs) - set(sb.funcs))
        only_b = sorted(set(sb.funcs) - set(sa.funcs))
        if only_a:
            notes.append(f"{len(only_a)} function(s) only in a: {' '.join(only_a[:10])}")
        if only_b:
            notes.append(f"{len(only_b)} function(s) only in b: {' '.join(only_b[:10])}")
    out = []
    for name in names:
        fa, fb = sa.symbol(name), sb.symbol(name)
        if fa.size != fb.size:
            notes.append(f"{name}: size {fa.size:#x} in a, {fb.size:#x} in b")
        out += compare_range(a, b, fa.value, fb.value, max(fa.size, fb.size, 1), name)
    return out, notes


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def parse_range(t: OrcTable, text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep:
        raise OrcError(f"range {text!r}: want START-END")
    return t.symbolizer.resolve(lo), t.symbolizer.resolve(hi)


def symbol_range(t: OrcTable, name: str) -> tuple[int, int]:
    sym = t.symbolizer.symbol(name)
    return sym.value, sym.value + max(sym.size, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="section sizes, entry count, sortedness")
    pi.add_argument("vmlinux")
    pd = sub.add_parser("dump", help="entries (default: all)")
    pd.add_argument("vmlinux")
    pd.add_argument("--range", action="append", default=[], metavar="START-END")
    pd.add_argument("--symbol", action="append", default=[])
    pl = sub.add_parser("lookup", help="the entry in effect at each address")
    pl.add_argument("vmlinux")
    pl.add_argument("addr", nargs="+")
    pc = sub.add_parser("diff", help="compare two files; exit 1 on any difference")
    pc.add_argument("a")
    pc.add_argument("b")
    pc.add_argument("--range", action="append", default=[], metavar="START-END")
    pc.add_argument("--symbol", action="append", default=[])
    pc.add_argument("--section", action="append", default=[],
                    help="the address range of this section of a (e.g. .text)")
    pc.add_argument("--by-symbol", action="store_true",
                    help="every function, symbol-relative")
    pc.add_argument("--quiet", "-q", action="store_true", help="only the count")
    args = p.parse_args(argv)
    try:
        if args.cmd == "info":
            t = OrcTable.from_file(args.vmlinux)
            print(f".orc_unwind_ip: {t.ip_section.size} bytes at {t.ip_section.addr:#x}")
            print(f".orc_unwind:    {t.orc_section.size} bytes at {t.orc_section.addr:#x}")
            print(f"entries: {len(t)}, sorted: {t.is_sorted()}, "
                  f"terminators: {sum(e.terminator for e in t.entries)}")
            if len(t):
                print(f"ips: {t.ips[0]:#x} .. {t.ips[-1]:#x}")
            return 0
        if args.cmd == "dump":
            t = OrcTable.from_file(args.vmlinux)
            ranges = [parse_range(t, r) for r in args.range]
            ranges += [symbol_range(t, s) for s in args.symbol]
            idx = (range(len(t)) if not ranges
                   else [i for lo, hi in ranges for i in t.indexes_in(lo, hi)])
            for i in idx:
                print(f"{t.ips[i]:x} {t.describe(t.ips[i])}: {t.entries[i]}")
            return 0
        if args.cmd == "lookup":
            t = OrcTable.from_file(args.vmlinux)
            for text in args.addr:
                addr = t.symbolizer.resolve(text)
                i = t.index(addr)
                got = "(none)" if i is None else \
                    f"{t.entries[i]}  (entry {i} at {t.ips[i]:#x} {t.describe(t.ips[i])})"
                print(f"{addr:#x} {t.describe(addr)}: {got}")
            return 0
        a, b = OrcTable.from_file(args.a), OrcTable.from_file(args.b)
        diffs: list[Difference] = []
        notes: list[str] = []
        ranges = [parse_range(a, r) for r in args.range]
        for name in args.section:
            s = a.elf.section(name)
            ranges.append((s.addr, s.addr + s.size))
        if ranges:
            diffs += compare(a, b, ranges)
        if args.symbol or args.by_symbol:
            d, n = compare_symbols(a, b, args.symbol or None)
            diffs += d
            notes += n
        if not (ranges or args.symbol or args.by_symbol):
            diffs = compare(a, b)
        if not args.quiet:
            for d in diffs:
                print(d)
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
        print(f"{len(diffs)} difference(s)", file=sys.stderr)
        return 1 if diffs else 0
    except BrokenPipeError:  # orc.py dump ... | head
        sys.stderr.close()
        return 0
    except (OrcError, OSError) as e:
        print(f"orc.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
