"""The symbols sites are named by, as columns rather than as objects.

A kernel has a hundred thousand symbols, and a list of Symbol objects costs
some 200 bytes each: `CodeSymbols` keeps the few columns naming a site needs,
read from the raw table (elfraw.symbol_table has checked its strings). The
lief reader's symbols, which are compared with the raw ones as they are read,
take the same index (`CodeSymbols.from_symbols`). Imported by the commands
that name sites (inspect) only.
"""

from __future__ import annotations

import bisect
import operator
from array import array
from collections.abc import Callable, Sequence
from itertools import compress
from typing import TYPE_CHECKING

from linkfix.postlink.elfraw import Symbol, SymbolTable, cstring

if TYPE_CHECKING:
    from linkfix.postlink.image import Image


# Every symbol type linkfix names sites with: STT_NOTYPE, STT_OBJECT, STT_FUNC.
_CODE_TYPES = bytes(1 if x & 0xF in (0, 1, 2) else 0 for x in range(256))


class CodeSymbols:
    """The symbols sites are named by (named, defined, with an address, of a code
    type), in address order, as columns: a few bytes a symbol, where a list of
    Symbol objects costs some 200 (a kernel has a hundred thousand)."""

    def __init__(self, values: Sequence[int], types: bytes, sizes: Sequence[int],
                 name_of: Callable[[int], str]) -> None:
        self.values, self.types, self.sizes, self.name_of = values, types, sizes, name_of
        self._last: tuple[int, int, str, int] | None = None

    @classmethod
    def from_symbols(cls, symbols: list[Symbol]) -> CodeSymbols:
        syms = sorted((s for s in symbols
                       if s.name and s.shndx != 0 and s.type in (0, 1, 2) and s.value),
                      key=lambda s: s.value)  # stable: ties stay in table order
        return cls([s.value for s in syms], bytes(s.type for s in syms),
                   [s.size for s in syms], [s.name for s in syms].__getitem__)

    @classmethod
    def from_table(cls, img: Image, tab: SymbolTable) -> CodeSymbols:
        """From the raw symbol table (its strings checked by elfraw.symbol_table)."""
        n, ent = tab.count, 24 if img.bits == 64 else 16
        with memoryview(img.data) as whole:
            mv = whole[tab.sec.offset:tab.sec.offset + n * ent]
            words = mv.cast("I")
            if img.bits == 64:
                quads = mv.cast("Q")
                cols = (words[0::6], mv[4::24], mv.cast("H")[3::12], quads[1::3], quads[2::3])
            else:
                cols = (words[0::4], mv[12::16], mv.cast("H")[7::8], words[1::4], words[2::4])
            names, info_col, shndx, values, sizes = cols
            info = info_col.tobytes()
            strtab = tab.strtab
            named = bytes(map(strtab.__getitem__, names)).translate(b"\0" + b"\1" * 255)
            keep = array("L", compress(range(n), map(all, zip(
                named, info.translate(_CODE_TYPES), shndx, values, strict=True))))
            vals = array("Q", map(values.__getitem__, keep))
            if not all(map(operator.le, vals, vals[1:])):
                order = sorted(range(len(keep)), key=vals.__getitem__)
                keep = array("L", map(keep.__getitem__, order))
                vals = array("Q", map(vals.__getitem__, order))
            name_at = array("L", map(names.__getitem__, keep))
            types = bytes(map(info.__getitem__, keep)).translate(
                bytes(x & 0xF for x in range(256)))
            size_col = array("Q", map(sizes.__getitem__, keep))
            for c in (*cols, words, *([quads] if img.bits == 64 else []), mv):
                c.release()
        img.release(tab.sec.offset, n * ent)
        return cls(vals, types, size_col,
                   lambda j: cstring(strtab, name_at[j]))

    def name(self, vaddr: int) -> str | None:
        """`name+0xoff` for the nearest symbol at or below `vaddr`."""
        values = self.values
        i = bisect.bisect_right(values, vaddr) - 1
        if i < 0:
            return None
        last = self._last
        if last is not None and last[0] == i:
            _i, value, name, size = last
        else:
            # Several symbols may share the address: prefer a function symbol (of
            # those, the first name in order), else the last name in order.
            value = values[i]
            run = range(bisect.bisect_left(values, value), i + 1)
            funcs = [j for j in run if self.types[j] == 2]
            if funcs:
                best = min(funcs, key=self.name_of)
            else:
                best = run[0]
                for j in run:
                    if self.name_of(j) >= self.name_of(best):
                        best = j
            name, size = self.name_of(best), self.sizes[best]
            self._last = (i, value, name, size)
        off = vaddr - value
        if size and off >= size:
            return None
        return f"{name}+{off:#x}"
