"""Compute the bytes of every site for a selection, and write them into a buffer.

`Splicer.apply` is the hot loop (one iteration per site, a million sites in
well under a second): the decisions that depend only on a record's shape (op,
lengths, flags) and the chosen alternative are made once per shape and kept in
a small plan tuple (shapeplan.py); bodies without PC-relative fields become
finished site bytes cached by (bytes, site_len); bodies with one 32-bit
PC-relative field (`call`, `jmp`, a RIP-relative access) are recognised by
their unchanging bytes around that field and patched with `struct.pack_into`.
Everything else (several fields, rel8 jumps that may need widening, a body
unlike the op's other copies) takes the general per-site path, `site_bytes`,
which decodes nothing twice. Checking what a site holds before it is
rewritten is recognise.py's.
"""

from __future__ import annotations

import struct

from linkfix import fixups, layout
from linkfix.padding import pad_cached
from linkfix.recognise import (
    CHECK_FIN,
    CHECK_NONE,
    CHECK_SLOW,
    CHECK_TARGET,
    NO_CHECK,
    NotRecognised,
    check_group,
    expectation,
)
from linkfix.shapeplan import (
    EMPTY,
    FIELDS,
    I32,
    REL32,
    SAME_FIELD,
    SAME_TARGET,
    STATIC,
    plan_shape,
    starts_with,
)
from linkfix.tables import Checked, Shape, Tables, site_error


def _fields_match(starts, x: tuple, at: int) -> bool:  # type: ignore[no-untyped-def]
    for pos, seg in x:
        if not starts(seg, at + pos):
            return False
    return True


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
                p = plans[key] = plan_shape(self, idxs[0], key, per_op)
                expect = NO_CHECK
                if current is not None:
                    cur = plan_shape(self, idxs[0], key, current)
                    expect = expectation(cur)
                    if expect[0] == CHECK_SLOW:
                        bad = check_group(self, cur, idxs)
                        if bad is not None:
                            raise NotRecognised(bad, cur[1])
                self._write_group(out, view, p, idxs, expect)
        finally:
            view.release()
        return {key: p[1] for key, p in plans.items()}

    def _put(self, out, at: int, value: int) -> None:  # type: ignore[no-untyped-def]
        """A rel32 field; on i386 a displacement wraps around the 4 GiB space."""
        try:
            I32.pack_into(out, at, value)
        except struct.error:
            if self.bits != 32:
                raise
            I32.pack_into(out, at, fixups.wrap32(value))

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
        pack_i32 = I32.pack_into
        unpack_i32 = I32.unpack_from
        offset_of = img.offset_of
        wraps = self.bits == 32  # i386 displacements wrap around the 4 GiB space
        mode, k, blist, bdelta, L, fin, x, y, z = p
        cm, chead, clo, ctail, cpos, cend, kc = expect
        if cm == CHECK_SLOW:
            cm = CHECK_NONE  # checked before the writes
        i = -1
        try:
            if mode == EMPTY:
                for i in idxs:
                    s = sites[i]
                    so = s - sdelta if one_seg else offset_of(s, L)
                    if cm and (not starts(chead, so) if cm == CHECK_FIN else
                               unpack_i32(src, so + cpos)[0] + s != clo
                               or not starts(chead, so) or not starts(ctail, so + cend)):
                        raise NotRecognised(i, kc)
                    view[so:so + L] = fin
                return
            if one_seg and bdelta is not None and (
                    mode == STATIC or mode == REL32 and z[1] == SAME_TARGET):
                # Every faithful copy of this body gives the site the same bytes (and,
                # for a call, the same target): the site gets those of the copy the
                # plan checked against the digest and the header's records, and each
                # other copy must equal it (else the general path, which refuses it).
                static = mode == STATIC
                pos, lo = (-1, 0) if static else (z[0], z[2])
                end = pos + 4
                fast_head = cm == CHECK_TARGET and len(chead) == 1 and not ctail
                hb = chead[0] if fast_head else 0
                for i in idxs:
                    s = sites[i]
                    so = s - sdelta
                    if fast_head:
                        if src[so] != hb or unpack_i32(src, so + cpos)[0] + s != clo:
                            raise NotRecognised(i, kc)
                    elif cm and (not starts(chead, so) if cm == CHECK_FIN else
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
            if mode == REL32 and one_seg and bdelta is not None:
                pos, how, lo, hi = z
                px, py = x, y
                end = pos + 4
                for i in idxs:
                    s = sites[i]
                    if cm and (not starts(chead, s - sdelta) if cm == CHECK_FIN else
                               unpack_i32(src, s - sdelta + cpos)[0] + s != clo
                               or not starts(chead, s - sdelta)
                               or not starts(ctail, s - sdelta + cend)):
                        raise NotRecognised(i, kc)
                    b = blist[i]
                    bo = b - bdelta
                    field = unpack_i32(src, bo + pos)[0]
                    got = field + b
                    if starts(px, bo) and starts(py, bo + end) \
                            and (got == lo if how == SAME_TARGET else
                                 field == lo if how == SAME_FIELD else lo <= got < hi):
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
                if cm and (not starts(chead, so) if cm == CHECK_FIN else
                           unpack_i32(src, so + cpos)[0] + s != clo
                           or not starts(chead, so) or not starts(ctail, so + cend)):
                    raise NotRecognised(i, kc)
                b = blist[i]
                bo = b - bdelta if bdelta is not None else offset_of(b, 1)
                if mode == STATIC:
                    if starts(x, bo):
                        view[so:so + L] = fin
                        continue
                elif mode == REL32:
                    pos, how, lo, hi = z
                    field = unpack_i32(src, bo + pos)[0]
                    got = field + b
                    if starts(x, bo) and starts(y, bo + pos + 4) \
                            and (got == lo if how == SAME_TARGET else
                                 field == lo if how == SAME_FIELD else lo <= got < hi):
                        view[so:so + L] = fin
                        value = got - s
                        try:
                            pack_i32(out, so + pos, value)
                        except struct.error:
                            if not wraps:
                                raise
                            pack_i32(out, so + pos, fixups.wrap32(value))
                        continue
                elif mode == FIELDS:
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
