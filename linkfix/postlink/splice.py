"""Compute the bytes of every site for a selection, and write them into a buffer.

Every site of an op gets the bytes of the op's one stored copy of the chosen
alternative (copies.py), with each 32-bit PC-relative field re-aimed from the
site: `target - site - pos`. A branch site's jumps take their targets from its
own record. `Splicer.apply` is the hot loop, one small loop per op (a million
sites in well under a second); with `current` it first checks, in the same
pass, that every site holds what the state record says, and refuses a site
that does not (NotRecognised).
"""

from __future__ import annotations

import operator
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import repeat

from linkfix import layout
from linkfix.postlink.copies import Copy
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


class _Template:
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
        index = self._index
        for op, addrs in chk.groups.items():
            sh = chk.shapes[op]
            k = eff[op] = effective(sh, per_op[op])
            cur = None if current is None else effective(sh, current[op])
            self._op_group(out, op, addrs, k, cur, index)
        for op, (addrs, gens, yeses) in chk.branch_groups.items():
            sh = chk.shapes[op]
            k = eff[op] = effective(sh, per_op[op])
            cur = None if current is None else effective(sh, current[op])
            self._branch_group(out, op, addrs, gens, yeses, k, cur, index)
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

    def _op_group(self, out, op: int, addrs: list[int], k: int,  # type: ignore[no-untyped-def]
                  cur: int | None, index: _Index) -> None:
        new = _Template(self.copy(op, k), self.wraps)
        old = _Template(self.copy(op, cur), self.wraps) if cur is not None else None
        L = len(new.fin)
        sd, offs = self._offsets(addrs, L)
        if offs is not None or not new.single or (old is not None and not old.single):
            self._slow_group(out, op, addrs, k, cur, index)
            return
        src = self.img.data
        for lo in range(0, len(addrs), _BLOCK):  # blocks bound the temporary lists
            block = addrs[lo:lo + _BLOCK]
            so = list(map(operator.sub, block, repeat(sd)))
            if old is not None and not old.held(src, so, block):
                self._first_unrecognised(src, block, sd, old, cur, index)
            try:
                new.write(out, so, block)
            except struct.error:
                bad = next(s for s in block if not _fits(new, s))
                raise site_error(self.t, bad, op, f"alternative {self.t.alt_name(k)}: "
                                 "relocated displacement does not fit in 32 bits") from None

    @staticmethod
    def _first_unrecognised(src, block: list[int], sd: int,  # type: ignore[no-untyped-def]
                            old: _Template, cur: int | None, index: _Index) -> None:
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


_BLOCK = 1 << 16  # sites per C-level pass: bounds the temporary lists, not the speed


def _fill(out, so: list[int], n: int, code: bytes) -> None:  # type: ignore[no-untyped-def]
    """Write `code` (n bytes) at every offset."""
    deque(map(struct.Struct(f"{n}s").pack_into, repeat(out), so, repeat(code)), maxlen=0)


def _fits_value(fmt: struct.Struct, v: int) -> bool:
    try:
        fmt.pack(v)
    except struct.error:
        return False
    return True


def _fits(t: _Template, s: int) -> bool:
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
