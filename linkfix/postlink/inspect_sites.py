"""What `linkfix inspect` lists: the sites chosen, and each one's bytes per alternative.

The listing is streamed in address order, a block of sites at a time
(`blocks`, `columns`): for each block, every alternative's bytes at each site
are made as `linkfix patch` writes them (the op's copy with its one PC-relative
field re-aimed from the site, or a branch's jump to its label) in one C-level
pass per record shape; a copy with several fields, and a site where a copy
cannot be placed, take `Splicer.placed` one by one (such a site then says why).
Each site's bytes are looked up in the layout cache (inspect_disasm.py): a
capstone decode happens once per distinct layout, not per site. Nothing of a
site outlives its block: the totals are counted as the blocks go by, and a
mapped image's pages are handed back behind them.

Everything that can refuse the image happens in `load`, `select` and `compute`,
before the first line is printed.
"""

from __future__ import annotations

import bisect
import operator
import re
import struct
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, repeat

from linkfix import layout
from linkfix.errors import BadInput
from linkfix.postlink import image, tables
from linkfix.postlink.inspect_disasm import Decoder, LayoutCache
from linkfix.postlink.inspect_dwarf import site_functions, site_lines
from linkfix.postlink.siteranges import positions
from linkfix.postlink.splice import Splicer, Template, only

ABSENT, UNPLACED = -1, -2  # layout ids of an alternative without a body / that fails here
_BLOCK = 4096  # listed sites per block
_HEX = re.compile(r"(0[xX])?[0-9a-fA-F]+")

# Alternative k's bytes at sites of one shape: (addresses, record indices) -> bytes per
# site; struct.error when one of them cannot be placed.
Placer = Callable[[list[int], list[int]], list[bytes]]


@dataclass(frozen=True)
class ShapeInfo:
    """A record shape (one per op: shape n is op n), as the listing needs it."""

    op: int
    size: int
    branch: bool
    present: tuple[bool, ...]  # per alternative
    body_len: tuple[int, ...]  # per alternative: bytes of body, the rest is padding


@dataclass
class Column:
    """Alternative k at the sites of a block, in listing order."""

    ids: list[int]  # layout id per site, or ABSENT / UNPLACED
    wants: list[bytes | str]  # the site's bytes (b"" when absent), or why it cannot be placed


@dataclass
class Listing:
    img: image.Image
    t: tables.Tables
    chk: tables.Checked
    shapes: list[ShapeInfo]
    order: Sequence[int] | None = None  # listed record indices by address; None: all
    filtered: bool = False
    cache: LayoutCache | None = None
    lines: dict[int, str] = field(default_factory=dict)  # site address -> file:line
    by_address: tuple[Sequence[int], Sequence[int]] | None = None  # see _by_address
    placers: dict[tuple[int, int], Placer | None] = field(default_factory=dict)
    # (shape, alternative) -> listed sites that got its bytes; complete once `streamed`
    placed: Counter[tuple[int, int]] = field(default_factory=Counter)
    streamed: bool = False

    @property
    def path(self) -> str:
        return self.img.path

    @property
    def shape_of(self) -> Sequence[int]:
        """The shape of every record (its op)."""
        return self.chk.site_ops

    @property
    def n_listed(self) -> int:
        return self.t.n_sites if self.order is None else len(self.order)

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
    img = image.load(path, mapped=True)  # only the pages looked at, and not for long
    if img.reader == "hand":
        img.index_symbols()  # (lief's symbols are compared with the raw ones when listed)
    t = tables.load(img)
    chk = tables.check_records(t)
    assert sorted(chk.shapes) == list(range(len(chk.shapes)))  # shape n is op n
    shapes = [ShapeInfo(sh.op, sh.site_len, sh.kind == layout.KIND_BRANCH,
                        tuple(a.present for a in sh.alts),
                        tuple(t.meta.alt(sh.op, k).body_len if a.present else 0
                              for k, a in enumerate(sh.alts)))
              for sh in (chk.shapes[op] for op in range(len(chk.shapes)))]
    lst = Listing(img, t, chk, shapes)
    if not (chk.op_sorted and chk.br_sorted):  # records out of address order (rare)
        lst.order = array("L", sorted(range(t.n_sites), key=chk.site_addrs.__getitem__))
    return lst


def blocks(lst: Listing) -> Iterator[list[int]]:
    """The listed record indices in address order, a block at a time."""
    if lst.order is not None:
        order = lst.order
        for a in range(0, len(order), _BLOCK):
            yield list(order[a:a + _BLOCK])
        return
    chk = lst.chk
    n, n_op = lst.t.n_sites, chk.n_op
    if n_op in (0, n):
        for a in range(0, n, _BLOCK):
            yield list(range(a, min(n, a + _BLOCK)))
        return
    # Op and branch records are each in address order: at[j] op sites lie before
    # branch site j, which is listed in the block of op site at[j] (the last block
    # when it follows every op site).
    at = positions(chk.op_view(0, n_op), chk.op_view(n_op))
    key = chk.site_addrs.__getitem__
    j = 0
    for a in range(0, n_op, _BLOCK):
        e = min(n_op, a + _BLOCK)
        jb = bisect.bisect_left(at, e) if e < n_op else len(at)
        # Two sorted runs: sorting them is one merge.
        yield sorted(chain(range(a, e), range(n_op + j, n_op + jb)), key=key)
        j = jb


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
        shape_of = lst.shape_of
        if keep is None:
            if isinstance(shape_of, bytes):
                mask = shape_of.translate(ok_shape.ljust(256, b"\0"))
            else:
                mask = bytes(ok_shape[x] for x in shape_of)
            keep = set(compress(range(lst.t.n_sites), mask))
        else:
            keep = {i for i in keep if ok_shape[shape_of[i]]}
    assert keep is not None
    lst.order = sorted(keep, key=lst.chk.site_addrs.__getitem__)
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
        order = [i for block in blocks(lst) for i in block]
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
    """With `lines`, every listed site's source line from DWARF (the last thing that
    can refuse the image); the layout cache the listing fills as it goes."""
    if lines:
        addrs = lst.chk.site_addrs
        listed = iter(addrs) if lst.order is None else map(addrs.__getitem__, lst.order)
        lst.lines = site_lines(lst.img, listed, site_functions(lst.t.meta))
    lst.cache = LayoutCache(Decoder(lst.img.bits))


def columns(lst: Listing, layouts: bool = True) -> Iterator[tuple[list[int], list[Column]]]:
    """Per block of listed sites (address order): its record indices, and every
    alternative's bytes and layout id there (without `layouts`: ids only say
    ABSENT, UNPLACED or 0). Counts `lst.placed` as it goes."""
    assert lst.cache is not None
    sp = Splicer(lst.t, lst.chk)
    n_alts = lst.t.n_alts
    addr_of = lst.chk.site_addrs.__getitem__
    shape_of = lst.shape_of
    for block in blocks(lst):
        addrs = list(map(addr_of, block))
        cols = [Column([ABSENT] * len(block), [b""] * len(block)) for _k in range(n_alts)]
        for n, pos in _by_shape(shape_of, block):
            recs = list(map(block.__getitem__, pos))
            at = list(map(addrs.__getitem__, pos))
            for k in range(n_alts):
                if lst.shapes[n].present[k]:
                    _fill(lst, sp, cols[k], n, k, pos, recs, at, layouts)
        yield block, cols
    lst.streamed = True


def _by_shape(shape_of: Sequence[int], block: list[int]) -> list[tuple[int, list[int]]]:
    """(shape, the positions in `block` of its sites), per shape the block holds."""
    if isinstance(shape_of, bytes):
        shp = bytes(map(shape_of.__getitem__, block))
        return [(n, list(compress(range(len(block)), shp.translate(only(n)))))
                for n in sorted(set(shp))]
    out: dict[int, list[int]] = {}
    for p, i in enumerate(block):
        out.setdefault(shape_of[i], []).append(p)
    return sorted(out.items())


def _fill(lst: Listing, sp: Splicer, col: Column, n: int, k: int, pos: list[int],
          recs: list[int], at: list[int], layouts: bool) -> None:
    """Alternative k's bytes and layouts at the sites of shape n at positions `pos`."""
    got = _place(lst, sp, n, k, recs, at)
    ids, wants = col.ids, col.wants
    placed = 0
    cache = lst.cache
    assert cache is not None
    entries = cache.entries(n, k)
    find, add = cache.find, cache.add
    body_len = lst.shapes[n].body_len[k]
    prev: bytes | str | None = None
    lid = 0
    for p, want, s in zip(pos, got, at, strict=True):
        wants[p] = want
        if isinstance(want, str):
            ids[p] = UNPLACED
            continue
        placed += 1
        if layouts and want is not prev:  # a constant copy is one object: one look-up
            lid = find(entries, want)
            if lid < 0:
                lid = add(n, k, want, s, body_len)
            prev = want
        ids[p] = lid
    lst.placed[(n, k)] += placed


def _place(lst: Listing, sp: Splicer, n: int, k: int, recs: list[int], at: list[int]
           ) -> list[bytes] | list[bytes | str]:
    """Alternative k's bytes at sites `recs` (addresses `at`) of shape n; where it
    cannot be placed, why (the splicer's message, site by site)."""
    key = (n, k)
    if key not in lst.placers:
        lst.placers[key] = _placer(lst, sp, n, k)
    f = lst.placers[key]
    if f is not None:
        try:
            return f(at, recs)
        except struct.error:
            pass
    out: list[bytes | str] = []
    for i in recs:
        try:
            out.append(sp.placed(i, k)[0])
        except BadInput as exc:
            out.append(exc.message.split(": ", 1)[-1])
    return out


def _placer(lst: Listing, sp: Splicer, op: int, k: int) -> Placer | None:
    """C-level passes making alternative k's bytes at sites of `op` (None: one field
    is not enough, the sites take Splicer.placed one by one)."""
    copy = sp.copy(op, k)
    mask = sp.mask
    if copy.per_site:  # a branch's jump: e9, then its label less the end of the site
        targets = lst.chk.gens if k == 0 else lst.chk.yeses
        n_op = lst.chk.n_op
        jmp = struct.Struct("<BI" if sp.wraps else "<Bi")

        def jumps(at: list[int], recs: list[int]) -> list[bytes]:
            to = map(targets.__getitem__, map(operator.sub, recs, repeat(n_op)))
            return list(map(jmp.pack, repeat(0xE9), map(operator.and_, map(
                operator.sub, to, map(operator.add, at, repeat(5))), repeat(mask))))
        return jumps
    if not copy.pcrel:
        return lambda at, _recs: [copy.code] * len(at)
    tpl = Template(copy, sp.wraps)
    if not tpl.single:
        return None
    pack, head, tail = tpl.site.pack, tpl.head, tpl.tail
    return lambda at, _recs: list(map(pack, repeat(head), tpl.values(at), repeat(tail)))


# -- totals ------------------------------------------------------------------------------


@dataclass
class OpTotal:
    sites: int = 0
    bytes: int = 0
    padding: dict[int, int] = field(default_factory=dict)  # alternative -> bytes


def totals(lst: Listing) -> tuple[dict[int, OpTotal], dict[int, int]]:
    """Per op (in the header's order, listed sites only): sites, bytes, padding per
    alternative; and per alternative the padding over all ops."""
    if not lst.streamed:  # --summary: count what each alternative can be placed at
        for _block, _cols in columns(lst, layouts=False):
            pass
    per_shape = lst.chk.shape_counts() if lst.order is None or not lst.filtered \
        else Counter(map(lst.shape_of.__getitem__, lst.order))
    ops: dict[int, OpTotal] = {}
    for n in sorted(per_shape, key=lambda n: lst.shapes[n].op):
        sh = lst.shapes[n]
        tot = ops.setdefault(sh.op, OpTotal())
        tot.sites += per_shape[n]
        tot.bytes += per_shape[n] * sh.size
    for (n, k), count in sorted(lst.placed.items()):
        if count:
            sh = lst.shapes[n]
            tot = ops[sh.op]
            tot.padding[k] = tot.padding.get(k, 0) + count * (sh.size - sh.body_len[k])
    backends: dict[int, int] = {}
    for tot in ops.values():
        tot.padding = dict(sorted(tot.padding.items()))
        for k, v in tot.padding.items():
            backends[k] = backends.get(k, 0) + v
    return dict(sorted(ops.items())), dict(sorted(backends.items()))
