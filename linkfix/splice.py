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

import struct

from linkfix import layout
from linkfix.copies import Copy
from linkfix.tables import Checked, Shape, Tables, site_error


class NotRecognised(Exception):
    """Site `i` does not hold the bytes of alternative `k`, which its state record names."""

    def __init__(self, i: int, k: int) -> None:
        super().__init__(i, k)
        self.i = i
        self.k = k


def effective(shape: Shape, k: int) -> int:
    """The alternative a site gets when `k` is requested: k if it has a body, else generic."""
    return k if 0 <= k < len(shape.alts) and shape.alts[k].present else layout.GENERIC


def starts_with(data):  # type: ignore[no-untyped-def]
    """`data.startswith(x, at)` for bytes, and its equivalent for a mapped file."""
    if isinstance(data, bytes):
        return data.startswith
    find = data.find
    return lambda x, at: find(x, at, at + len(x)) == at


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
        starts = starts_with(src)
        fin, npos, nc = new.fin, new.pos, new.c
        pack = new.fmt.pack_into
        m = self.mask
        s = addrs[0] if addrs else 0
        try:
            if old is None:
                if npos is None:
                    for s in addrs:
                        so = s - sd
                        out[so:so + L] = fin
                else:
                    for s in addrs:
                        so = s - sd
                        out[so:so + L] = fin
                        pack(out, so + npos, (nc - s) & m)
                return
            unpack = old.fmt.unpack_from
            cfin, cpos, cc, chead, ctail = old.fin, old.pos, old.c, old.head, old.tail
            if cpos is None:
                for s in addrs:
                    so = s - sd
                    if not starts(cfin, so):
                        raise NotRecognised(index.of(s), cur)
                    out[so:so + L] = fin
                    if npos is not None:
                        pack(out, so + npos, (nc - s) & m)
                return
            cend = cpos + 4
            if npos is None:
                for s in addrs:
                    so = s - sd
                    if unpack(src, so + cpos)[0] != (cc - s) & m or not starts(chead, so) \
                            or not starts(ctail, so + cend):
                        raise NotRecognised(index.of(s), cur)
                    out[so:so + L] = fin
                return
            for s in addrs:
                so = s - sd
                if unpack(src, so + cpos)[0] != (cc - s) & m or not starts(chead, so) \
                        or not starts(ctail, so + cend):
                    raise NotRecognised(index.of(s), cur)
                out[so:so + L] = fin
                pack(out, so + npos, (nc - s) & m)
        except struct.error:
            raise site_error(self.t, s, op, f"alternative {self.t.alt_name(k)}: relocated "
                                            "displacement does not fit in 32 bits") from None

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
        pack, unpack = fmt.pack_into, fmt.unpack_from
        new = self.copy(op, k)
        old = self.copy(op, cur) if cur is not None else None
        for j, s in enumerate(addrs):
            so = s - sd if offs is None else offs[j]
            if old is not None:
                if old.per_site:
                    want = (gens[j] if cur == 0 else yeses[j]) - s - 5
                    ok = src[so] == 0xE9 and unpack(src, so + 1)[0] == want & m
                else:
                    ok = src[so:so + 5] == old.code
                if not ok:
                    raise NotRecognised(index.of(s), cur)
            if new.per_site:
                out[so] = 0xE9
                try:
                    pack(out, so + 1, ((gens[j] if k == 0 else yeses[j]) - s - 5) & m)
                except struct.error:
                    raise site_error(self.t, s, op, "jump does not fit in 32 bits") from None
            else:
                out[so:so + 5] = new.code


class _Index:
    """Site address -> site number, built only when a refusal must name a site."""

    def __init__(self, chk: Checked) -> None:
        self.chk = chk
        self._map: dict[int, int] | None = None

    def of(self, addr: int) -> int:
        if self._map is None:
            self._map = {a: i for i, a in enumerate(self.chk.site_addrs)}
        return self._map[addr]
