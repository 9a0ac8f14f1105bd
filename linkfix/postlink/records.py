"""The site records of `.linkfix.sites` and `.linkfix.branches`, read as columns.

An image may hold a million records, so each table is read as whole columns
(strided memoryviews over the image's bytes, `bytes.translate`, `map`,
`min`/`max`) instead of a Python loop per record; only a failing check falls
back to a scan that names the first offending site.

A column of addresses is an `array('Q')` (8 bytes a site, where a list of int
objects costs about 40); a list only when some record's address does not fit
in 64 unsigned bits, which the range checks then refuse (siteranges.py).
Nothing here keeps a view of the image, and a mapped image's table pages are
handed back as each block of records is read (`Image.release`).
"""

from __future__ import annotations

import operator
from array import array
from collections.abc import Callable, Iterable, MutableSequence, Sequence
from typing import TYPE_CHECKING

from linkfix import layout
from linkfix.errors import BadInput

if TYPE_CHECKING:
    from linkfix.postlink.tables import Region, Shape, Tables

_READ_BLOCK = 1 << 16  # records read per pass over a table: bounds its resident pages

Column = MutableSequence[int]  # array('Q'), or a list (see the module's docstring)


def site_error(t: Tables, addr: int, op: int, msg: str) -> BadInput:
    return BadInput(t.image.path, f"site {addr:#x} ({t.op_name(op)}): {msg}")


def zeros(n: int) -> Column:
    """A column of n addresses, to be filled by `put` (allocated once: no regrowth)."""
    return array("Q", [0]) * n


def put(col: Column, lo: int, values: Callable[[], Iterable[int]]) -> Column:
    """`col` with `values()` written from index `lo` (a list from then on when one does
    not fit)."""
    if isinstance(col, array):
        try:
            block = array("Q", values())
        except OverflowError:
            col = col.tolist()
        else:
            col[lo:lo + len(block)] = block
            return col
    got = list(values())
    col[lo:lo + len(got)] = got
    return col


def distinct(column: Sequence[int], limit: int) -> list[int]:
    """The values in `column` (each < `limit`): ascending for bytes (one memchr a
    value, not an int object a byte), else in order of appearance."""
    if isinstance(column, bytes):
        return [v for v in range(min(limit, 256)) if column.find(v) >= 0]
    return list(dict.fromkeys(column))


def as_list(col: Sequence[int], lo: int, hi: int) -> list[int]:
    """col[lo:hi] as a list: its int objects made once for several passes."""
    part = col[lo:hi]
    return part.tolist() if isinstance(part, (memoryview, array)) else list(part)


def same(a: Sequence[int], b: Sequence[int]) -> bool:
    """Two columns hold the same values (an array and a list never compare equal)."""
    if type(a) is type(b):
        return a == b
    return list(a) == list(b)


def view(col: Sequence[int], lo: int, hi: int) -> Sequence[int]:
    """col[lo:hi] without copying an array (a memoryview); a list is sliced."""
    if isinstance(col, array):
        return memoryview(col)[lo:hi]
    return col[lo:hi]  # type: ignore[return-value]


def _blocks(t: Tables, r: Region, size: int) -> Iterable[tuple[int, memoryview]]:
    """(first record, memoryview of up to _READ_BLOCK records) over a table, each
    block's pages handed back (a mapped image) once the next is asked for."""
    n = r.size // size
    data = t.image.data
    for lo in range(0, n, _READ_BLOCK):
        hi = min(n, lo + _READ_BLOCK)
        at = r.offset + lo * size
        with memoryview(data) as whole:
            mv = whole[at:r.offset + hi * size]
            yield lo, mv
            mv.release()
        # From the table's start: a fault may have mapped a whole large folio of the
        # page cache, pages already handed back included.
        t.image.release(r.offset, at - r.offset + (hi - lo) * size)


def _op_field(lo: bytes, hi: bytes) -> bytes | list[int]:
    """The u16 op field from its low and high bytes: bytes (C-speed masks) when every
    op is < 256."""
    if hi.count(0) == len(hi):
        return lo
    return [a | b << 8 for a, b in zip(lo, hi, strict=True)]


def _add_targets(col: Column, lo: int, ints: memoryview, word: int, w: int,
                 rec_vaddr: int) -> Column:
    """`col` with, from index `lo`, the address each record's 32-bit word `word` leads
    to: the records are `w` words each from `rec_vaddr`, and the word holds the
    target less its own address."""
    rel = ints[word::w]
    at = rec_vaddr + 4 * word
    stride = 4 * w
    try:
        return put(col, lo, lambda: map(operator.add, rel, range(at, at + stride * len(rel),
                                                                 stride)))
    finally:
        rel.release()


_OP_CHECK = bytes(layout.op_check(x) for x in range(256))


def _first_difference(a: bytes, b: bytes) -> int | None:
    return None if a == b else next(j for j, (x, y) in enumerate(zip(a, b, strict=True))
                                    if x != y)


def op_records(t: Tables, shapes: dict[int, Shape]
               ) -> tuple[Column, bytes | list[int], bytes]:
    """Addresses, ops and lengths of the op site records, validated."""
    r = t.sites_region
    n = t.n_op_sites
    addrs = zeros(n + t.n_branch_sites)  # the branch sites follow (branch_records)
    lo_b, hi_b, lens_b, kinds_b = bytearray(), bytearray(), bytearray(), bytearray()
    for first, mv in _blocks(t, r, layout.SITE_REC_SIZE):
        lo_b += mv[4::8].tobytes()
        hi_b += mv[5::8].tobytes()
        lens_b += mv[6::8].tobytes()
        kinds_b += mv[7::8].tobytes()
        ints = mv.cast("i")
        addrs = _add_targets(addrs, first, ints, 0, 2, r.vaddr + 8 * first)
        ints.release()
    ops = _op_field(bytes(lo_b), bytes(hi_b))
    del lo_b, hi_b
    lens, kinds = bytes(lens_b), bytes(kinds_b)
    del lens_b, kinds_b
    n_real = t.meta.n_real_ops
    want = bytes(shapes[op].site_len for op in range(n_real))
    # One check at a time over every record (the first offence of the first kind
    # found is the one named): ops, then check bytes, then lengths.
    bad = next(j for j, op in enumerate(ops) if op >= n_real) if n and max(ops) >= n_real \
        else None
    if bad is None:
        bad = _first_difference(kinds, ops.translate(_OP_CHECK) if isinstance(ops, bytes)
                                else bytes(map(layout.op_check, ops)))
    if bad is None:
        bad = _first_difference(lens, ops.translate(want[:256].ljust(256, b"\0"))
                                if isinstance(ops, bytes) else bytes(map(want.__getitem__, ops)))
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


def branch_records(t: Tables, addrs: Column
                   ) -> tuple[Column, bytes | list[int], Column, Column]:
    """The branch records, validated: `addrs` with their sites after the op sites,
    their ops, and their generic and "true" targets."""
    r = t.branches_region
    n = t.n_branch_sites
    if not n:
        return addrs, b"", array("Q"), array("Q")
    rs = layout.BRANCH_REC_SIZE
    w = rs // 4
    n_op = t.n_op_sites
    gens, yeses, gens2, yeses2 = zeros(n), zeros(n), zeros(n), zeros(n)
    lo_b, hi_b, tested_b, kinds_b = bytearray(), bytearray(), bytearray(), bytearray()
    for first, mv in _blocks(t, r, rs):
        ints = mv.cast("i")
        v = r.vaddr + rs * first
        addrs = _add_targets(addrs, n_op + first, ints, 0, w, v)
        gens = _add_targets(gens, first, ints, 1, w, v)
        yeses = _add_targets(yeses, first, ints, 2, w, v)
        gens2 = _add_targets(gens2, first, ints, 4, w, v)
        yeses2 = _add_targets(yeses2, first, ints, 5, w, v)
        ints.release()
        lo_b += mv[12::rs].tobytes()
        hi_b += mv[13::rs].tobytes()
        tested_b += mv[14::rs].tobytes()
        kinds_b += mv[15::rs].tobytes()
    ops = _op_field(bytes(lo_b), bytes(hi_b))
    tested, kinds = bytes(tested_b), bytes(kinds_b)
    sites = view(addrs, n_op, n_op + n)
    _check_repeated_targets(t, sites, ops, gens, gens2, "generic")
    _check_repeated_targets(t, sites, ops, yeses, yeses2, '"true"')
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
    return addrs, ops, gens, yeses


def _check_repeated_targets(t: Tables, sites: Sequence[int], ops: bytes | list[int],
                            targets: Column, second: Column, what: str) -> None:
    """A branch record names each label twice: both words must lead to one address."""
    if not same(second, targets):
        j = next(j for j, (x, y) in enumerate(zip(targets, second, strict=True)) if x != y)
        raise site_error(t, sites[j], ops[j], f"bad branch record: its {what} target is "
                                              f"{targets[j]:#x} and, repeated, {second[j]:#x}")
