"""What `linkfix inspect` lists: the sites chosen, and each one's bytes per alternative.

An alternative's bytes for every site come from `Splicer.apply`, the loop
`linkfix patch` writes with (one pass per record shape, not a decode per site),
run into an anonymous mapping and kept compactly in listing order; a few sites
(a filtered listing) take `Splicer.placed` one by one instead, and so does an
alternative that cannot be placed at some site (each such site then says why).
Each site's bytes are looked up in the layout cache (inspect_disasm.py): a
capstone decode happens once per distinct layout, not per site.

Everything that can fail on bad input happens here, before the first line is
printed.
"""

from __future__ import annotations

import bisect
import mmap
import operator
import re
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import compress, islice

from linkfix import layout
from linkfix.errors import BadInput
from linkfix.postlink import image, tables
from linkfix.postlink.inspect_disasm import Decoder, LayoutCache
from linkfix.postlink.inspect_dwarf import site_functions, site_lines
from linkfix.postlink.splice import Splicer

ABSENT, UNPLACED = -1, -2  # layout ids of an alternative without a body / that fails here
_PER_SITE_SHARE = 20  # below 1/20 of the sites, placing them one by one is cheaper
_HEX = re.compile(r"(0[xX])?[0-9a-fA-F]+")


@dataclass(frozen=True)
class ShapeInfo:
    """A record shape, as the listing needs it."""

    op: int
    size: int
    branch: bool
    present: tuple[bool, ...]  # per alternative


@dataclass
class Column:
    """Alternative k's bytes at every listed site, in listing order."""

    data: bytearray  # the sites' bytes back to back (zeros where absent or unplaced)
    ids: array  # type: ignore[type-arg]  # layout id per listed site, or ABSENT / UNPLACED
    errors: dict[int, str]  # listed position -> why the alternative cannot be placed there


@dataclass
class Listing:
    img: image.Image
    t: tables.Tables
    chk: tables.Checked
    shapes: list[ShapeInfo]
    shape_of: Sequence[int]  # shape index per record
    sorted_records: bool  # record order is address order
    order: Sequence[int] = ()  # listed record indices, by address
    filtered: bool = False
    columns: list[Column] = field(default_factory=list)
    cache: LayoutCache | None = None
    lines: dict[int, str] = field(default_factory=dict)  # site address -> file:line
    by_address: tuple[Sequence[int], Sequence[int]] | None = None  # see _by_address

    @property
    def path(self) -> str:
        return self.img.path

    def site_offset(self, i: int) -> int:
        s = self.chk.site_addrs[i]
        seg = self.chk.exec_seg
        if seg is not None:
            return s - seg.vaddr + seg.offset
        off = self.img.offset_of(s, self.shapes[self.shape_of[i]].size)
        assert off is not None  # validated by check_records
        return off


def load(path: str) -> Listing:
    """Read and validate the image; every site is listed until `select` says otherwise."""
    img = image.load(path)
    t = tables.load(img)
    chk = tables.check_records(t)
    index: dict[bytes, int] = {}
    shapes = []
    for key in sorted(chk.shapes):  # sorted: shape indices do not depend on hash order
        sh = chk.shapes[key]
        index[key] = len(shapes)
        shapes.append(ShapeInfo(sh.op, sh.site_len, sh.kind == layout.KIND_BRANCH,
                                tuple(a.present for a in sh.alts)))
    per = map(index.__getitem__, chk.site_ops)
    shape_of: Sequence[int] = bytes(per) if len(shapes) <= 256 else array("I", per)
    sites = chk.site_addrs
    ordered = all(map(operator.lt, sites, islice(sites, 1, None)))
    lst = Listing(img, t, chk, shapes, shape_of, ordered)
    lst.order = range(t.n_sites) if ordered else sorted(range(t.n_sites),
                                                        key=sites.__getitem__)
    return lst


# -- filters -----------------------------------------------------------------------------


def select(lst: Listing, sites: list[str], ops: list[str]) -> None:
    """Keep the sites named by any --site (when given) whose op is one of --op (when given)."""
    if not sites and not ops:
        return
    names = lst.t.meta.ops
    wanted_ops = set()
    for name in ops:
        if name not in names:
            raise BadInput(lst.path, f"--op {name}: no such op (known: {', '.join(names)})")
        wanted_ops.add(names.index(name))
    keep = None
    if sites:
        chosen: set[int] = set()
        for value in sites:
            chosen.update(_named_sites(lst, value))
        keep = chosen
    if wanted_ops:
        ok_shape = bytes(1 if sh.op in wanted_ops else 0 for sh in lst.shapes)
        if keep is None:
            if isinstance(lst.shape_of, bytes):
                mask = lst.shape_of.translate(ok_shape.ljust(256, b"\0"))
            else:
                mask = bytes(ok_shape[x] for x in lst.shape_of)
            keep = set(compress(range(lst.t.n_sites), mask))
        else:
            keep = {i for i in keep if ok_shape[lst.shape_of[i]]}
    assert keep is not None
    lst.order = [i for i in lst.order if i in keep] if len(keep) > len(lst.order) // 8 else \
        sorted(keep, key=lst.chk.site_addrs.__getitem__)
    lst.filtered = True


def _named_sites(lst: Listing, value: str) -> list[int]:
    """The records --site VALUE names: a hex address inside a site, a symbol (the sites
    within it; an unsized label: those listed under it), or symbol+offset (the site
    there)."""
    sym = _symbol(lst.img, value)
    if sym is not None:
        lo, hi = sym.value, sym.value + sym.size
        got = _sites_in(lst, lo, hi) if sym.size else _sites_under(lst, sym)
        if not got:
            where = f"{lo:#x}..{hi:#x}" if sym.size else f"{lo:#x}"
            raise BadInput(lst.path, f"--site {value}: symbol {value} ({where}) holds no site")
        return got
    if "+" in value and not _HEX.fullmatch(value):
        name, _plus, off_text = value.rpartition("+")
        base = _symbol(lst.img, name)
        if base is None:
            raise BadInput(lst.path, f"--site {value}: no symbol {name!r}")
        try:
            off = int(off_text, 0)
        except ValueError:
            raise BadInput(lst.path, f"--site {value}: bad offset {off_text!r} (a number "
                                     "such as 0x1c)") from None
        return _one_site(lst, value, base.value + off)
    if _HEX.fullmatch(value):
        return _one_site(lst, value, int(value, 16))
    raise BadInput(lst.path, f"--site {value}: no symbol {value!r} (and not a hex address)")


def _symbol(img: image.Image, name: str) -> image.Symbol | None:
    if not name:
        return None
    return next((s for s in img.symbols if s.name == name and s.shndx != 0), None)


def _one_site(lst: Listing, value: str, addr: int) -> list[int]:
    got = _site_at(lst, addr)
    if not got:
        raise BadInput(lst.path, f"--site {value}: no site at {addr:#x}")
    return got


def _by_address(lst: Listing) -> tuple[Sequence[int], Sequence[int]]:
    """(addresses, record indices) of every site, both in address order."""
    if lst.by_address is None:
        sites = lst.chk.site_addrs
        if lst.sorted_records:
            lst.by_address = sites, range(len(sites))
        else:
            order = sorted(range(len(sites)), key=sites.__getitem__)
            lst.by_address = [sites[i] for i in order], order
    return lst.by_address


def _site_at(lst: Listing, addr: int) -> list[int]:
    """The site whose bytes hold `addr` (as a list: empty when none)."""
    addrs, recs = _by_address(lst)
    j = bisect.bisect_right(addrs, addr) - 1
    if j < 0:
        return []
    i = recs[j]
    return [i] if addr < addrs[j] + lst.shapes[lst.shape_of[i]].size else []


def _sites_under(lst: Listing, sym: image.Symbol) -> list[int]:
    """The sites an unsized label names: those listed as `label+offset`, i.e. from
    the label to the next symbol."""
    addrs, recs = _by_address(lst)
    out = []
    for j in range(bisect.bisect_left(addrs, sym.value), len(addrs)):
        name = lst.img.symbolize(addrs[j])
        if name is None or name.rpartition("+")[0] != sym.name:
            break
        out.append(recs[j])
    return out


def _sites_in(lst: Listing, lo: int, hi: int) -> list[int]:
    addrs, recs = _by_address(lst)
    a, b = bisect.bisect_left(addrs, lo), bisect.bisect_left(addrs, hi)
    return [recs[j] for j in range(a, b)]


# -- the bytes of every alternative ------------------------------------------------------


def compute(lst: Listing, lines: bool = True) -> None:
    """Every listed site's bytes and layout for every alternative (lst.columns) and,
    with `lines`, its source line from DWARF (the last thing that can refuse the image)."""
    if lines:
        addrs = lst.chk.site_addrs
        lst.lines = site_lines(lst.img, [addrs[i] for i in lst.order],
                               site_functions(lst.t.meta))
    lst.cache = LayoutCache(Decoder(lst.img.bits))
    per_site = len(lst.order) * _PER_SITE_SHARE < lst.t.n_sites
    sp = Splicer(lst.t, lst.chk)
    lst.columns = [_column(lst, sp, k, per_site) for k in range(lst.t.n_alts)]


def _column(lst: Listing, sp: Splicer, k: int, per_site: bool) -> Column:
    t = lst.t
    buf = None
    if not per_site and lst.order:
        buf = mmap.mmap(-1, len(lst.img.data))  # untouched pages cost nothing
        try:
            sp.apply(buf, (k,) * len(t.meta.ops))
        except BadInput:
            buf.close()
            buf = None  # some site cannot take it: place site by site, saying where
    try:
        return _fill(lst, sp, k, buf)
    finally:
        if buf is not None:
            buf.close()
        _forget_body_addrs(lst.chk)


def _fill(lst: Listing, sp: Splicer, k: int, buf: mmap.mmap | None) -> Column:
    """Alternative k's bytes (from `buf`, else placed site by site) and layouts."""
    assert lst.cache is not None
    cache = lst.cache
    find, add = cache.find, cache.add
    sites = lst.chk.site_addrs
    shapes, shape_of = lst.shapes, lst.shape_of
    sizes = [sh.size for sh in shapes]
    seg = lst.chk.exec_seg
    sdelta = seg.vaddr - seg.offset if seg is not None else None
    total = sum(sizes[shape_of[i]] for i in lst.order) if lst.filtered else \
        sum(sizes[n] * c for n, c in Counter(shape_of).items())
    # Allocated once (no regrowth): a million sites' columns must not fragment the heap.
    data = bytearray(total)
    ids = array("i", bytes(4 * len(lst.order)))
    errors: dict[int, str] = {}
    tables_k = [cache.entries(n, k) for n in range(len(shapes))]
    present = [sh.present[k] for sh in shapes]
    pos = 0
    for j, i in enumerate(lst.order):
        n = shape_of[i]
        size = sizes[n]
        end = pos + size
        if not present[n]:
            ids[j] = ABSENT
            pos = end
            continue
        s = sites[i]
        body_len = -1
        if buf is not None:
            so = s - sdelta if sdelta is not None else lst.site_offset(i)
            want = buf[so:so + size]
        else:
            try:
                want, body_len = sp.placed(i, k)
            except BadInput as exc:
                errors[j] = exc.message.split(": ", 1)[-1]
                ids[j] = UNPLACED
                pos = end
                continue
        data[pos:end] = want
        got = find(tables_k[n], want)
        if got < 0:
            if body_len < 0:
                body_len = sp.placed(i, k)[1]
            got = add(n, k, want, s, body_len)
        ids[j] = got
        pos = end
    return Column(data, ids, errors)


def _forget_body_addrs(chk: tables.Checked) -> None:
    """Drop the per-record body address lists splicing built (a million-element list
    per alternative, kept by Checked): each column needs them only while it is made."""
    cached = getattr(chk, "_bodies", None)
    if isinstance(cached, dict):
        cached.clear()


# -- totals ------------------------------------------------------------------------------


@dataclass
class OpTotal:
    sites: int = 0
    bytes: int = 0
    padding: dict[int, int] = field(default_factory=dict)  # alternative -> bytes


def totals(lst: Listing) -> tuple[dict[int, OpTotal], dict[int, int]]:
    """Per op (in the header's order, listed sites only): sites, bytes, padding per
    alternative; and per alternative the padding over all ops."""
    assert lst.cache is not None
    cache = lst.cache
    per_shape = Counter(lst.shape_of) if not lst.filtered and isinstance(lst.shape_of, bytes) \
        else Counter(lst.shape_of[i] for i in lst.order)
    ops: dict[int, OpTotal] = {}
    for n in sorted(per_shape, key=lambda n: lst.shapes[n].op):
        sh = lst.shapes[n]
        tot = ops.setdefault(sh.op, OpTotal())
        tot.sites += per_shape[n]
        tot.bytes += per_shape[n] * sh.size
    for k, col in enumerate(lst.columns):
        for lid, count in Counter(col.ids).items():
            if lid >= 0:
                sh = lst.shapes[cache.owners[lid]]
                tot = ops[sh.op]
                tot.padding[k] = tot.padding.get(k, 0) + \
                    count * (sh.size - cache.layouts[lid].body_len)
    backends: dict[int, int] = {}
    for tot in ops.values():
        tot.padding = dict(sorted(tot.padding.items()))
        for k, v in tot.padding.items():
            backends[k] = backends.get(k, 0) + v
    return dict(sorted(ops.items())), dict(sorted(backends.items()))
