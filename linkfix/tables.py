"""Find, parse and validate the linkfix tables of a linked image (docs/FORMAT.md).

Every record is validated before anything is written. An image may hold a
million sites, so the checks run over whole columns of the sites section
(strided memoryviews, `map`, `min`/`max`) instead of a Python loop per record,
and over the few distinct record *shapes* (the record with its address fields
zeroed: op, site_len, kind and every alternative's len/flags) instead of every
record. Only a failing check falls back to a per-record scan, to name the
first offending site.
"""

from __future__ import annotations

import bisect
import operator
import re
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import compress, islice
from operator import itemgetter

from linkfix import header, layout
from linkfix.errors import BadInput
from linkfix.image import Image, Segment

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
META_START, META_END = "__linkfix_meta_start", "__linkfix_meta_end"
SITES_START, SITES_END = "__linkfix_sites_start", "__linkfix_sites_end"
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
    """What a record says apart from its addresses."""

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
    repl_region: Region | None
    n_sites: int
    rec_size: int
    site_struct: struct.Struct
    _sites_raw: bytes | None = None

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

    def sites_bytes(self) -> bytes:
        if self._sites_raw is None:
            r = self.sites_region
            self._sites_raw = self.image.data[r.offset:r.offset + r.size]
        return self._sites_raw

    def record_vaddr(self, i: int) -> int:
        return self.sites_region.vaddr + i * self.rec_size

    def record(self, i: int) -> tuple[int, ...]:
        return self.site_struct.unpack_from(self.image.data,
                                            self.sites_region.offset + i * self.rec_size)

    def site_addr(self, i: int) -> int:
        return self.record_vaddr(i) + self.record(i)[0]

    def body_addr(self, i: int, k: int) -> int:
        return self.record_vaddr(i) + 8 + 8 * k + self.record(i)[4 + 4 * k]

    def shape(self, i: int) -> Shape:
        rec = self.record(i)
        alts = tuple(Alt(rec[5 + 4 * k], rec[6 + 4 * k]) for k in range(self.n_alts))
        return Shape(rec[1], rec[2], rec[3], alts)


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
    assert sites_r is not None
    repl_r = _region(img, layout.REPL_SECTION, REPL_START, REPL_END, False, (b[2], b[3]))
    rec_size = layout.site_rec_size(len(meta.backends))
    if sites_r.size % rec_size:
        raise BadInput(img.path, f"{layout.SITES_SECTION}: {sites_r.size} bytes is not a "
                                 f"multiple of the {rec_size}-byte record")
    if sites_r.vaddr % 4:
        raise BadInput(img.path, f"{layout.SITES_SECTION}: not 4-byte aligned")
    _check_table_placement(img, meta_r, sites_r, repl_r)
    for name, r in ((layout.META_SECTION, meta_r), (layout.SITES_SECTION, sites_r),
                    (layout.REPL_SECTION, repl_r)):
        if r is None or not r.size:
            continue
        for what, lo, hi in img.ambiguous_ranges:
            if r.vaddr < hi and lo < r.vaddr + r.size:
                raise BadInput(img.path, f"{name} at {r.vaddr:#x} lies where {what}")
    return Tables(img, meta, meta_r, sites_r, repl_r, sites_r.size // rec_size, rec_size,
                  layout.site_struct(len(meta.backends)))


def table_ranges(meta_r: Region, sites_r: Region, repl_r: Region | None
                 ) -> list[tuple[str, int, int]]:
    """(name, file offset, size) of every non-empty table."""
    out = [(layout.META_SECTION, meta_r.offset, meta_r.size),
           (layout.SITES_SECTION, sites_r.offset, sites_r.size)]
    if repl_r is not None:
        out.append((layout.REPL_SECTION, repl_r.offset, repl_r.size))
    return [r for r in out if r[2]]


def _check_table_placement(img: Image, meta_r: Region, sites_r: Region,
                           repl_r: Region | None) -> None:
    """The tables do not overlap each other, the ELF headers or unloaded sections.

    `patch` writes the state record in .linkfix.meta while reading the other
    tables: overlapping structures would make the output disagree with itself.
    """
    mine = table_ranges(meta_r, sites_r, repl_r)
    for j, (name, off, size) in enumerate(mine):
        for other, o_off, o_size in mine[j + 1:] + img.guarded_ranges():
            if off < o_off + o_size and o_off < off + size:
                raise BadInput(img.path, f"{name} (file offset {off:#x}, {size} bytes) "
                                         f"overlaps {other}")


# -- record validation -----------------------------------------------------------------------


@dataclass
class Checked:
    """The result of validating every record, reused by splicing."""

    t: Tables
    shapes: dict[bytes, Shape]  # shape key -> decoded shape
    shape_key: struct.Struct  # unpacks one shape key per record from `zeroed`
    zeroed: bytearray  # the sites section with the body address fields zeroed
    site_addrs: list[int] = field(default_factory=list)  # per record
    exec_seg: Segment | None = None  # the one executable segment holding every site
    body_segs: list[Segment | None] = field(default_factory=list)  # per k, when all in one
    _bodies: dict[int, list[int]] = field(default_factory=dict)

    def keys(self) -> Iterator[bytes]:
        """The shape key of every record, in order."""
        return map(itemgetter(0), self.shape_key.iter_unpack(self.zeroed))

    def key_of(self, i: int) -> bytes:
        rs = self.t.rec_size
        return bytes(self.zeroed[i * rs + 4:(i + 1) * rs])

    def present_by_op(self) -> dict[int, int]:
        """Op -> bit mask of the alternatives its sites carry."""
        out: dict[int, int] = {}
        for sh in self.shapes.values():
            out[sh.op] = out.get(sh.op, 0) | sh.present_mask()
        return out

    def shape_counts(self) -> Counter[bytes]:
        return Counter(self.keys())

    def body_addrs(self, k: int) -> list[int]:
        """Address of alternative k's body for every record (meaningless when len 0)."""
        got = self._bodies.get(k)
        if got is None:
            got = self._bodies[k] = _column_addrs(self.t, 2 + 2 * k, 8 + 8 * k)
        return got


def _column_addrs(t: Tables, word: int, field_off: int) -> list[int]:
    """field address + value, for the self-relative s32 at int `word` of every record."""
    n, rs = t.n_sites, t.rec_size
    col = memoryview(t.sites_bytes()).cast("i")[word::rs // 4]
    start = t.sites_region.vaddr + field_off
    return list(map(operator.add, col, range(start, start + n * rs, rs)))


def site_error(t: Tables, i: int, msg: str) -> BadInput:
    rec = t.record(i)
    return BadInput(t.image.path, f"site {t.record_vaddr(i) + rec[0]:#x} "
                                  f"({t.op_name(rec[1])}): {msg}")


def check_records(t: Tables) -> Checked:
    n, rs, na = t.n_sites, t.rec_size, t.n_alts
    raw = t.sites_bytes()
    mv = memoryview(raw)
    ints = mv.cast("i")
    rw = rs // 4

    # Shapes: zero the body address fields with strided slice assignments (C speed);
    # the key skips the site field.
    zeroed = bytearray(raw)
    blank = bytes(n)
    for fld in range(8, 8 * (na + 1), 8):
        for b in range(4):
            zeroed[fld + b::rs] = blank
    shape_key = struct.Struct(f"4x{rs - 4}s")
    keys = set(map(itemgetter(0), shape_key.iter_unpack(zeroed)))
    shapes = {key: _decode_shape(key, na) for key in keys}
    chk = Checked(t, shapes, shape_key, zeroed)
    _check_shapes(t, chk)

    chk.site_addrs = sites = _column_addrs(t, 0, 0)
    chk.exec_seg = _check_site_ranges(t, sites, bytes(mv[6::rs]))

    for k in range(na):
        col = ints[2 + 2 * k::rw]
        # An absent alternative must have body 0 (only shapes lacking k can fail).
        if any(not sh.alts[k].present for sh in shapes.values()):
            absent = bytes(mv[13 + 8 * k::rs]).translate(_ABSENT)
            if any(compress(col, absent)):
                i = next(j for j, (v, a) in enumerate(zip(col, absent, strict=True)) if a and v)
                raise site_error(t, i, f"alternative {t.alt_name(k)} is absent but has a "
                                       "body address")
        chk.body_segs.append(_check_body_ranges(t, k, col, bytes(mv[12 + 8 * k::rs])))
    return chk


# flags byte -> 1 when bit 0 (present) is clear
_ABSENT = bytes(0 if f & layout.FLAG_PRESENT else 1 for f in range(256))


def _decode_shape(key: bytes, na: int) -> Shape:
    op, site_len, kind = struct.unpack_from("<HBB", key, 0)
    alts = []
    for k in range(na):
        blen, flags, reserved = struct.unpack_from("<BBH", key, 8 + 8 * k)
        alts.append(Alt(blen, flags | (reserved << 8)))  # reserved bits make flags insane
    return Shape(op, site_len, kind, tuple(alts))


def shape_problem(t: Tables, sh: Shape) -> str | None:
    """Why a record shape is invalid, or None."""
    n_ops = len(t.meta.ops)
    n_real = t.meta.n_real_ops
    if sh.op >= n_ops:
        return f"op index {sh.op} out of range (n_ops {n_ops})"
    if sh.kind not in (layout.KIND_OP, layout.KIND_BRANCH):
        return f"unknown site kind {sh.kind}"
    if (sh.kind == layout.KIND_BRANCH) != (sh.op >= n_real):
        return f"site kind {sh.kind} does not match op {t.op_name(sh.op)}"
    if sh.site_len < 5:
        return f"site_len {sh.site_len} is less than 5"
    longest = 5
    for k, alt in enumerate(sh.alts):
        name = t.alt_name(k)
        if alt.flags & ~0x7:
            return f"alternative {name}: bad flags {alt.flags:#x}"
        if not alt.present:
            if alt.flags or alt.len:
                return f"alternative {name}: flags {alt.flags:#x} / len {alt.len} without " \
                       "the present bit"
            continue
        if alt.flags & layout.FLAG_CALL and alt.flags & layout.FLAG_JMP:
            return f"alternative {name}: both call and jmp flags"
        if alt.flags & (layout.FLAG_CALL | layout.FLAG_JMP) and alt.len != 5:
            return f"alternative {name}: call/jmp body of {alt.len} bytes (must be 5)"
        if alt.len > sh.site_len:
            return f"alternative {name}: body of {alt.len} bytes longer than the " \
                   f"{sh.site_len}-byte site"
        longest = max(longest, alt.len)
    if not sh.alts[0].present:
        return "no generic alternative"
    if sh.site_len != longest:
        return f"site_len {sh.site_len} inconsistent with the longest alternative " \
               f"({longest} bytes)"
    return None


def _check_shapes(t: Tables, chk: Checked) -> None:
    shapes = chk.shapes
    bad = {key: msg for key, sh in shapes.items() if (msg := shape_problem(t, sh)) is not None}
    if bad:
        # One pass names the first bad record (a search per bad shape would be
        # quadratic in a table whose every record is corrupt differently).
        i, key = next((i, key) for i, key in enumerate(chk.keys()) if key in bad)
        raise site_error(t, i, bad[key])
    # All sites of one op agree on length and on which alternatives exist.
    per_op: dict[int, set[tuple[int, int]]] = {}
    for sh in shapes.values():
        per_op.setdefault(sh.op, set()).add((sh.site_len, sh.present_mask()))
    mixed = {op for op, kinds in per_op.items() if len(kinds) > 1}
    if mixed:
        first_of: dict[int, Shape] = {}
        for i, key in enumerate(chk.keys()):
            sh = shapes[key]
            if sh.op not in mixed:
                continue
            seen = first_of.setdefault(sh.op, sh)
            if (seen.site_len, seen.present_mask()) != (sh.site_len, sh.present_mask()):
                raise site_error(t, i, "site_len or set of alternatives differs from the "
                                       f"op's other sites ({sh.site_len} vs {seen.site_len} "
                                       "bytes)")


def _check_site_ranges(t: Tables, sites: list[int], lens: bytes) -> Segment | None:
    """Every site inside an executable PT_LOAD's file bytes; no two sites overlap.

    Returns the executable segment holding all sites when there is one (the
    common case, which lets the hot loop translate addresses with one subtraction).
    """
    img = t.image
    if not sites:
        return None
    if all(map(operator.le, map(operator.add, sites, lens), islice(sites, 1, None))):
        lo, hi = sites[0], sites[-1] + lens[-1]  # sorted and disjoint
    else:
        order = sorted(range(len(sites)), key=sites.__getitem__)
        for a, b in zip(order, order[1:], strict=False):
            if sites[a] + lens[a] > sites[b]:
                raise site_error(t, b, f"overlaps the site at {sites[a]:#x}")
        lo, hi = sites[order[0]], sites[order[-1]] + lens[order[-1]]
    seg = img.load_for(lo, hi - lo, executable=True)
    if seg is None:
        for i, (s, n) in enumerate(zip(sites, lens, strict=True)):
            if img.load_for(s, n, executable=True) is None:
                raise site_error(t, i, _where(img, s, n))
    _check_sites_clear(t, sites, lens, lo, hi)
    return seg


def _check_sites_clear(t: Tables, sites: list[int], lens: bytes, lo: int, hi: int) -> None:
    """No site overlaps the tables, the ELF headers or an unloaded section.

    Checked on file bytes (a range may be mapped by several segments): patching
    such a site would overwrite what the output is read by. Sites are known to
    be disjoint; the few guarded ranges are located among them by bisection.
    """
    img = t.image
    guarded = table_ranges(t.meta_region, t.sites_region, t.repl_region) + img.guarded_ranges()
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
                    raise site_error(t, i, f"lies in {what}")


def _where(img: Image, vaddr: int, size: int) -> str:
    for seg in img.load_segments:
        if seg.vaddr <= vaddr < seg.vaddr + seg.memsz:
            if vaddr + size > seg.vaddr + seg.filesz:
                return "not in the file bytes of its PT_LOAD segment (.bss?)"
            if not seg.executable:
                return "in a non-executable PT_LOAD segment"
    return "outside every PT_LOAD segment"


_BLOCK = 4096


def _check_body_ranges(t: Tables, k: int, col: memoryview, blens: bytes) -> Segment | None:
    """Every non-empty body of alternative k inside a PT_LOAD's file bytes and .linkfix.repl.

    Body i is at start + i*rec_size + col[i]. Per block of records, the
    column's min and max (C speed, no per-record arithmetic) bound every body
    address in the block; only a block whose bounds leave the segment or the
    table is checked record by record. Returns the segment holding every body
    when one does. A body outside .linkfix.repl (FORMAT.md) could overlap a site
    or the state record, which `patch` rewrites.
    """
    img = t.image
    n, rs = t.n_sites, t.rec_size
    start = t.sites_region.vaddr + 8 + 8 * k
    if not any(blens):
        return None
    r = t.repl_region
    lo_r, hi_r = (r.vaddr, r.vaddr + r.size) if r is not None else (0, 0)
    seg: Segment | None = None  # the segment every body seen so far lies in
    single = True

    def inside(g: Segment | None, lo: int, hi: int) -> bool:
        return g is not None and g.vaddr <= lo and hi <= g.vaddr + g.filesz

    for lo_i in range(0, n, _BLOCK):
        hi_i = min(n, lo_i + _BLOCK)
        lens = blens[lo_i:hi_i]
        if not any(lens):
            continue
        block = col[lo_i:hi_i].tolist()
        if not all(lens):
            block = list(compress(block, lens))  # absent and empty bodies have no bytes
        lo = start + lo_i * rs + min(block)
        hi = start + (hi_i - 1) * rs + max(block) + 255
        in_repl = lo_r <= lo and hi <= hi_r
        if in_repl and inside(seg, lo, hi):
            continue
        if in_repl and seg is None:
            seg = img.load_for(lo, hi - lo)
            if seg is not None:
                continue
        for i in range(lo_i, hi_i):
            a, bl = start + i * rs + col[i], blens[i]
            if not bl:
                continue
            if not inside(seg, a, a + bl):
                found = img.load_for(a, bl)
                if found is None:
                    raise site_error(t, i, f"alternative {t.alt_name(k)}: body at {a:#x} "
                                           f"({bl} bytes) is not in the file bytes of any "
                                           "PT_LOAD")
                single = single and seg is None
                seg = found
            if not lo_r <= a <= hi_r - bl:
                where = f"outside {layout.REPL_SECTION}" if r is not None else \
                    f"and the image has no {layout.REPL_SECTION}"
                raise site_error(t, i, f"alternative {t.alt_name(k)}: body at {a:#x} "
                                       f"({bl} bytes) {where}")
    return seg if single else None
