"""Keep an image's relocation entries consistent with re-written sites.

Two kinds of relocations can point into a site (docs/PATCH.md):

* Load-time (dynamic) relocations of an ET_DYN image (DT_RELA/DT_REL/DT_JMPREL/
  DT_RELR). The loader would write into the new bytes, so a changed site that
  holds one, or a spliced body that needs one, is refused.
* Link-time relocations kept by `ld --emit-relocs` (`.rela.text`, `.rel.text`,
  ...), which a relocatable kernel's build tools read to find the fields to
  adjust at boot. Each site owns the relocation slots whose r_offset lies
  inside it (as linked: the dispatch call's PC32/PLT32). After patching, those
  slots describe the new bytes: the chosen body's own relocations (from the
  relocation section of `.linkfix.repl`) moved to the site, then R_*_NONE
  entries (r_offset = the site address, so the slot stays owned and a later
  re-targeting finds it again). A body needing more absolute relocations than
  the site owns slots is refused; PC-relative ones that do not fit are left
  out, because the spliced displacement is final and does not change when the
  whole image moves.
"""

from __future__ import annotations

import bisect
import operator

from linkfix.errors import BadInput
from linkfix.postlink.image import EM_X86_64, ET_DYN, RelocTable
from linkfix.postlink.splice import Splicer
from linkfix.postlink.tables import Tables, site_error

# PC-relative types: the field's value does not change when the image moves as a whole.
_PCREL = {
    EM_X86_64: {2, 4, 9, 13, 15, 24, 26, 41, 42},  # PC32 PLT32 GOTPCREL PC16 PC8 PC64 GOTPC32 ..X
    3: {2, 4, 10, 21, 23},  # PC32 PLT32 GOTPC PC16 PC8
}
_NAMES = {
    EM_X86_64: {1: "R_X86_64_64", 2: "R_X86_64_PC32", 4: "R_X86_64_PLT32",
                10: "R_X86_64_32", 11: "R_X86_64_32S", 15: "R_X86_64_PC8"},
    3: {1: "R_386_32", 2: "R_386_PC32", 4: "R_386_PLT32", 23: "R_386_PC8", 8: "R_386_RELATIVE"},
}


def type_name(machine: int, typ: int) -> str:
    return _NAMES.get(machine, {}).get(typ, f"type {typ}")


class _Table:
    """One static relocation table, indexed by r_offset."""

    def __init__(self, rt: RelocTable, lo: int, hi: int) -> None:
        self.rt = rt
        live = sorted(rt.entries_in(lo, hi), key=lambda r: (r.offset, r.slot))
        self.offsets = [r.offset for r in live]
        self.entries = live

    def within(self, lo: int, hi: int) -> list:
        a = bisect.bisect_left(self.offsets, lo)
        b = bisect.bisect_left(self.offsets, hi)
        return self.entries[a:b]


def update(sp: Splicer, eff: dict[int, int], out: bytearray,
           current: tuple[int, ...] | None = None) -> int:
    """Check dynamic relocations and rewrite static ones; returns slots rewritten.

    `current`: the alternative each op's sites held before (the state record)."""
    t = sp.t
    img = t.image
    dyn = img.dynamic_reloc_offsets
    statics = img.static_relocs
    pie = img.etype == ET_DYN
    if not dyn and not statics and not pie:
        return 0
    site_tables, repl_table = _static_tables(sp, statics)
    chk = sp.chk
    rewritten = 0
    for s, op in zip(chk.site_addrs, chk.site_ops, strict=True):
        k = eff.get(op, 0)
        L = chk.shapes[op].site_len
        so = img.offset_of(s, L)
        assert so is not None
        copy = chk.copies[(op, k)]
        if op >= t.meta.n_real_ops:
            if statics:
                cur = current[op] if current is not None else 0
                rewritten += _branch_slots(sp, site_tables, s, op, k, cur, out)
            continue
        b, bl = (copy.addr, copy.length) if copy.addr is not None else (0, 0)
        changed = out[so:so + L] != img.data[so:so + L]
        if dyn and changed:
            _refuse_dynamic(t, s, op, dyn, s, L, "the site")
            if bl:
                _refuse_dynamic(t, s, op, dyn, b, bl, f"the {t.alt_name(k)} copy")
        if pie and changed and any(not link.pcrel for link in t.meta.alt(op, k).digest.links):
            # Whatever relocates the copy at load time, nothing would relocate the site.
            raise site_error(t, s, op, f"alternative {t.alt_name(k)} has an absolute field, "
                                       "which a position-independent image cannot hold at "
                                       "a site")
        if not statics:
            continue
        sec = img.section_at(s)
        table = site_tables.get(sec.index) if sec else None
        owned = sorted(table.within(s, s + L), key=lambda r: r.slot) if table else []
        body_relocs = repl_table.within(b, b + bl) if (repl_table and bl) else []
        body_relocs = [r for r in body_relocs if r.type != 0]
        pcrel = _PCREL[img.machine]
        absolute = [r for r in body_relocs if r.type not in pcrel]
        if len(absolute) > len(owned):
            what = ", ".join(type_name(img.machine, r.type) for r in absolute)
            where = table.rt.section.name if table else \
                f"no relocation section for {sec.name if sec else '?'}"
            raise site_error(t, s, op, f"alternative {t.alt_name(k)} needs {len(absolute)} "
                                       f"absolute relocation(s) ({what}) but the site owns "
                                       f"{len(owned)} slot(s) in {where}")
        keep = absolute + [r for r in body_relocs if r.type in pcrel]
        keep = sorted(keep[:len(owned)], key=lambda r: r.offset)
        if keep and table is not None and repl_table is not None:
            _check_compatible(t, s, op, table, repl_table)
        assert table is not None or not owned
        for j, slot in enumerate(owned):
            if j < len(keep):
                r = keep[j]
                entry = (s + r.offset - b, img.encode_info(r.sym, r.type), r.addend)
            else:
                entry = (s, img.encode_info(0, 0), 0)
            assert table is not None
            if table.rt.rela:
                img.reloc_struct(True).pack_into(out, slot.slot, *entry)
            else:
                img.reloc_struct(False).pack_into(out, slot.slot, entry[0], entry[1])
            rewritten += 1
    return rewritten


_JUMP_TYPE = {EM_X86_64: 2, 3: 2}  # R_X86_64_PC32, R_386_PC32: a linked `jmp rel32`


def _branch_slots(sp: Splicer, site_tables: dict[int, _Table], s: int, op: int, k: int,
                  cur: int, out: bytearray) -> int:
    """A branch site's one relocation slot follows its jump.

    As linked it is the jump's PC32 to the generic test. Patched to the "true"
    label it keeps the symbol with the addend moved by (true - generic); as a
    NOP it becomes R_*_NONE, keeping the symbol and the generic addend, so that
    re-targeting restores the linked entry exactly.
    """
    t = sp.t
    img = t.image
    sec = img.section_at(s)
    table = site_tables.get(sec.index) if sec else None
    if table is None:
        return 0
    owned = table.within(s, s + 5)
    if not owned:
        return 0
    i = sp.index_of(s)
    g, y = sp.chk.branch_targets(i)
    b = op - t.meta.n_real_ops + 1
    if len(owned) != 1 or owned[0].offset != s + 1 or \
            owned[0].type not in (0, _JUMP_TYPE[img.machine]):
        raise site_error(t, s, op, "its relocation slots are not the one PC32 entry of its "
                                   "jump; cannot keep them consistent")
    r = owned[0]
    base = r.addend - (y - g if cur == b else 0)  # the generic addend
    typ = 0 if k not in (0, b) else _JUMP_TYPE[img.machine]
    addend = base + (y - g if k == b else 0)
    if table.rt.rela:
        img.reloc_struct(True).pack_into(out, r.slot, s + 1, img.encode_info(r.sym, typ), addend)
    else:
        img.reloc_struct(False).pack_into(out, r.slot, s + 1, img.encode_info(r.sym, typ))
    return 1


def _refuse_dynamic(t: Tables, s: int, op: int, dyn: list[int], lo: int, size: int,
                    what: str) -> None:
    j = bisect.bisect_left(dyn, lo)
    if j < len(dyn) and dyn[j] < lo + size:
        raise site_error(t, s, op, f"a load-time (dynamic) relocation at {dyn[j]:#x} lies in "
                                   f"{what}; patching it would be undone or corrupted by the "
                                   "loader")


def _static_tables(sp: Splicer, statics: tuple[RelocTable, ...]
                   ) -> tuple[dict[int, _Table], _Table | None]:
    t, chk = sp.t, sp.chk
    img = t.image
    # Only entries that can matter are decoded: those in the span of the sites and
    # those in .linkfix.repl.
    sites = chk.site_addrs
    lo = min(sites, default=0)
    hi = max(map(operator.add, sites, chk.site_lens), default=0)
    repl = t.repl_region
    repl_sec = img.section_at(repl.vaddr) if repl is not None and repl.size else None
    by_target: dict[int, _Table] = {}
    repl_table = None
    for rt in statics:
        index = rt.section.info
        if index in by_target or (repl_table and repl_sec and index == repl_sec.index):
            raise BadInput(img.path, f"two relocation sections for section index {index}")
        if repl_sec is not None and index == repl_sec.index:
            assert repl is not None
            repl_table = _Table(rt, repl.vaddr, repl.vaddr + repl.size)
        else:
            by_target[index] = _Table(rt, lo, hi)
    return by_target, repl_table


def _check_compatible(t: Tables, s: int, op: int, site: _Table, repl: _Table) -> None:
    a, b = site.rt, repl.rt
    if a.rela != b.rela or a.section.link != b.section.link:
        raise site_error(t, s, op, f"relocation sections {a.section.name} and {b.section.name} "
                               "differ in kind or symbol table; cannot move relocations")
