"""Compute the bytes of every site for a selection, and write them into a buffer.

`Splicer.apply` is the hot loop (one iteration per site, a million sites in
well under a second): the decisions that depend only on a record's shape (op,
lengths, flags) and the chosen alternative are made once per shape and kept in
a small plan tuple; bodies without PC-relative fields become finished site
bytes cached by (bytes, site_len); bodies with one 32-bit PC-relative field
(`call`, `jmp`, a RIP-relative access) are recognised by their unchanging bytes
around that field and patched with `struct.pack_into`. Everything else (several
fields, rel8 jumps that may need widening, a body unlike the op's other copies)
takes the general per-site path, `site_bytes`, which decodes nothing twice.
"""

from __future__ import annotations

import struct

from linkfix import fixups, layout
from linkfix.padding import pad_cached
from linkfix.tables import Checked, Shape, Tables, site_error

_EMPTY, _STATIC, _REL32, _FIELDS, _GENERAL = range(5)
_SAME_TARGET, _SAME_FIELD, _IN_CODE = range(3)  # how _REL32 checks a copy's field
# How apply recognises what a site holds before it writes (see _expectation).
_CHECK_NONE, _CHECK_FIN, _CHECK_TARGET, _CHECK_SLOW = range(4)
_NO_CHECK = (_CHECK_NONE, b"", 0, b"", 0, 0, 0)


class NotRecognised(Exception):
    """Site `i` does not hold the bytes of alternative `k`, which its state record names."""

    def __init__(self, i: int, k: int) -> None:
        super().__init__(i, k)
        self.i = i
        self.k = k


def _expectation(cur: tuple) -> tuple:
    """From the plan of what a site should hold now: how to check it in the write loop.

    (_CHECK_FIN, bytes, ...): the site is exactly those bytes; (_CHECK_TARGET, head,
    target, tail, pos, end, k): fixed bytes around a rel32 field reaching one place
    for every site; (_CHECK_SLOW, ...): checked site by site before the loop.
    """
    mode, k, _blist, bdelta, _L, fin, _x, _y, z = cur
    if mode in (_EMPTY, _STATIC) and (mode == _EMPTY or bdelta is not None):
        return (_CHECK_FIN, fin, 0, b"", 0, 0, k)
    if mode == _REL32 and z[1] == _SAME_TARGET:
        pos = z[0]
        return (_CHECK_TARGET, fin[:pos], z[2], fin[pos + 4:], pos, pos + 4, k)
    return (_CHECK_SLOW, b"", 0, b"", 0, 0, k)


def _fields_match(starts, x: tuple, at: int) -> bool:  # type: ignore[no-untyped-def]
    for pos, seg in x:
        if not starts(seg, at + pos):
            return False
    return True
_I32 = struct.Struct("<i")


def effective(shape: Shape, k: int) -> int:
    """The alternative a site gets when `k` is requested: k if it has a body, else generic."""
    return k if shape.alts[k].present else layout.GENERIC


def starts_with(data):  # type: ignore[no-untyped-def]
    """`data.startswith(x, at)` for bytes, and its equivalent for a mapped file."""
    if isinstance(data, bytes):
        return data.startswith
    find = data.find
    return lambda x, at: find(x, at, at + len(x)) == at


class Splicer:
    def __init__(self, t: Tables, chk: Checked) -> None:
        self.t = t
        self.chk = chk
        self.img = t.image
        self.bits = t.image.bits
        self.mask = (1 << self.bits) - 1
        self._templates: dict[tuple[int, int], fixups.Code] = {}
        self._targets: dict[tuple[int, int], tuple[int, ...]] = {}
        self._groups: dict[bytes, list[int]] | None = None

    # -- the general path ------------------------------------------------------------------

    def shape_of(self, i: int) -> Shape:
        return self.chk.shapes[self.chk.key_of(i)]

    def body(self, i: int, k: int) -> bytes:
        sh = self.shape_of(i)
        bl = sh.alts[k].len
        if not bl:
            return b""
        got = self.img.read(self.chk.body_addrs(k)[i], bl)
        assert got is not None  # validated by check_records
        return got

    def code_for(self, i: int, k: int, body: bytes) -> fixups.Code:
        """The decoded body; the op's first decoded copy serves every copy with its skeleton.

        Every copy unlike that first one is checked against the digest first: the
        skeleton masks all PC-relative fields, the digest only those the link
        filled in (a rel8 jump the body carries itself must not change).
        """
        sh = self.shape_of(i)
        tmpl = self._templates.get((sh.op, k))
        if tmpl is not None and body == tmpl.body:
            return tmpl
        self.check_digest(i, k, body)
        if tmpl is not None and len(tmpl.body) == len(body):
            skel = bytearray(body)
            for f in tmpl.external:
                skel[f.pos:f.pos + f.size] = bytes(f.size)
            if skel == tmpl.skeleton:
                return tmpl
        try:
            code = fixups.analyze(body, self.bits)
        except fixups.FixupError as exc:
            raise site_error(self.t, i, f"alternative {self.t.alt_name(k)}: {exc}") from None
        self._templates.setdefault((sh.op, k), code)
        return code

    def check_digest(self, i: int, k: int, body: bytes) -> None:
        """Refuse a body copy that is not what gen-stubs assembled for its op and backend."""
        sh = self.shape_of(i)
        digests = self.t.meta.digests
        d = digests[sh.op][k] if sh.op < len(digests) else layout.ABSENT
        if not layout.digest_matches(d, body):
            raise site_error(self.t, i, f"alternative {self.t.alt_name(k)}: body "
                                        f"{body.hex()} does not match the digest gen-stubs "
                                        f"recorded ({d.length} bytes, crc {d.crc:#010x})")
        pos = layout.wrong_field(d, body, self.chk.body_addrs(k)[i])
        if pos is not None:
            raise site_error(self.t, i, f"alternative {self.t.alt_name(k)}: the relocated "
                                        f"field at +{pos} of body {body.hex()} does not point "
                                        "where the link pointed it (the header's record)")

    def targets(self, i: int, k: int, code: fixups.Code, body: bytes) -> tuple[int, ...]:
        """Where the relocated PC-relative fields of site i's copy of alternative k lead
        (the others are fixed by the digest)."""
        b = self.chk.body_addrs(k)[i]
        sh = self.shape_of(i)
        out = []
        for ins in code.insns:
            f = ins.field
            if f is not None and not f.internal and self.relocated(sh, k, f.pos):
                (disp,) = struct.unpack_from(fixups.size_format(f.size), body, f.pos)
                out.append((b + ins.off + ins.size + disp) & self.mask)
        return tuple(out)

    def relocated(self, sh: Shape, k: int, pos: int) -> bool:
        """Is the field at `pos` one the link filled in (masked in the digest)?"""
        return any(p == pos for p, _n in self.t.meta.digests[sh.op][k].fields)

    def check_targets(self, i: int, k: int, code: fixups.Code, body: bytes) -> None:
        """Every copy of an op's alternative reaches the same places (its thunk, its
        variable): the digest cannot cover those fields, the other copies can. A
        branch site's "true" jump leads to its own label, but never out of the code."""
        sh = self.shape_of(i)
        got = self.targets(i, k, code, body)
        name = self.t.alt_name(k)
        if sh.kind == layout.KIND_BRANCH:
            for tgt in got:
                if self.img.load_for(tgt, 1, executable=True) is None:
                    raise site_error(self.t, i, f"alternative {name}: jumps to {tgt:#x}, "
                                                "outside the executable segments")
            return
        seen = self._targets.setdefault((sh.op, k), got)
        if seen != got:
            where = ", ".join(f"{x:#x}" for x in got)
            first = ", ".join(f"{x:#x}" for x in seen)
            raise site_error(self.t, i, f"alternative {name}: reaches {where} where the op's "
                                        f"other copies reach {first}")

    def site_bytes(self, i: int, k: int) -> bytes:
        """The exact bytes site i holds when patched to alternative k (k must be present)."""
        return self.placed(i, k)[0]

    def placed(self, i: int, k: int) -> tuple[bytes, int]:
        """Site i's bytes for alternative k, and how many of them are body (not padding)."""
        sh = self.shape_of(i)
        alt = sh.alts[k]
        L = sh.site_len
        if not alt.len:
            d = self.t.meta.digests[sh.op][k]
            if d.length:
                raise site_error(self.t, i, f"alternative {self.t.alt_name(k)}: empty, but "
                                            f"gen-stubs recorded a {d.length}-byte body")
            return pad_cached(L), 0
        body = self.body(i, k)
        name = self.t.alt_name(k)
        if alt.flags & layout.FLAG_CALL and body[0] != 0xE8:
            raise site_error(self.t, i, f"alternative {name}: flagged as a call but starts "
                                        f"with {body[0]:#04x}")
        if alt.flags & layout.FLAG_JMP and body[0] != 0xE9:
            raise site_error(self.t, i, f"alternative {name}: flagged as a jmp but starts "
                                        f"with {body[0]:#04x}")
        code = self.code_for(i, k, body)
        if not code.external:
            return body + pad_cached(L - len(body)), len(body)
        self.check_targets(i, k, code, body)
        delta = self.chk.body_addrs(k)[i] - self.chk.site_addrs[i]
        try:
            new = fixups.relocate(code, body, delta, L, bits=self.bits)
        except fixups.FixupError as exc:
            raise site_error(self.t, i, f"alternative {name}: {exc}") from None
        return new + pad_cached(L - len(new)), len(new)

    # -- the hot loop ----------------------------------------------------------------------

    def _plan(self, i: int, key: bytes, per_op: tuple[int, ...]) -> tuple:
        """Everything the hot loop needs for one record shape, as one 9-tuple."""
        sh = self.chk.shapes[key]
        k = effective(sh, per_op[sh.op])
        alt = sh.alts[k]
        L = sh.site_len
        d = self.t.meta.digests[sh.op][k]
        if alt.len != d.length:
            raise site_error(self.t, i, f"alternative {self.t.alt_name(k)}: a {alt.len}-byte "
                                        f"body where gen-stubs recorded {d.length} bytes")
        if not alt.len:
            return (_EMPTY, k, None, None, L, pad_cached(L), None, None, None)
        blist = self.chk.body_addrs(k)
        bseg = self.chk.body_segs[k]
        bdelta = bseg.vaddr - bseg.offset if bseg is not None else None
        body = self.body(i, k)
        finished = self.site_bytes(i, k)  # validates flags, decodes, range-checks this copy
        code = self.code_for(i, k, body)
        if not code.external:
            return (_STATIC, k, blist, bdelta, L, finished, body, None, len(body))
        plan = fixups.field_plan(code)
        if plan is None or plan.length > L:
            return (_GENERAL, k, blist, bdelta, L, None, None, None, None)
        seg = self.chk.exec_seg
        if len(plan.fields) == 1 and code.simple and (sh.kind == layout.KIND_OP or seg):
            p = code.external[0].pos
            end = next(n.off + n.size for n in code.insns if n.field is code.external[0])
            value = struct.unpack_from("<i", body, p)[0]
            if not self.relocated(sh, k, p):
                # gen-stubs assembled this field itself: the digest fixes its bytes
                check = (_SAME_FIELD, value, 0)
            elif sh.kind == layout.KIND_OP:
                # value + body address is the same for every faithful copy of the body
                check = (_SAME_TARGET, value + blist[i], 0)
            else:  # a branch's own label: anywhere in the code segment
                assert seg is not None
                check = (_IN_CODE, seg.vaddr - end, seg.vaddr + seg.filesz - end)
            return (_REL32, k, blist, bdelta, L, finished, body[:p], body[p + 4:], (p, *check))
        if sh.kind != layout.KIND_OP:
            return (_GENERAL, k, blist, bdelta, L, None, None, None, None)
        delta = blist[i] - self.chk.site_addrs[i]
        try:
            template = fixups.relocate(code, body, delta, L, widen_all=bool(plan.min_delta),
                                       bits=self.bits)
        except fixups.FixupError:
            return (_GENERAL, k, blist, bdelta, L, None, None, None, None)
        template += pad_cached(L - len(template))
        # The bytes every copy shares: all but the fields the link filled in (the
        # others are pinned by the digest, so they must equal this copy's).
        linked = [f for f in code.external if self.relocated(sh, k, f.pos)]
        segs = []
        pos = 0
        for f in linked:
            if f.pos > pos:
                segs.append((pos, body[pos:f.pos]))
            pos = f.pos + f.size
        if pos < len(body):
            segs.append((pos, body[pos:]))
        fields = []
        for new_pos, old_pos, old_size, new_size, const in plan.fields:
            unpack = struct.Struct(fixups.size_format(old_size)).unpack_from
            # value + body address is the same for every faithful copy of a linked field
            want = unpack(body, old_pos)[0] + blist[i] if any(f.pos == old_pos for f in linked) \
                else None
            fields.append((new_pos, old_pos, unpack,
                           struct.Struct(fixups.size_format(new_size)).pack_into, const, want))
        return (_FIELDS, k, blist, bdelta, L, template, tuple(segs), tuple(fields),
                plan.min_delta)

    def groups(self) -> dict[bytes, list[int]]:
        """Record indices by shape key (computed once: patch applies twice)."""
        if self._groups is None:
            groups: dict[bytes, list[int]] = {}
            for i, key in enumerate(self.chk.keys()):
                g = groups.get(key)
                if g is None:
                    groups[key] = [i]
                else:
                    g.append(i)
            self._groups = groups
        return self._groups

    def apply(self, out, per_op: tuple[int, ...],  # type: ignore[no-untyped-def]
              current: tuple[int, ...] | None = None) -> dict[bytes, int]:
        """Write every site's bytes for the selection into `out` (a copy of the file).

        With `current` (the image's state record), every site must first hold the
        bytes that selection implies, or NotRecognised is raised naming it: the
        check runs in the same pass as the writes (`out` is a temporary copy, so
        a refusal leaves nothing behind). Sites are handled shape by shape, so the
        per-shape decisions are made once and the inner loops stay small. Returns
        the effective alternative chosen for every record shape.
        """
        plans: dict[bytes, tuple] = {}
        view = memoryview(out)
        try:
            for key, idxs in self.groups().items():
                p = plans[key] = self._plan(idxs[0], key, per_op)
                expect = _NO_CHECK
                if current is not None:
                    cur = self._plan(idxs[0], key, current)
                    expect = _expectation(cur)
                    if expect[0] == _CHECK_SLOW:
                        bad = self._check_group(cur, idxs)
                        if bad is not None:
                            raise NotRecognised(bad, cur[1])
                self._write_group(out, view, p, idxs, expect)
        finally:
            view.release()
        return {key: p[1] for key, p in plans.items()}

    def _check_group(self, p: tuple, idxs: list[int]) -> int | None:
        """The first of `idxs` whose site does not hold what plan `p` writes, or None."""
        src = self.img.data
        starts = starts_with(src)
        sites = self.chk.site_addrs
        seg = self.chk.exec_seg
        unpack_i32 = _I32.unpack_from
        mode, k, blist, bdelta, L, fin, x, y, z = p
        if seg is None or bdelta is None or mode not in (_EMPTY, _STATIC, _REL32):
            offset_of = self.img.offset_of
            return next((i for i in idxs if src[(so := offset_of(sites[i], L)):so + L]
                         != self.site_bytes(i, k)), None)
        sdelta = seg.vaddr - seg.offset
        if mode == _EMPTY or mode == _STATIC:
            for i in idxs:
                so = sites[i] - sdelta
                if not starts(fin, so):
                    return i
                if mode == _STATIC:
                    bo = blist[i] - bdelta
                    if not starts(x, bo) and self.site_bytes(i, k) != fin:
                        return i
            return None
        pos, how, lo, hi = z
        end = pos + 4
        head, tail = fin[:pos], fin[end:]
        for i in idxs:
            s = sites[i]
            b = blist[i]
            so, bo = s - sdelta, b - bdelta
            field = unpack_i32(src, bo + pos)[0]
            got = field + b
            if starts(x, bo) and starts(y, bo + end) \
                    and (got == lo if how == _SAME_TARGET else
                         field == lo if how == _SAME_FIELD else lo <= got < hi):
                if not starts(head, so) or not starts(tail, so + end) \
                        or unpack_i32(src, so + pos)[0] + s != got:
                    return i
            elif src[so:so + L] != self.site_bytes(i, k):
                return i
        return None

    def _put(self, out, at: int, value: int) -> None:  # type: ignore[no-untyped-def]
        """A rel32 field; on i386 a displacement wraps around the 4 GiB space."""
        try:
            _I32.pack_into(out, at, value)
        except struct.error:
            if self.bits != 32:
                raise
            _I32.pack_into(out, at, fixups.wrap32(value))

    def _write_group(self, out, view: memoryview, p: tuple, idxs: list[int],  # type: ignore[no-untyped-def]
                     expect: tuple) -> None:
        chk = self.chk
        img = self.img
        sites = chk.site_addrs
        src = img.data
        starts = starts_with(src)
        seg = chk.exec_seg
        # Validation found the one segment holding all sites (and, per alternative,
        # all bodies) in the usual case: then a subtraction maps vaddr to file offset.
        one_seg = seg is not None
        sdelta = seg.vaddr - seg.offset if seg is not None else 0
        pack_i32 = _I32.pack_into
        unpack_i32 = _I32.unpack_from
        offset_of = img.offset_of
        wraps = self.bits == 32  # i386 displacements wrap around the 4 GiB space
        mode, k, blist, bdelta, L, fin, x, y, z = p
        cm, chead, clo, ctail, cpos, cend, kc = expect
        if cm == _CHECK_SLOW:
            cm = _CHECK_NONE  # checked before the writes
        i = -1
        try:
            if mode == _EMPTY:
                for i in idxs:
                    s = sites[i]
                    so = s - sdelta if one_seg else offset_of(s, L)
                    if cm and (not starts(chead, so) if cm == _CHECK_FIN else
                               unpack_i32(src, so + cpos)[0] + s != clo
                               or not starts(chead, so) or not starts(ctail, so + cend)):
                        raise NotRecognised(i, kc)
                    view[so:so + L] = fin
                return
            if one_seg and bdelta is not None and (
                    mode == _STATIC or mode == _REL32 and z[1] == _SAME_TARGET):
                # Every faithful copy of this body gives the site the same bytes (and,
                # for a call, the same target): the site gets those of the copy the
                # plan checked against the digest and the header's records, and each
                # other copy must equal it (else the general path, which refuses it).
                static = mode == _STATIC
                pos, lo = (-1, 0) if static else (z[0], z[2])
                end = pos + 4
                fast_head = cm == _CHECK_TARGET and len(chead) == 1 and not ctail
                hb = chead[0] if fast_head else 0
                for i in idxs:
                    s = sites[i]
                    so = s - sdelta
                    if fast_head:
                        if src[so] != hb or unpack_i32(src, so + cpos)[0] + s != clo:
                            raise NotRecognised(i, kc)
                    elif cm and (not starts(chead, so) if cm == _CHECK_FIN else
                                 unpack_i32(src, so + cpos)[0] + s != clo
                                 or not starts(chead, so) or not starts(ctail, so + cend)):
                        raise NotRecognised(i, kc)
                    b = blist[i]
                    bo = b - bdelta
                    if static:
                        if not starts(x, bo):
                            view[so:so + L] = self.site_bytes(i, k)
                            continue
                    elif unpack_i32(src, bo + pos)[0] + b != lo or not starts(x, bo) \
                            or not starts(y, bo + end):
                        view[so:so + L] = self.site_bytes(i, k)
                        continue
                    view[so:so + L] = fin
                    if not static:
                        try:
                            pack_i32(out, so + pos, lo - s)
                        except struct.error:
                            self._put(out, so + pos, lo - s)
                return
            if mode == _REL32 and one_seg and bdelta is not None:
                pos, how, lo, hi = z
                px, py = x, y
                end = pos + 4
                for i in idxs:
                    s = sites[i]
                    if cm and (not starts(chead, s - sdelta) if cm == _CHECK_FIN else
                               unpack_i32(src, s - sdelta + cpos)[0] + s != clo
                               or not starts(chead, s - sdelta)
                               or not starts(ctail, s - sdelta + cend)):
                        raise NotRecognised(i, kc)
                    b = blist[i]
                    bo = b - bdelta
                    field = unpack_i32(src, bo + pos)[0]
                    got = field + b
                    if starts(px, bo) and starts(py, bo + end) \
                            and (got == lo if how == _SAME_TARGET else
                                 field == lo if how == _SAME_FIELD else lo <= got < hi):
                        so = s - sdelta
                        view[so:so + L] = fin
                        try:
                            pack_i32(out, so + pos, got - s)
                        except struct.error:
                            if not wraps:
                                raise
                            pack_i32(out, so + pos, fixups.wrap32(got - s))
                    else:
                        so = s - sdelta
                        view[so:so + L] = self.site_bytes(i, k)
                return
            for i in idxs:
                s = sites[i]
                so = s - sdelta if one_seg else offset_of(s, L)
                if cm and (not starts(chead, so) if cm == _CHECK_FIN else
                           unpack_i32(src, so + cpos)[0] + s != clo
                           or not starts(chead, so) or not starts(ctail, so + cend)):
                    raise NotRecognised(i, kc)
                b = blist[i]
                bo = b - bdelta if bdelta is not None else offset_of(b, 1)
                if mode == _STATIC:
                    if starts(x, bo):
                        view[so:so + L] = fin
                        continue
                elif mode == _REL32:
                    pos, how, lo, hi = z
                    field = unpack_i32(src, bo + pos)[0]
                    got = field + b
                    if starts(x, bo) and starts(y, bo + pos + 4) \
                            and (got == lo if how == _SAME_TARGET else
                                 field == lo if how == _SAME_FIELD else lo <= got < hi):
                        view[so:so + L] = fin
                        value = got - s
                        try:
                            pack_i32(out, so + pos, value)
                        except struct.error:
                            if not wraps:
                                raise
                            pack_i32(out, so + pos, fixups.wrap32(value))
                        continue
                elif mode == _FIELDS:
                    d = b - s
                    if (d > z or -d > z) and _fields_match(starts, x, bo):
                        ok = True
                        values = []
                        for _n, old_pos, unpack, _p, _c, w in y:
                            v = unpack(src, bo + old_pos)[0]
                            if w is not None and v + b != w:
                                ok = False
                                break
                            values.append(v)
                        if ok:
                            view[so:so + L] = fin
                            for v, (new_pos, _o, _u, pack, const, _w) in zip(values, y,
                                                                               strict=True):
                                try:
                                    pack(out, so + new_pos, v + d + const)
                                except struct.error:
                                    if not wraps:
                                        raise
                                    pack(out, so + new_pos, fixups.wrap32(v + d + const))
                            continue
                view[so:so + L] = self.site_bytes(i, k)
        except struct.error:
            raise site_error(self.t, i, f"alternative {self.t.alt_name(k)}: relocated "
                                        "displacement does not fit in 32 bits") from None
