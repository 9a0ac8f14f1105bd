"""Where the sites lie, and where the branch sites jump: checked over whole columns.

Every site must lie in an executable PT_LOAD's file bytes, clear of the tables,
the ELF headers and unloaded sections, and no two may overlap; a branch site's
jumps lead into executable code, never into the tables, into its own site or
into the middle of another. The op records and the branch records are each in
address order as linked, so each check is a few C-level passes (`map`,
`bisect` into one sorted column at a time) with no per-site Python object; an
image whose records are out of order takes the slower sorted path.
"""

from __future__ import annotations

import bisect
import operator
from array import array
from collections.abc import Sequence
from itertools import compress, islice, repeat
from typing import TYPE_CHECKING

from linkfix import layout
from linkfix.postlink.image import Image, Segment
from linkfix.postlink.records import as_list, site_error, view

if TYPE_CHECKING:
    from linkfix.postlink.tables import Tables


_BLOCK = 1 << 16  # sites per pass that makes a list of them (a bisection's fast case)


def sorted_disjoint(sites: Sequence[int], lens: bytes | Sequence[int]) -> bool:
    """Each site ends at or before the next starts (so they are in address order)."""
    n = len(sites)
    for lo in range(0, n, _BLOCK):
        block = as_list(sites, lo, min(n, lo + _BLOCK + 1))  # and the next block's first
        if not all(map(operator.le, map(operator.add, block, lens[lo:lo + _BLOCK]),
                       islice(block, 1, None))):
            return False
    return True


def positions(starts: Sequence[int], values: Sequence[int]) -> array:  # type: ignore[type-arg]
    """bisect_right(starts, v) for every v of `values`, both sorted. Many values are
    placed a block of `starts` at a time, each block a list (bisecting an array makes
    an int object at every step)."""
    n, m = len(starts), len(values)
    if m * 64 < n or n <= _BLOCK:
        return array("q", map(bisect.bisect_right, repeat(starts), values))
    out = array("q")
    j = 0
    for lo in range(0, n, _BLOCK):
        hi = min(n, lo + _BLOCK)
        # the values below the next block's first start fall in this one
        jb = bisect.bisect_left(values, starts[hi]) if hi < n else m
        if jb > j:
            block = as_list(starts, lo, hi)
            out.extend(map(operator.add, map(bisect.bisect_right, repeat(block),
                                             values[j:jb]), repeat(lo)))
        j = jb
    return out


def check_site_ranges(t: Tables, sites: Sequence[int], lens: bytes, ops: Sequence[int],
                      n_op: int, op_sorted: bool, br_sorted: bool) -> Segment | None:
    """Every site inside an executable PT_LOAD's file bytes; no two sites overlap.

    `sites`, `lens`, `ops`: every site, op records (the first `n_op`) then branch
    records. Returns the executable segment holding all sites when there is one
    (the common case, which lets the hot loop translate addresses with one
    subtraction). Op and branch records are each in address order as linked; the
    branch sites are then placed among the op sites by bisection.
    """
    img = t.image
    if not sites:
        return None
    op_sites, br_sites = _split(sites, n_op)
    op_lens = lens[:n_op]
    ok = op_sorted and br_sorted
    if ok and br_sites and op_sites:
        # at[j]: op sites before branch site j (nondecreasing): the op site before
        # it is at[j] - 1 (when at[j] > 0), the one after it at[j] (when < n_op).
        at = positions(op_sites, br_sites)
        j0 = bisect.bisect_right(at, 0)
        j1 = bisect.bisect_left(at, n_op)
        prev = array("q", map(operator.sub, islice(at, j0, None), repeat(1)))
        ok = all(map(operator.le, map(operator.add, map(op_sites.__getitem__, prev),
                                      map(op_lens.__getitem__, prev)),
                     islice(br_sites, j0, None))) and \
            all(map(operator.le, map(operator.add, islice(br_sites, 0, j1), repeat(5)),
                    map(op_sites.__getitem__, islice(at, 0, j1))))
    if not ok:
        order = sorted(range(len(sites)), key=sites.__getitem__)
        for a, b in zip(order, order[1:], strict=False):
            if sites[a] + lens[a] > sites[b]:
                raise site_error(t, sites[b], ops[b], f"overlaps the site at {sites[a]:#x}")
        lo, hi = min(sites), max(map(operator.add, sites, lens))
    else:
        lo = min(x[0] for x in (op_sites, br_sites) if len(x))
        hi = max(op_sites[-1] + op_lens[-1] if op_sites else 0,
                 br_sites[-1] + 5 if br_sites else 0)
    seg = img.load_for(lo, hi - lo, executable=True)
    if seg is None:
        for s, n, op in zip(sites, lens, ops, strict=True):
            if img.load_for(s, n, executable=True) is None:
                raise site_error(t, s, op, _where(img, s, n))
    _check_sites_clear(t, sites, lens, ops, n_op, op_sorted and br_sorted, lo, hi)
    return seg


def _split(sites: Sequence[int], n_op: int) -> tuple[Sequence[int], Sequence[int]]:
    """The op sites and the branch sites (views of an array)."""
    return view(sites, 0, n_op), view(sites, n_op, len(sites))


def _check_sites_clear(t: Tables, sites: Sequence[int], lens: bytes, ops: Sequence[int],
                       n_op: int, ordered: bool, lo: int, hi: int) -> None:
    """No site overlaps the tables, the ELF headers or an unloaded section.

    Checked on file bytes (a range may be mapped by several segments): patching
    such a site would overwrite what the output is read by. Sites are known to
    be disjoint; the few guarded ranges are located among them by bisection.
    """
    from linkfix.postlink.tables import table_ranges

    img = t.image
    guarded = table_ranges(t.meta_region, t.sites_region, t.repl_region,
                           t.branches_region) + img.guarded_ranges()
    hits = [(what, a, b) for what, off, size in guarded
            for a, b in img.file_to_vaddr_ranges(off, size) if a < hi and lo < b]
    hits += [(what, a, b) for what, a, b in img.ambiguous_ranges if a < hi and lo < b]
    if not hits:
        return
    # Each kind of record is sorted: its candidates are the site starting at or
    # before the range and the next; in address order over both kinds, the last
    # start at or before it and the first after it are the ones to check.
    parts = ((0, n_op), (n_op, len(sites))) if ordered else None
    if parts is None:
        order = sorted(range(len(sites)), key=sites.__getitem__)
    for what, a, b in hits:
        if parts is None:
            starts = list(map(sites.__getitem__, order))
            j = bisect.bisect_right(starts, a) - 1
            cands = [order[c] for c in (j, j + 1) if 0 <= c < len(order)]
        else:
            near = []
            for p, q in parts:
                j = bisect.bisect_right(view(sites, p, q), a) - 1
                near += [p + c for c in (j, j + 1) if 0 <= c < q - p]
            near.sort(key=sites.__getitem__)
            before = [i for i in near if sites[i] <= a]
            after = [i for i in near if sites[i] > a]
            cands = before[-1:] + after[:1]
        for i in cands:
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


def check_branch_targets(t: Tables, seg: Segment | None, sites: Sequence[int], lens: bytes,
                         n_op: int, br_ops: Sequence[int], gens: Sequence[int],
                         yeses: Sequence[int], op_sorted: bool, br_sorted: bool) -> None:
    """A branch site's jumps lead into executable code, never into the site itself."""
    op_sites, br_sites = _split(sites, n_op)
    if not br_sites:
        return
    img = t.image
    for targets in (gens, yeses):
        lo, hi = min(targets), max(targets)
        if seg is not None and seg.vaddr <= lo and hi < seg.vaddr + seg.filesz:
            continue
        for s, op, x in zip(br_sites, br_ops, targets, strict=True):
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
                    raise site_error(t, br_sites[j], br_ops[j], f"jumps to {targets[j]:#x}, "
                                                                f"into {name}")
    for targets in (gens, yeses):
        # 0 <= target - site < 5: into its own site, its first byte included (a loop)
        if any(map(range(5).__contains__, map(operator.sub, targets, br_sites))):
            j = next(j for j, (x, s) in enumerate(zip(targets, br_sites, strict=True))
                     if 0 <= x - s < 5)
            raise site_error(t, br_sites[j], br_ops[j], "jumps into its own site")
    # Nor into the middle of another site (its first byte is fine: a branch may start
    # with a site): every patch rewrites the bytes there. The op sites and the branch
    # sites are each sorted: the distinct targets (a few tests and labels serve many
    # sites) are placed among each.
    op_starts, op_lens = _sorted(op_sites, lens[:n_op], op_sorted)
    br_starts, br_lens = _sorted(br_sites, bytes([5]) * len(br_sites), br_sorted)
    nb = len(br_sites)
    for targets in (gens, yeses):
        for lo in range(0, nb, _BLOCK):
            uniq = sorted(dict.fromkeys(targets[lo:lo + _BLOCK]))
            bad = {**_inside(op_starts, op_lens, uniq), **_inside(br_starts, br_lens, uniq)}
            if bad:
                j = next(j for j in range(lo, nb) if targets[j] in bad)
                raise site_error(t, br_sites[j], br_ops[j], f"jumps to {targets[j]:#x}, "
                                 f"inside the site at {bad[targets[j]]:#x}")


def _sorted(starts: Sequence[int], lens: bytes, is_sorted: bool
            ) -> tuple[Sequence[int], bytes]:
    """(starts, lens) in address order."""
    if is_sorted:
        return starts, lens
    order = sorted(range(len(starts)), key=starts.__getitem__)
    return [starts[i] for i in order], bytes(lens[i] for i in order)


def _inside(starts: Sequence[int], lens: bytes, targets: list[int]) -> dict[int, int]:
    """Each of the sorted `targets` that lands strictly inside one of the sites
    `starts` (sorted, disjoint) -> that site's start."""
    if not starts or not targets:
        return {}
    at = array("q", map(operator.sub, positions(starts, targets), repeat(1)))
    # at -1 (before every site) reads the last site, which starts after the target.
    lo = array("Q", map(starts.__getitem__, at))
    hit = bytes(map(operator.and_, map(operator.lt, lo, targets),
                    map(operator.lt, targets, map(operator.add, lo, map(lens.__getitem__, at)))))
    return {targets[j]: lo[j] for j in compress(range(len(targets)), hit)}
