"""Compute the bytes of every site for a selection, and write them into a buffer.

Every site of an op gets the bytes of the op's one stored copy of the chosen
alternative (copies.py), with each 32-bit PC-relative field re-aimed from the
site: `target - site - pos`. A branch site's jumps take their targets from its
own record. `Splicer.apply` is the hot loop: C-level `map` passes over a block
of records at a time, one per op in the block (a million sites in well under a
second); with `current` it first checks, in the same pass, that every site
holds what the state record says, and refuses a site that does not
(NotRecognised).
"""

from __future__ import annotations

import operator
import struct
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import compress, repeat

from linkfix import layout
from linkfix.errors import BadInput
from linkfix.postlink.copies import Copy
from linkfix.postlink.records import as_list, distinct
from linkfix.postlink.tables import Checked, Shape, Tables, site_error


class NotRecognised(Exception):
    """Site `i` does not hold the bytes of alternative `k`, which its state record names."""

    def __init__(self, i: int, k: int) -> None:
        super().__init__(i, k)
        self.i = i
        self.k = k


def effective(shape: Shape, k: int) -> int:
    """The alternative a site gets when `k` is requested: k if it has a body, else generic."""
    return k if 0 <= k < len(shape.alts) and shape.alts[k].present else layout.GENERIC


class Template:
    """A copy ready for the loop: its bytes, and its one PC-relative field (if one)."""

    def __init__(self, copy: Copy, wraps: bool) -> None:
        self.copy = copy
        self.fin = copy.code
        self.single = len(copy.pcrel) <= 1 and not copy.per_site
        if copy.pcrel and self.single:
            pos, target = copy.pcrel[0]
            self.pos: int | None = pos
            self.c = target - pos  # the field at a site s holds c - s
            self.head = copy.code[:pos]
            self.tail = copy.code[pos + 4:]
        else:
            self.pos = None
            self.c = 0
            self.head = self.tail = b""
        self.fmt = struct.Struct("<I" if wraps else "<i")
        self.mask = 0xFFFFFFFF if wraps else -1
        # The whole site in one struct call: no slice object per site.
        if self.pos is None:
            self.site = struct.Struct(f"{len(self.fin)}s")
        else:
            self.site = struct.Struct(f"<{self.pos}s{'I' if wraps else 'i'}{len(self.tail)}s")

    def values(self, addrs: Iterable[int]) -> Iterator[int]:
        """The field's value at each site: `c - s`."""
        return map(operator.and_, map(operator.sub, repeat(self.c), addrs), repeat(self.mask))

    def write(self, out, so: list[int], addrs: list[int]) -> None:  # type: ignore[no-untyped-def]
        """Put this copy at every file offset `so` (sites `addrs`)."""
        put = self.site.pack_into
        if self.pos is None:
            deque(map(put, repeat(out), so, repeat(self.fin)), maxlen=0)
        else:
            deque(map(put, repeat(out), so, repeat(self.head), self.values(addrs),
                      repeat(self.tail)), maxlen=0)

    def held(self, src, so: list[int], addrs: list[int]) -> bool:  # type: ignore[no-untyped-def]
        """Whether every site holds this copy (False may also mean: cannot tell fast)."""
        if not isinstance(src, bytes):
            return False  # a mapped file has no startswith: the caller checks site by site
        starts = src.startswith
        if self.pos is None:
            return all(map(starts, repeat(self.fin), so))
        try:
            return all(map(starts, map(self.site.pack, repeat(self.head), self.values(addrs),
                                       repeat(self.tail)), so))
        except struct.error:
            return False


class Splicer:
    def __init__(self, t: Tables, chk: Checked) -> None:
        self.t = t
        self.chk = chk
        self.img = t.image
        self.bits = t.image.bits
        self.wraps = self.bits == 32  # i386 displacements wrap around the 4 GiB space
        self.mask = 0xFFFFFFFF if self.wraps else -1
        self._index = _Index(chk)

    def shape_of(self, i: int) -> Shape:
        return self.chk.shape_of(i)

    def copy(self, op: int, k: int) -> Copy:
        return self.chk.copies[(op, k)]

    def site_bytes(self, i: int, k: int) -> bytes:
        """The exact bytes site i holds when patched to alternative k (k must be present)."""
        s = self.chk.site_addrs[i]
        op = self.chk.site_ops[i]
        c = self.copy(op, k)
        fmt = struct.Struct("<I" if self.wraps else "<i")
        out = bytearray(c.code)
        try:
            if c.per_site:
                g, y = self.chk.branch_targets(i)
                fmt.pack_into(out, 1, ((g if k == 0 else y) - s - 5) & self.mask)
            for pos, target in c.pcrel:
                fmt.pack_into(out, pos, (target - s - pos) & self.mask)
        except struct.error:
            raise site_error(self.t, s, op, f"alternative {self.t.alt_name(k)}: relocated "
                                            "displacement does not fit in 32 bits") from None
        return bytes(out)

    def index_of(self, addr: int) -> int:
        """The number of the site at `addr`."""
        return self._index.of(addr)

    def placed(self, i: int, k: int) -> tuple[bytes, int]:
        """Site i's bytes for alternative k, and how many of them are body (not padding)."""
        b = self.site_bytes(i, k)
        return b, self.t.meta.alt(self.chk.site_ops[i], k).body_len

    # -- the hot loop ----------------------------------------------------------------------

    def apply(self, out, per_op: tuple[int, ...],  # type: ignore[no-untyped-def]
              current: tuple[int, ...] | None = None) -> dict[int, int]:
        """Write every site's bytes for the selection into `out` (a copy of the file).

        With `current` (the image's state record), every site must first hold the
        bytes that selection implies, or NotRecognised is raised naming it: the
        check runs in the same pass as the writes (`out` is a temporary copy, so
        a refusal leaves nothing behind). Returns the alternative each op's sites got.
        """
        chk = self.chk
        eff: dict[int, int] = {}
        groups = []
        for op in distinct(chk.site_ops[:chk.n_op], len(chk.shapes)):
            sh = chk.shapes[op]
            k = eff[op] = effective(sh, per_op[op])
            groups.append(_Group(self, out, op, k, None if current is None else
                                 effective(sh, current[op])))
        try:
            for group, addrs in _op_sites(chk, groups, by_record=True):
                group.send(addrs)
        except (NotRecognised, BadInput):
            # Met op by op, the same failures give the refusal they always gave: the
            # first site in record order of the first op that has one.
            for group, addrs in _op_sites(chk, groups, by_record=False):
                group.send(addrs)
            raise
        part = chk.site_ops[chk.n_op:]
        branch_sites = chk.op_view(chk.n_op)
        for op in distinct(part, len(chk.shapes)):
            sh = chk.shapes[op]
            k = eff[op] = effective(sh, per_op[op])
            cur = None if current is None else effective(sh, current[op])
            addrs, gens, yeses = (list(compress(col, _mask(part, op)))
                                  for col in (branch_sites, chk.gens, chk.yeses))
            self._branch_group(out, op, addrs, gens, yeses, k, cur, self._index)
        return eff

    def _offsets(self, addrs: list[int], L: int) -> tuple[int, list[int] | None]:
        """(vaddr - file offset) when one segment holds every site, else each offset."""
        seg = self.chk.exec_seg
        if seg is not None:
            return seg.vaddr - seg.offset, None
        offs = []
        for s in addrs:
            so = self.img.offset_of(s, L)
            assert so is not None  # validated by check_records
            offs.append(so)
        return 0, offs

    @staticmethod
    def _first_unrecognised(src, block: list[int], sd: int,  # type: ignore[no-untyped-def]
                            old: Template, cur: int | None, index: _Index) -> None:
        """Name the first site of a block that does not hold `old` (one is known not to)."""
        m = old.mask
        for s in block:
            so = s - sd
            if old.pos is None:
                ok = bytes(src[so:so + len(old.fin)]) == old.fin
            else:
                ok = bytes(src[so:so + old.pos]) == old.head and \
                    bytes(src[so + old.pos + 4:so + len(old.fin)]) == old.tail and \
                    old.fmt.unpack_from(src, so + old.pos)[0] == (old.c - s) & m
            if not ok:
                assert cur is not None
                raise NotRecognised(index.of(s), cur)
        # Every site holds it: `held` could not tell fast (a mapped file).

    def _slow_group(self, out, op: int, addrs: list[int], k: int,  # type: ignore[no-untyped-def]
                    cur: int | None, index: _Index) -> None:
        """Site by site through `site_bytes`: several fields, or sites in several segments."""
        src = self.img.data
        for s in addrs:
            i = index.of(s)
            L = self.chk.shapes[op].site_len
            so = self.img.offset_of(s, L)
            assert so is not None
            if cur is not None and src[so:so + L] != self.site_bytes(i, cur):
                raise NotRecognised(i, cur)
            out[so:so + L] = self.site_bytes(i, k)

    def _branch_group(self, out, op: int, addrs: list[int], gens: list[int],  # type: ignore[no-untyped-def]
                      yeses: list[int], k: int, cur: int | None, index: _Index) -> None:
        """Branch sites: `jmp` to the generic test or the true label, or a 5-byte NOP."""
        sd, offs = self._offsets(addrs, 5)
        src = self.img.data
        m = self.mask
        fmt = struct.Struct("<I" if self.wraps else "<i")
        new = self.copy(op, k)
        old = self.copy(op, cur) if cur is not None else None
        so = offs if offs is not None else list(map(operator.sub, addrs, repeat(sd)))

        jmp = struct.Struct("<BI" if self.wraps else "<Bi")

        def rels(kk: int) -> Iterator[int]:
            """Each site's jump to its generic (kk 0) or true label."""
            targets = gens if kk == 0 else yeses
            return map(operator.and_, map(operator.sub, targets,
                                          map(operator.add, addrs, repeat(5))), repeat(m))

        if old is not None:
            held = False
            if isinstance(src, bytes):
                try:
                    held = all(map(src.startswith, map(jmp.pack, repeat(0xE9), rels(cur)), so)) \
                        if old.per_site else all(map(src.startswith, repeat(old.code), so))
                except struct.error:
                    held = False
            if not held:  # name the first site that does not hold it (or check a mapping)
                for j, s in enumerate(addrs):
                    at = so[j]
                    if old.per_site:
                        t = gens[j] if cur == 0 else yeses[j]
                        ok = src[at] == 0xE9 and fmt.unpack_from(src, at + 1)[0] == (t - s - 5) & m
                    else:
                        ok = bytes(src[at:at + 5]) == old.code
                    if not ok:
                        assert cur is not None
                        raise NotRecognised(index.of(s), cur)
        if new.per_site:
            try:
                deque(map(jmp.pack_into, repeat(out), so, repeat(0xE9), rels(k)), maxlen=0)
            except struct.error:
                targets = gens if k == 0 else yeses
                bad = next(s for s, t in zip(addrs, targets, strict=True)
                           if not _fits_value(fmt, (t - s - 5) & m))
                raise site_error(self.t, bad, op, "jump does not fit in 32 bits") from None
        else:
            _fill(out, so, 5, new.code)


class _Group:
    """Writes one op's sites, a block of their addresses at a time (`send`)."""

    def __init__(self, sp: Splicer, out, op: int, k: int,  # type: ignore[no-untyped-def]
                 cur: int | None) -> None:
        self.sp, self.out, self.op, self.k, self.cur = sp, out, op, k, cur
        self.new = Template(sp.copy(op, k), sp.wraps)
        self.old = Template(sp.copy(op, cur), sp.wraps) if cur is not None else None
        seg = sp.chk.exec_seg
        self.slow = seg is None or not self.new.single or \
            (self.old is not None and not self.old.single)
        self.sd = seg.vaddr - seg.offset if seg is not None else 0

    def send(self, block: list[int]) -> None:
        sp, out, new, old = self.sp, self.out, self.new, self.old
        if self.slow:
            sp._slow_group(out, self.op, block, self.k, self.cur, sp._index)
            return
        src = sp.img.data
        so = list(map(operator.sub, block, repeat(self.sd)))
        if old is not None and not old.held(src, so, block):
            sp._first_unrecognised(src, block, self.sd, old, self.cur, sp._index)
        try:
            new.write(out, so, block)
        except struct.error:
            bad = next(s for s in block if not _fits(new, s))
            raise site_error(sp.t, bad, self.op, f"alternative {sp.t.alt_name(self.k)}: "
                             "relocated displacement does not fit in 32 bits") from None


_BLOCK = 1 << 16  # records per C-level pass: bounds the temporary lists, not the speed


def _op_sites(chk: Checked, groups: list[_Group], by_record: bool
              ) -> Iterator[tuple[_Group, list[int]]]:
    """(group, the addresses of its op's sites in a block of op records): a block at a
    time, every op's sites in it (`by_record`: the block's int objects made once), or
    op by op."""
    n_op = chk.n_op
    starts = range(0, n_op, _BLOCK)
    order = ((at, g) for at in starts for g in groups) if by_record else \
        ((at, g) for g in groups for at in starts)
    done = None
    for at, group in order:
        if at != done:
            end = min(n_op, at + _BLOCK)
            part, block, done = chk.site_ops[at:end], as_list(chk.site_addrs, at, end), at
        addrs = list(compress(block, _mask(part, group.op)))
        if addrs:
            yield group, addrs


def _mask(ops: Sequence[int], op: int) -> bytes:
    """A 0/1 byte per record: whether it is the op's."""
    if isinstance(ops, bytes):
        return ops.translate(only(op))
    return bytes(map(operator.eq, ops, repeat(op)))


def only(op: int) -> bytes:
    """The `bytes.translate` table that maps `op` to 1 and every other byte to 0."""
    table = bytearray(256)
    table[op] = 1
    return bytes(table)


def _fill(out, so: list[int], n: int, code: bytes) -> None:  # type: ignore[no-untyped-def]
    """Write `code` (n bytes) at every offset."""
    deque(map(struct.Struct(f"{n}s").pack_into, repeat(out), so, repeat(code)), maxlen=0)


def _fits_value(fmt: struct.Struct, v: int) -> bool:
    try:
        fmt.pack(v)
    except struct.error:
        return False
    return True


def _fits(t: Template, s: int) -> bool:
    return _fits_value(t.fmt, (t.c - s) & t.mask)


class _Index:
    """Site address -> site number, built only when a refusal must name a site."""

    def __init__(self, chk: Checked) -> None:
        self.chk = chk
        self._map: dict[int, int] | None = None

    def of(self, addr: int) -> int:
        if self._map is None:
            self._map = {a: i for i, a in enumerate(self.chk.site_addrs)}
        return self._map[addr]
