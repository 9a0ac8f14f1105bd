"""The decisions `Splicer.apply` makes once per record shape, as one 9-tuple plan.

A plan is (mode, k, body addresses, body vaddr - file offset, site length,
finished bytes, x, y, z): EMPTY and STATIC sites get the same bytes from every
copy; REL32 ones re-target one 32-bit PC-relative field (x, y: the body bytes
around it, z: where it is and how a copy's field is checked); FIELDS ones
several (x: the bytes every copy shares, y: the fields, z: the smallest
|delta| the template holds for); GENERAL ones take `Splicer.site_bytes` site
by site. The writer (splice.py) and the checker (recognise.py) both read plans.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from linkfix import fixups, layout
from linkfix.padding import pad_cached
from linkfix.tables import Shape, site_error

if TYPE_CHECKING:
    from linkfix.splice import Splicer

EMPTY, STATIC, REL32, FIELDS, GENERAL = range(5)
SAME_TARGET, SAME_FIELD, IN_CODE = range(3)  # how REL32 checks a copy's field
I32 = struct.Struct("<i")


def effective(shape: Shape, k: int) -> int:
    """The alternative a site gets when `k` is requested: k if it has a body, else generic."""
    return k if shape.alts[k].present else layout.GENERIC


def starts_with(data):  # type: ignore[no-untyped-def]
    """`data.startswith(x, at)` for bytes, and its equivalent for a mapped file."""
    if isinstance(data, bytes):
        return data.startswith
    find = data.find
    return lambda x, at: find(x, at, at + len(x)) == at


def plan_shape(sp: Splicer, i: int, key: bytes, per_op: tuple[int, ...]) -> tuple:
    """Everything the hot loop needs for one record shape, as one 9-tuple."""
    sh = sp.chk.shapes[key]
    k = effective(sh, per_op[sh.op])
    alt = sh.alts[k]
    L = sh.site_len
    d = sp.t.meta.digests[sh.op][k]
    if alt.len != d.length:
        raise site_error(sp.t, i, f"alternative {sp.t.alt_name(k)}: a {alt.len}-byte "
                                  f"body where gen-stubs recorded {d.length} bytes")
    if not alt.len:
        return (EMPTY, k, None, None, L, pad_cached(L), None, None, None)
    blist = sp.chk.body_addrs(k)
    bseg = sp.chk.body_segs[k]
    bdelta = bseg.vaddr - bseg.offset if bseg is not None else None
    body = sp.body(i, k)
    finished = sp.site_bytes(i, k)  # validates flags, decodes, range-checks this copy
    code = sp.code_for(i, k, body)
    if not code.external:
        return (STATIC, k, blist, bdelta, L, finished, body, None, len(body))
    plan = fixups.field_plan(code)
    if plan is None or plan.length > L:
        return (GENERAL, k, blist, bdelta, L, None, None, None, None)
    seg = sp.chk.exec_seg
    if len(plan.fields) == 1 and code.simple and (sh.kind == layout.KIND_OP or seg):
        p = code.external[0].pos
        end = next(n.off + n.size for n in code.insns if n.field is code.external[0])
        value = struct.unpack_from("<i", body, p)[0]
        if not sp.relocated(sh, k, p):
            # gen-stubs assembled this field itself: the digest fixes its bytes
            check = (SAME_FIELD, value, 0)
        elif sh.kind == layout.KIND_OP:
            # value + body address is the same for every faithful copy of the body
            check = (SAME_TARGET, value + blist[i], 0)
        else:  # a branch's own label: anywhere in the code segment
            assert seg is not None
            check = (IN_CODE, seg.vaddr - end, seg.vaddr + seg.filesz - end)
        return (REL32, k, blist, bdelta, L, finished, body[:p], body[p + 4:], (p, *check))
    if sh.kind != layout.KIND_OP:
        return (GENERAL, k, blist, bdelta, L, None, None, None, None)
    delta = blist[i] - sp.chk.site_addrs[i]
    try:
        template = fixups.relocate(code, body, delta, L, widen_all=bool(plan.min_delta),
                                   bits=sp.bits)
    except fixups.FixupError:
        return (GENERAL, k, blist, bdelta, L, None, None, None, None)
    template += pad_cached(L - len(template))
    # The bytes every copy shares: all but the fields the link filled in (the
    # others are pinned by the digest, so they must equal this copy's).
    linked = [f for f in code.external if sp.relocated(sh, k, f.pos)]
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
    return (FIELDS, k, blist, bdelta, L, template, tuple(segs), tuple(fields),
            plan.min_delta)
