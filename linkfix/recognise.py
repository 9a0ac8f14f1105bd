"""Does every site hold what the image's state record says it holds?

`patch` rewrites only bytes it recognises: before it writes a new selection,
every site must hold exactly the bytes of the alternative the state record
names (what `verify` computes). A site aimed at the middle of a function, or
changed since the last patch, is refused, never overwritten.

`Splicer.apply` checks that in the same pass as its writes: `expectation`
turns the plan of what a site should hold into what the write loop compares,
and `check_group` checks the shapes the loop cannot, site by site, first.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import TYPE_CHECKING

from linkfix.errors import BadInput
from linkfix.shapeplan import EMPTY, I32, REL32, SAME_FIELD, SAME_TARGET, STATIC, starts_with
from linkfix.tables import Checked, Tables

if TYPE_CHECKING:
    from linkfix.splice import Splicer

_CHUNK = 1 << 24
# How apply recognises what a site holds before it writes (see expectation).
CHECK_NONE, CHECK_FIN, CHECK_TARGET, CHECK_SLOW = range(4)
NO_CHECK = (CHECK_NONE, b"", 0, b"", 0, 0, 0)


class NotRecognised(Exception):
    """Site `i` does not hold the bytes of alternative `k`, which its state record names."""

    def __init__(self, i: int, k: int) -> None:
        super().__init__(i, k)
        self.i = i
        self.k = k


def expectation(cur: tuple) -> tuple:
    """From the plan of what a site should hold now: how to check it in the write loop.

    (CHECK_FIN, bytes, ...): the site is exactly those bytes; (CHECK_TARGET, head,
    target, tail, pos, end, k): fixed bytes around a rel32 field reaching one place
    for every site; (CHECK_SLOW, ...): checked site by site before the loop.
    """
    mode, k, _blist, bdelta, _L, fin, _x, _y, z = cur
    if mode in (EMPTY, STATIC) and (mode == EMPTY or bdelta is not None):
        return (CHECK_FIN, fin, 0, b"", 0, 0, k)
    if mode == REL32 and z[1] == SAME_TARGET:
        pos = z[0]
        return (CHECK_TARGET, fin[:pos], z[2], fin[pos + 4:], pos, pos + 4, k)
    return (CHECK_SLOW, b"", 0, b"", 0, 0, k)


def check_group(sp: Splicer, p: tuple, idxs: list[int]) -> int | None:
    """The first of `idxs` whose site does not hold what plan `p` writes, or None."""
    src = sp.img.data
    starts = starts_with(src)
    sites = sp.chk.site_addrs
    seg = sp.chk.exec_seg
    unpack_i32 = I32.unpack_from
    mode, k, blist, bdelta, L, fin, x, y, z = p
    if seg is None or bdelta is None or mode not in (EMPTY, STATIC, REL32):
        offset_of = sp.img.offset_of
        return next((i for i in idxs if src[(so := offset_of(sites[i], L)):so + L]
                     != sp.site_bytes(i, k)), None)
    sdelta = seg.vaddr - seg.offset
    if mode == EMPTY or mode == STATIC:
        for i in idxs:
            so = sites[i] - sdelta
            if not starts(fin, so):
                return i
            if mode == STATIC:
                bo = blist[i] - bdelta
                if not starts(x, bo) and sp.site_bytes(i, k) != fin:
                    return i
        return None
    pos, how, lo, hi = z
    end = pos + 4
    head, tail = fin[:pos], fin[end:]
    for i in idxs:
        s = sites[i]
        b = blist[i]
        so, bo = s - sdelta, b - bdelta
        field = unpack_i32(src, bo + pos)[0]
        got = field + b
        if starts(x, bo) and starts(y, bo + end) \
                and (got == lo if how == SAME_TARGET else
                     field == lo if how == SAME_FIELD else lo <= got < hi):
            if not starts(head, so) or not starts(tail, so + end) \
                    or unpack_i32(src, so + pos)[0] + s != got:
                return i
        elif src[so:so + L] != sp.site_bytes(i, k):
            return i
    return None


def _offsets(sp: Splicer) -> Iterator[tuple[int, int, int]]:
    """(record index, file offset, length) of every site."""
    img = sp.img
    chk = sp.chk
    for i, s in enumerate(chk.site_addrs):
        n = sp.shape_of(i).site_len
        off = img.offset_of(s, n)
        assert off is not None  # validated by check_records
        yield i, off, n


def _hull(sp: Splicer) -> tuple[int, int]:
    """File offsets [lo, hi) covering every site."""
    chk: Checked = sp.chk
    sites = chk.site_addrs
    if not sites:
        return 0, 0
    seg = chk.exec_seg
    if seg is None:  # sites in several segments: map each (rare)
        offs = list(_offsets(sp))
        return min(o for _i, o, _n in offs), max(o + n for _i, o, n in offs)
    t = sp.t
    lens = bytes(memoryview(t.sites_bytes())[6::t.rec_size])
    lo, hi = min(sites), max(map(operator.add, sites, lens))
    return lo - seg.vaddr + seg.offset, hi - seg.vaddr + seg.offset


def same_sites(sp: Splicer, a, b) -> bool:  # type: ignore[no-untyped-def]
    """Do buffers `a` and `b` (the image's size) agree over every site?"""
    lo, hi = _hull(sp)
    return all(a[x:min(x + _CHUNK, hi)] == b[x:min(x + _CHUNK, hi)]
               for x in range(lo, hi, _CHUNK))


def refusal(t: Tables, sp: Splicer, e: NotRecognised, source: str) -> BadInput:
    """The one-line refusal of a site that does not hold what its state record names."""
    sh = sp.shape_of(e.i)
    off = sp.img.offset_of(sp.chk.site_addrs[e.i], sh.site_len)
    assert off is not None
    want = sp.site_bytes(e.i, e.k).hex()
    got = bytes(sp.img.data[off:off + sh.site_len]).hex()
    return BadInput(t.image.path, f"site {sp.chk.site_addrs[e.i]:#x} ({t.op_name(sh.op)}): "
                                  f"holds {got}, not the {t.alt_name(e.k)} bytes {want} its "
                                  f"{source} implies; refusing to overwrite bytes linkfix "
                                  "does not recognise")
