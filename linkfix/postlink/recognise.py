"""Does every site hold what the image's state record says it holds?

`patch` rewrites only bytes it recognises: before it writes a new selection,
every site must hold exactly the bytes of the alternative the state record
names (what `verify` computes). A site aimed at the middle of a function, or
changed since the last patch, is refused, never overwritten. The check itself
runs inside `Splicer.apply`'s write loop; this module compares whole images
and words the refusal.
"""

from __future__ import annotations

import operator

from linkfix.errors import BadInput
from linkfix.postlink.splice import NotRecognised, Splicer
from linkfix.postlink.tables import Tables

_CHUNK = 1 << 24

__all__ = ["NotRecognised", "refusal", "same_sites"]


def _hull(sp: Splicer) -> tuple[int, int]:
    """File offsets [lo, hi) covering every site."""
    chk = sp.chk
    sites = chk.site_addrs
    if not sites:
        return 0, 0
    lens = chk.site_lens
    seg = chk.exec_seg
    if seg is None:  # sites in several segments: map each (rare)
        offs = [(sp.img.offset_of(s, n), n) for s, n in zip(sites, lens, strict=True)]
        return min(o for o, _n in offs if o is not None), \
            max(o + n for o, n in offs if o is not None)
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
    s = sp.chk.site_addrs[e.i]
    off = sp.img.offset_of(s, sh.site_len)
    assert off is not None
    want = sp.site_bytes(e.i, e.k).hex()
    got = bytes(sp.img.data[off:off + sh.site_len]).hex()
    return BadInput(t.image.path, f"site {s:#x} ({t.op_name(sh.op)}): "
                                  f"holds {got}, not the {t.alt_name(e.k)} bytes {want} its "
                                  f"{source} implies; refusing to overwrite bytes linkfix "
                                  "does not recognise")
