"""Find, parse and validate the linkfix tables of a linked image (docs/FORMAT.md).

Every record is validated before anything is written (`check_records`): the
records are read as columns in records.py, where the sites lie and where the
branch sites jump is checked in siteranges.py, and the stored copies, one per
op and alternative, in copies.py. What they establish is kept in `Checked`,
compactly: an image may hold a million sites, so a column is an `array` or
`bytes` (a few bytes a site), never a list of int objects.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from linkfix import layout
from linkfix.errors import BadInput
from linkfix.postlink import copies, header, records, siteranges
from linkfix.postlink.image import Image, Segment
from linkfix.postlink.records import site_error

__all__ = ["Checked", "Region", "Shape", "Tables", "check_records", "load", "site_error",
           "table_ranges"]

META_START, META_END = "__linkfix_meta_start", "__linkfix_meta_end"
SITES_START, SITES_END = "__linkfix_sites_start", "__linkfix_sites_end"
BRANCHES_START, BRANCHES_END = "__linkfix_branches_start", "__linkfix_branches_end"
REPL_START, REPL_END = "__linkfix_repl_start", "__linkfix_repl_end"


@dataclass(frozen=True)
class Region:
    """A table in the image: virtual address, file offset, size."""

    vaddr: int
    offset: int
    size: int


class Alt:
    """One alternative of an op: its copy's length and flags. (Plain classes here:
    a dataclass costs a millisecond to make at every start.)"""

    __slots__ = ("len", "flags")

    def __init__(self, len: int, flags: int) -> None:  # noqa: A002 - the field's name
        self.len, self.flags = len, flags

    @property
    def present(self) -> bool:
        return bool(self.flags & layout.FLAG_PRESENT)


class Shape:
    """What every site of one op shares: its length, kind and alternatives."""

    __slots__ = ("op", "site_len", "kind", "alts")

    def __init__(self, op: int, site_len: int, kind: int, alts: tuple[Alt, ...]) -> None:
        self.op, self.site_len, self.kind = op, site_len, kind
        self.alts = alts  # index k = alternative k (0 generic)

    def present_mask(self) -> int:
        return sum(1 << k for k, a in enumerate(self.alts) if a.present)


class Tables:
    """The image's tables, located and their header parsed (`load`)."""

    def __init__(self, image: Image, meta: layout.Meta, meta_region: Region,
                 sites_region: Region, branches_region: Region,
                 repl_region: Region | None) -> None:
        self.image, self.meta, self.meta_region = image, meta, meta_region
        self.sites_region, self.branches_region = sites_region, branches_region
        self.repl_region = repl_region

    @property
    def n_op_sites(self) -> int:
        return self.sites_region.size // layout.SITE_REC_SIZE

    @property
    def n_branch_sites(self) -> int:
        return self.branches_region.size // layout.BRANCH_REC_SIZE

    @property
    def n_sites(self) -> int:
        return self.n_op_sites + self.n_branch_sites

    @property
    def n_backends(self) -> int:
        return len(self.meta.backends)

    @property
    def n_alts(self) -> int:
        return len(self.meta.backends) + 1

    def op_name(self, op: int) -> str:
        return self.meta.ops[op] if 0 <= op < len(self.meta.ops) else f"op#{op}"

    def alt_name(self, k: int) -> str:
        return "generic" if k == 0 else self.meta.backends[k - 1]



# -- locating and parsing --------------------------------------------------------------------


def _region(img: Image, section: str, start: str, end: str, required: bool,
            recorded: tuple[int, int] | None = None) -> Region | None:
    """Where a table lies, by every description the image has; they must all agree.

    A section header, the linker script's start/end symbols and (for sites and
    bodies) the bounds the header recorded at link time: a table that one of
    them describes shorter would have sites patched silently short.
    """
    seen: list[tuple[str, int, int]] = []
    sec = img.section(section)
    if sec is not None and sec.addr:
        seen.append((f"section {section}", sec.addr, sec.size))
    lo, hi = img.symbol_value(start), img.symbol_value(end)
    if lo is not None and hi is not None:
        if hi < lo:
            raise BadInput(img.path, f"{start}..{end}: end before start")
        seen.append((f"{start}..{end}", lo, hi - lo))
    if recorded is not None:
        if recorded[1] < recorded[0]:
            raise BadInput(img.path, f"{layout.META_SECTION}: recorded bounds of {section} "
                                     "end before they start")
        seen.append((f"the bounds in {layout.META_SECTION}", recorded[0],
                     recorded[1] - recorded[0]))
    if not seen:
        if not required:
            return None
        raise BadInput(img.path, f"no linkfix tables: neither a {section} section nor "
                                 f"{start}/{end} symbols (was the image linked with "
                                 "linkfix.lds?)")
    how, vaddr, size = seen[0]
    for other, v, n in seen[1:]:
        if (v, n) != (vaddr, size):
            raise BadInput(img.path, f"{section}: {how} gives {vaddr:#x} ({size} bytes) but "
                                     f"{other} gives {v:#x} ({n} bytes)")
    if size == 0:
        return Region(vaddr, 0, 0)
    off = img.offset_of(vaddr, size)
    if off is None:
        raise BadInput(img.path, f"{how} at {vaddr:#x} is not file-backed in a PT_LOAD segment")
    return Region(vaddr, off, size)


def load(img: Image) -> Tables:
    meta_r = _region(img, layout.META_SECTION, META_START, META_END, True)
    assert meta_r is not None
    meta = header.parse_meta(img, meta_r)
    b = meta.bounds
    assert b is not None
    sites_r = _region(img, layout.SITES_SECTION, SITES_START, SITES_END, True, (b[0], b[1]))
    branches_r = _region(img, layout.BRANCHES_SECTION, BRANCHES_START, BRANCHES_END, False,
                         (b[2], b[3])) or Region(0, 0, 0)
    assert sites_r is not None
    repl_r = _region(img, layout.REPL_SECTION, REPL_START, REPL_END, False, (b[4], b[5]))
    for name, r, size in ((layout.SITES_SECTION, sites_r, layout.SITE_REC_SIZE),
                          (layout.BRANCHES_SECTION, branches_r, layout.BRANCH_REC_SIZE)):
        if r.size % size:
            raise BadInput(img.path, f"{name}: {r.size} bytes is not a multiple of the "
                                     f"{size}-byte record")
        if r.vaddr % 4:
            raise BadInput(img.path, f"{name}: not 4-byte aligned")
    _check_table_placement(img, meta_r, sites_r, repl_r, branches_r)
    for name, r in ((layout.META_SECTION, meta_r), (layout.SITES_SECTION, sites_r),
                    (layout.BRANCHES_SECTION, branches_r), (layout.REPL_SECTION, repl_r)):
        if r is None or not r.size:
            continue
        for what, lo, hi in img.ambiguous_ranges:
            if r.vaddr < hi and lo < r.vaddr + r.size:
                raise BadInput(img.path, f"{name} at {r.vaddr:#x} lies where {what}")
    return Tables(img, meta, meta_r, sites_r, branches_r, repl_r)


def table_ranges(meta_r: Region, sites_r: Region, repl_r: Region | None,
                 branches_r: Region | None = None) -> list[tuple[str, int, int]]:
    """(name, file offset, size) of every non-empty table."""
    out = [(layout.META_SECTION, meta_r.offset, meta_r.size),
           (layout.SITES_SECTION, sites_r.offset, sites_r.size)]
    if branches_r is not None:
        out.append((layout.BRANCHES_SECTION, branches_r.offset, branches_r.size))
    if repl_r is not None:
        out.append((layout.REPL_SECTION, repl_r.offset, repl_r.size))
    return [r for r in out if r[2]]


def _check_table_placement(img: Image, meta_r: Region, sites_r: Region,
                           repl_r: Region | None, branches_r: Region) -> None:
    """The tables do not overlap each other, the ELF headers or unloaded sections.

    `patch` writes the state record in .linkfix.meta while reading the other
    tables: overlapping structures would make the output disagree with itself.
    """
    mine = table_ranges(meta_r, sites_r, repl_r, branches_r)
    for j, (name, off, size) in enumerate(mine):
        for other, o_off, o_size in mine[j + 1:] + img.guarded_ranges():
            if off < o_off + o_size and o_off < off + size:
                raise BadInput(img.path, f"{name} (file offset {off:#x}, {size} bytes) "
                                         f"overlaps {other}")


# -- record validation -----------------------------------------------------------------------


class Checked:
    """The result of validating every record and copy, reused by splicing.

    Sites are numbered op records first, then branch records, each in table order.
    The per-site columns are arrays or bytes (records.py): index them, iterate
    them, `map` over them; never copy them into lists. (A plain class: a dataclass
    costs a millisecond to make at every start.)
    """

    def __init__(self, t: Tables, shapes: dict[int, Shape],
                 copies: dict[tuple[int, int], copies.Copy]) -> None:
        self.t = t
        self.shapes = shapes  # op -> what all its sites share
        self.copies = copies  # (op, k) -> the checked copy
        self.site_addrs: Sequence[int] = ()  # per site: array('Q')
        self.site_ops: Sequence[int] = b""  # per site: bytes when every op is < 256
        self.site_lens = b""  # per site
        self.n_op = 0  # the op sites come first, then the branch sites
        self.gens: Sequence[int] = ()  # per branch site: its generic target
        self.yeses: Sequence[int] = ()  # per branch site: its "true" target
        self.op_sorted = True  # the op records are in address order (as linked)
        self.br_sorted = True  # the branch records are in address order
        self.exec_seg: Segment | None = None  # the one executable segment holding every site
        self._counts: dict[int, int] | None = None

    def shape_of(self, i: int) -> Shape:
        return self.shapes[self.site_ops[i]]

    def shape_counts(self) -> Counter[int]:
        """Op -> its number of sites, for the ops that have sites, in op order."""
        if self._counts is None:
            ops = self.site_ops
            if isinstance(ops, bytes):
                self._counts = {op: ops.count(op)
                                for op in records.distinct(ops, len(self.shapes))}
            else:
                self._counts = dict(sorted(Counter(ops).items()))
        return Counter(self._counts)

    def present_by_op(self) -> dict[int, int]:
        """Op -> bit mask of the alternatives its sites carry (ops that have sites)."""
        ops = self.site_ops
        have = records.distinct(ops, len(self.shapes)) if isinstance(ops, bytes) else \
            self.shape_counts()
        return {op: self.shapes[op].present_mask() for op in have}

    def branch_targets(self, i: int) -> tuple[int, int]:
        """(generic, true) targets of site i, a branch site."""
        j = i - self.n_op
        return self.gens[j], self.yeses[j]

    def op_view(self, lo: int = 0, hi: int | None = None) -> Sequence[int]:
        """site_addrs[lo:hi] without copying it."""
        return records.view(self.site_addrs, lo, len(self.site_addrs) if hi is None else hi)


def _shapes(t: Tables) -> dict[int, Shape]:
    meta = t.meta
    out = {}
    for op in range(len(meta.ops)):
        alts = tuple(Alt(meta.alt(op, k).digest.length, meta.alt(op, k).flags)
                     for k in range(t.n_alts))
        kind = layout.KIND_OP if op < meta.n_real_ops else layout.KIND_BRANCH
        out[op] = Shape(op, alts[0].len, kind, alts)
    return out


def check_records(t: Tables) -> Checked:
    img = t.image
    repl = (t.repl_region.vaddr, t.repl_region.vaddr + t.repl_region.size) \
        if t.repl_region is not None else None
    chk = Checked(t, _shapes(t), copies.check_all(img, t.meta, repl))
    addrs, op_ops, op_lens = records.op_records(t, chk.shapes)
    n_op, n_br = t.n_op_sites, t.n_branch_sites
    addrs, br_ops, gens, yeses = records.branch_records(t, addrs)
    chk.site_addrs, chk.n_op, chk.gens, chk.yeses = addrs, n_op, gens, yeses
    chk.site_ops = op_ops + br_ops if isinstance(op_ops, bytes) and \
        isinstance(br_ops, bytes) else list(op_ops) + list(br_ops)
    chk.site_lens = op_lens + bytes([5]) * n_br
    chk.op_sorted = siteranges.sorted_disjoint(chk.op_view(0, n_op), op_lens)
    chk.br_sorted = siteranges.sorted_disjoint(chk.op_view(n_op), bytes([5]) * n_br)
    chk.exec_seg = siteranges.check_site_ranges(t, addrs, chk.site_lens, chk.site_ops, n_op,
                                                chk.op_sorted, chk.br_sorted)
    siteranges.check_branch_targets(t, chk.exec_seg, addrs, chk.site_lens, n_op,
                                    chk.site_ops[n_op:], gens, yeses, chk.op_sorted,
                                    chk.br_sorted)
    return chk
