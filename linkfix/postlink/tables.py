"""Find, parse and validate the linkfix tables of a linked image (docs/FORMAT.md).

Every record is validated before anything is written. An image may hold a
million sites, so the checks run over whole columns of the record tables
(strided memoryviews, `bytes.translate`, `map`, `min`/`max`) instead of a
Python loop per record; only a failing check falls back to a scan that names
the first offending site. The stored copies, one per op and alternative, are
checked in copies.py.
"""

from __future__ import annotations

import bisect
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import compress, islice, repeat

from linkfix import layout
from linkfix.errors import BadInput
from linkfix.postlink import copies, header
from linkfix.postlink.image import Image, Segment

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


@dataclass(frozen=True)
class Alt:
    len: int
    flags: int

    @property
    def present(self) -> bool:
        return bool(self.flags & layout.FLAG_PRESENT)


@dataclass(frozen=True)
class Shape:
    """What every site of one op shares: its length, kind and alternatives."""

    op: int
    site_len: int
    kind: int
    alts: tuple[Alt, ...]  # index k = alternative k (0 generic)

    def present_mask(self) -> int:
        return sum(1 << k for k, a in enumerate(self.alts) if a.present)


@dataclass
class Tables:
    image: Image
    meta: layout.Meta
    meta_region: Region
    sites_region: Region
    branches_region: Region
    repl_region: Region | None

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

    def region_bytes(self, r: Region) -> bytes:
        return bytes(self.image.data[r.offset:r.offset + r.size])


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


@dataclass
class Checked:
    """The result of validating every record and copy, reused by splicing.

    Sites are numbered op records first, then branch records, each in table order.
    """

    t: Tables
    shapes: dict[int, Shape]  # op -> what all its sites share
    copies: dict[tuple[int, int], copies.Copy]  # (op, k) -> the checked copy
    site_addrs: list[int] = field(default_factory=list)  # per site
    site_ops: Sequence[int] = ()  # per site
    site_lens: bytes = b""  # per site
    groups: dict[int, list[int]] = field(default_factory=dict)  # op -> its op sites' addresses
    # branch op -> (sites, generic targets, "true" targets)
    branch_groups: dict[int, tuple[list[int], list[int], list[int]]] = \
        field(default_factory=dict)
    exec_seg: Segment | None = None  # the one executable segment holding every site

    def shape_of(self, i: int) -> Shape:
        return self.shapes[self.site_ops[i]]

    def shape_counts(self) -> Counter[int]:
        out: Counter[int] = Counter()
        for op, addrs in self.groups.items():
            out[op] += len(addrs)
        for op, (addrs, _g, _y) in self.branch_groups.items():
            out[op] += len(addrs)
        return out

    def present_by_op(self) -> dict[int, int]:
        """Op -> bit mask of the alternatives its sites carry (ops that have sites)."""
        return {op: self.shapes[op].present_mask() for op in self.shape_counts()}

    def branch_targets(self, i: int) -> tuple[int, int]:
        """(generic, true) targets of site i, a branch site."""
        j = i - self.t.n_op_sites
        v = self.t.branches_region.vaddr + j * layout.BRANCH_REC_SIZE
        _s, g, y, _op, _n, _k, _g2, _y2 = layout.BRANCH.unpack_from(self.t.region_bytes(
            self.t.branches_region), j * layout.BRANCH_REC_SIZE)
        return v + 4 + g, v + 8 + y


def site_error(t: Tables, addr: int, op: int, msg: str) -> BadInput:
    return BadInput(t.image.path, f"site {addr:#x} ({t.op_name(op)}): {msg}")


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
    op_sites, op_ops, op_lens = _op_records(t, chk)
    br_sites, br_ops, gens, yeses = _branch_records(t)
    chk.site_addrs = op_sites + br_sites
    chk.site_ops = _Concat(op_ops, br_ops)
    chk.site_lens = op_lens + bytes([5]) * len(br_sites)
    op_sorted = _sorted_disjoint(op_sites, op_lens)
    br_sorted = _sorted_disjoint(br_sites, bytes([5]) * len(br_sites))
    chk.exec_seg = _check_site_ranges(t, op_sites, op_lens, op_ops, br_sites, br_ops,
                                      op_sorted and br_sorted)
    _check_branch_targets(t, chk, br_sites, br_ops, gens, yeses, op_sites, op_lens, op_sorted,
                          br_sorted)
    chk.groups = _group(op_sites, op_ops)
    for op, (s_, g_, y_) in _group_branches(br_sites, br_ops, gens, yeses).items():
        chk.branch_groups[op] = (s_, g_, y_)
    return chk


def _op_column(mv: memoryview, at: int, stride: int, n: int) -> bytes | list[int]:
    """The u16 op field of every record: bytes (C-speed masks) when every op is < 256."""
    lo, hi = bytes(mv[at::stride]), bytes(mv[at + 1::stride])
    if hi.count(0) == n:
        return lo
    return list(mv[at:].cast("H")[::stride // 2]) if at % 2 == 0 else \
        [a | b << 8 for a, b in zip(lo, hi, strict=True)]


_OP_CHECK = bytes(layout.op_check(x) for x in range(256))


def _op_records(t: Tables, chk: Checked) -> tuple[list[int], bytes | list[int], bytes]:
    """Addresses, ops and lengths of the op site records, validated."""
    r = t.sites_region
    n = t.n_op_sites
    raw = t.region_bytes(r)
    mv = memoryview(raw)
    ops = _op_column(mv, 4, 8, n)
    lens = bytes(mv[6::8])
    kinds = bytes(mv[7::8])
    addrs = list(map(operator.add, mv.cast("i")[0::2], range(r.vaddr, r.vaddr + 8 * n, 8))) \
        if n else []
    n_real = t.meta.n_real_ops
    want = bytes(chk.shapes[op].site_len for op in range(n_real))
    bad = None
    if n and max(ops) >= n_real:
        bad = next(j for j, op in enumerate(ops) if op >= n_real)
    elif isinstance(ops, bytes) and kinds != ops.translate(_OP_CHECK):
        bad = next(j for j, (op, k) in enumerate(zip(ops, kinds, strict=True))
                   if k != layout.op_check(op))
    elif not isinstance(ops, bytes) and any(k != layout.op_check(op)
                                            for op, k in zip(ops, kinds, strict=True)):
        bad = next(j for j, (op, k) in enumerate(zip(ops, kinds, strict=True))
                   if k != layout.op_check(op))
    elif isinstance(ops, bytes) and lens != ops.translate(want + bytes(256 - n_real)):
        bad = next(j for j, (op, ln) in enumerate(zip(ops, lens, strict=True))
                   if ln != want[op])
    elif not isinstance(ops, bytes) and any(ln != want[op]
                                            for op, ln in zip(ops, lens, strict=True)):
        bad = next(j for j, (op, ln) in enumerate(zip(ops, lens, strict=True))
                   if ln != want[op])
    if bad is not None:
        op, ln, kind = ops[bad], lens[bad], kinds[bad]
        if op >= n_real:
            msg = f"op index {op} is not an op (n_real_ops {n_real})" if op >= len(
                t.meta.ops) else f"op {t.op_name(op)} is a branch op in an op site record"
        elif kind != layout.op_check(op):
            msg = f"check byte {kind:#04x} does not repeat the op (expected " \
                  f"{layout.op_check(op):#04x}): the record is corrupt"
        else:
            msg = f"site_len {ln} where the op's copies are {want[op]} bytes"
        raise site_error(t, addrs[bad], op, msg)
    return addrs, ops, lens


def _branch_records(t: Tables) -> tuple[list[int], bytes | list[int], list[int], list[int]]:
    r = t.branches_region
    n = t.n_branch_sites
    if not n:
        return [], [], [], []
    raw = t.region_bytes(r)
    mv = memoryview(raw)
    ints = mv.cast("i")
    rs = layout.BRANCH_REC_SIZE
    base = range(r.vaddr, r.vaddr + rs * n, rs)
    w = rs // 4
    sites = list(map(operator.add, ints[0::w], base))
    gens = list(map(operator.add, ints[1::w], range(r.vaddr + 4, r.vaddr + 4 + rs * n, rs)))
    yeses = list(map(operator.add, ints[2::w], range(r.vaddr + 8, r.vaddr + 8 + rs * n, rs)))
    ops = _op_column(mv, 12, rs, n)
    tested = bytes(mv[14::rs])
    kinds = bytes(mv[15::rs])
    _check_repeated_targets(t, sites, ops, gens, ints[4::w], r.vaddr + 16, "generic")
    _check_repeated_targets(t, sites, ops, yeses, ints[5::w], r.vaddr + 20, '"true"')
    n_real, n_ops = t.meta.n_real_ops, len(t.meta.ops)
    # The backend byte repeats what the op says (op = n_real_ops + backend - 1): one
    # changed without the other is corruption, not a different branch.
    agree = isinstance(ops, bytes) and n_real < 256 and \
        ops.translate(bytes((x - n_real + 1) & 0xFF for x in range(256))) == tested
    if min(ops) < n_real or max(ops) >= n_ops or not agree or \
            kinds.count(layout.KIND_BRANCH) != n:
        j = next(j for j in range(n) if not n_real <= ops[j] < n_ops
                 or tested[j] != ops[j] - n_real + 1 or kinds[j] != layout.KIND_BRANCH)
        raise site_error(t, sites[j], ops[j], f"bad branch record (op {ops[j]}, backend "
                                              f"{tested[j]}, kind {kinds[j]})")
    return sites, ops, gens, yeses


def _check_repeated_targets(t: Tables, sites: list[int], ops: bytes | list[int],
                            targets: list[int], again: memoryview, at: int, what: str) -> None:
    """A branch record names each label twice: both words must lead to one address."""
    rs = layout.BRANCH_REC_SIZE
    second = list(map(operator.add, again, range(at, at + rs * len(targets), rs)))
    if second != targets:
        j = next(j for j, (x, y) in enumerate(zip(targets, second, strict=True)) if x != y)
        raise site_error(t, sites[j], ops[j], f"bad branch record: its {what} target is "
                                              f"{targets[j]:#x} and, repeated, {second[j]:#x}")


def _masks(ops: bytes | list[int]) -> dict[int, bytes] | None:
    """Op -> a 0/1 mask over the records (None: ops too large for a byte column)."""
    if not isinstance(ops, bytes):
        return None
    return {op: ops.translate(bytes(1 if x == op else 0 for x in range(256)))
            for op in sorted(set(ops))}


def _group(addrs: list[int], ops: bytes | list[int]) -> dict[int, list[int]]:
    """Op -> its sites' addresses, in record order (C-speed masks for up to 256 ops)."""
    masks = _masks(ops)
    if masks is not None:
        return {op: list(compress(addrs, m)) for op, m in masks.items()}
    groups: dict[int, list[int]] = {}
    for a, op in zip(addrs, ops, strict=True):
        groups.setdefault(op, []).append(a)
    return groups


def _group_branches(sites: list[int], ops: bytes | list[int], gens: list[int],
                    yeses: list[int]) -> dict[int, tuple[list[int], list[int], list[int]]]:
    masks = _masks(ops)
    if masks is not None:
        return {op: (list(compress(sites, m)), list(compress(gens, m)),
                     list(compress(yeses, m))) for op, m in masks.items()}
    out: dict[int, tuple[list[int], list[int], list[int]]] = {}
    for s, op, g, y in zip(sites, ops, gens, yeses, strict=True):
        if op not in out:
            out[op] = ([], [], [])
        a, b, c = out[op]
        a.append(s)
        b.append(g)
        c.append(y)
    return out


def _check_branch_targets(t: Tables, chk: Checked, sites: list[int], ops: bytes | list[int],
                          gens: list[int], yeses: list[int], op_sites: list[int],
                          op_lens: bytes, op_sorted: bool, br_sorted: bool) -> None:
    """A branch site's jumps lead into executable code, never into the site itself."""
    if not sites:
        return
    img = t.image
    seg = chk.exec_seg
    for targets in (gens, yeses):
        lo, hi = min(targets), max(targets)
        if seg is not None and seg.vaddr <= lo and hi < seg.vaddr + seg.filesz:
            continue
        for s, op, x in zip(sites, ops, targets, strict=True):
            if img.load_for(x, 1, executable=True) is None:
                raise site_error(t, s, op, f"jumps to {x:#x}, outside the executable segments")
    # Never into the tables: data, even where a segment maps them executable.
    for name, r in ((layout.META_SECTION, t.meta_region), (layout.SITES_SECTION, t.sites_region),
                    (layout.BRANCHES_SECTION, t.branches_region),
                    (layout.REPL_SECTION, t.repl_region)):
        if r is None or not r.size:
            continue
        for targets in (gens, yeses):
            if min(targets) < r.vaddr + r.size and r.vaddr <= max(targets):
                j = next((j for j, x in enumerate(targets)
                          if r.vaddr <= x < r.vaddr + r.size), None)
                if j is not None:
                    raise site_error(t, sites[j], ops[j], f"jumps to {targets[j]:#x}, into "
                                                          f"{name}")
    for targets in (gens, yeses):
        # 0 <= target - site < 5: into its own site, its first byte included (a loop)
        if any(map(range(5).__contains__, map(operator.sub, targets, sites))):
            j = next(j for j, (x, s) in enumerate(zip(targets, sites, strict=True))
                     if 0 <= x - s < 5)
            raise site_error(t, sites[j], ops[j], "jumps into its own site")
    # Nor into the middle of another site (its first byte is fine: a branch may start
    # with a site): every patch rewrites the bytes there. Sites are disjoint, so their
    # starts and their ends sorted apart still pair up: one bisection per target.
    starts = op_sites + sites
    ends = list(map(operator.add, op_sites, op_lens)) + list(map(operator.add, sites,
                                                                 repeat(5)))
    if not (op_sorted and br_sorted and (not op_sites or not sites
                                         or op_sites[-1] < sites[0])):
        starts.sort()
        ends.sort()
    starts.append(1 << 64)  # a target before every site lands on this sentinel
    ends.append(1 << 64)
    targets = gens + yeses
    at = list(map(operator.sub, map(bisect.bisect_right, repeat(starts), targets), repeat(1)))
    lo = list(map(starts.__getitem__, at))
    hit = map(operator.and_, map(operator.lt, lo, targets),
              map(operator.lt, targets, map(ends.__getitem__, at)))
    if any(hit):
        j = next(j for j, (x, p) in enumerate(zip(targets, at, strict=True))
                 if starts[p] < x < ends[p])
        raise site_error(t, sites[j % len(sites)], ops[j % len(sites)],
                         f"jumps to {targets[j]:#x}, inside the site at {starts[at[j]]:#x}")


class _Concat:
    """Two columns read as one (op sites, then branch sites) without copying them."""

    def __init__(self, a: bytes | list[int], b: bytes | list[int]) -> None:
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __getitem__(self, i: int) -> int:
        n = len(self.a)
        return self.a[i] if i < n else self.b[i - n]

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from self.a
        yield from self.b


def _sorted_disjoint(sites: list[int], lens: bytes | list[int]) -> bool:
    return all(map(operator.le, map(operator.add, sites, lens), islice(sites, 1, None)))


def _check_site_ranges(t: Tables, op_sites: list[int], op_lens: bytes, op_ops: bytes | list[int],
                       br_sites: list[int], br_ops: bytes | list[int], ordered: bool
                       ) -> Segment | None:
    """Every site inside an executable PT_LOAD's file bytes; no two sites overlap.

    Returns the executable segment holding all sites when there is one (the
    common case, which lets the hot loop translate addresses with one subtraction).
    Op and branch records are each in address order as linked; the branch sites
    are then placed among the op sites by bisection.
    """
    img = t.image
    sites = op_sites + br_sites
    if not sites:
        return None
    br_lens = bytes([5]) * len(br_sites)
    ok = ordered
    if ok and br_sites and op_sites:
        # at[j]: op sites before branch site j; with a sentinel in front, index at[j]
        # is the op site before it and at[j] + 1 the one after.
        at = list(map(bisect.bisect_right, repeat(op_sites), br_sites))
        before = [-(1 << 64), *op_sites, 1 << 64]
        blens = b"\0" + op_lens
        ok = all(map(operator.le, map(operator.add, map(before.__getitem__, at),
                                      map(blens.__getitem__, at)), br_sites)) and \
            all(map(operator.le, map(operator.add, br_sites, repeat(5)),
                    map(before.__getitem__, map(operator.add, at, repeat(1)))))
    lens = op_lens + br_lens
    ops = _Concat(op_ops, br_ops)
    if not ok:
        order = sorted(range(len(sites)), key=sites.__getitem__)
        for a, b in zip(order, order[1:], strict=False):
            if sites[a] + lens[a] > sites[b]:
                raise site_error(t, sites[b], ops[b], f"overlaps the site at {sites[a]:#x}")
    lo = min(op_sites[:1] + br_sites[:1])
    hi = max(op_sites[-1] + op_lens[-1] if op_sites else 0,
             br_sites[-1] + 5 if br_sites else 0)
    if not ok:
        lo, hi = min(sites), max(map(operator.add, sites, lens))
    seg = img.load_for(lo, hi - lo, executable=True)
    if seg is None:
        for s, n, op in zip(sites, lens, ops, strict=True):
            if img.load_for(s, n, executable=True) is None:
                raise site_error(t, s, op, _where(img, s, n))
    _check_sites_clear(t, sites, lens, ops, lo, hi)
    return seg


def _check_sites_clear(t: Tables, sites: list[int], lens: bytes, ops: _Concat, lo: int,
                       hi: int) -> None:
    """No site overlaps the tables, the ELF headers or an unloaded section.

    Checked on file bytes (a range may be mapped by several segments): patching
    such a site would overwrite what the output is read by. Sites are known to
    be disjoint; the few guarded ranges are located among them by bisection.
    """
    img = t.image
    guarded = table_ranges(t.meta_region, t.sites_region, t.repl_region,
                           t.branches_region) + img.guarded_ranges()
    hits = [(what, a, b) for what, off, size in guarded
            for a, b in img.file_to_vaddr_ranges(off, size) if a < hi and lo < b]
    hits += [(what, a, b) for what, a, b in img.ambiguous_ranges if a < hi and lo < b]
    if not hits:
        return
    order = sorted(range(len(sites)), key=sites.__getitem__)
    starts = [sites[i] for i in order]
    for what, a, b in hits:
        j = bisect.bisect_right(starts, a) - 1
        for c in (j, j + 1):
            if 0 <= c < len(order):
                i = order[c]
                if sites[i] < b and a < sites[i] + lens[i]:
                    raise site_error(t, sites[i], ops[i], f"lies in {what}")


def _where(img: Image, vaddr: int, size: int) -> str:
    for seg in img.load_segments:
        if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
            if vaddr + size > seg.vaddr + seg.filesz:
                return "not in the file bytes of its PT_LOAD segment (.bss?)"
            if not seg.executable:
                return "in a non-executable PT_LOAD segment"
    return "outside every PT_LOAD segment"


