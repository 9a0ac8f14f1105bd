"""Sites in the linux profile: what objtool and the kernel's alternatives see of them.

Each op site and branch site carries, besides its linkfix record:

* a `.discard.noendbr` entry (Linux's ANNOTATE_NOENDBR, no bytes in the image) for
  every code address a linkfix table stores: the site, and a branch site's two
  labels. objtool (`--ibt`) warns about a data relocation to code that is neither
  ENDBR nor so annotated; these addresses are patched, never branched to
  indirectly.
* for every alternative that has a body, one `struct alt_instr` in
  `.altinstructions` whose feature is `ALT_NOT(X86_FEATURE_ALWAYS)`, never true,
  pointing at a copy of that alternative's exact site bytes in
  `.altinstr_replacement`. The kernel's apply_alternatives() skips such an entry
  (it only runs optimize_nops() on the site); objtool validates each copy as a
  possible content of the site and merges their unwind data, so the ORC entries
  of the linked image describe whichever alternative `linkfix patch` writes.
  objtool gives every replacement instruction one alternative group, so each
  site has copies of its own (identical alternatives of one site share one).
  objtool 6.1 also starts the site's CFI array afresh for every alt_instr of it
  (check.c, handle_group_alt), so only the last record's instructions reach the
  ORC table inside the site: the alternative that moves the stack pointer there
  (`pushf; pop %rax`) is emitted last, and opmodel.py lets at most one per op stay
  inline; no other alternative may start an instruction where it has pushed
  something (check()), since the table has one entry per address.

What an alternative may hold follows from that: objtool accepts a relocation in a
replacement only on its first instruction, and only for a call or jump
(tools/objtool/arch/x86/special.c, arch_support_alt_relocation); a body with any
other relocated field runs out of line instead (opmodel.py). optimize_nops()
rewrites runs of two or more one-byte NOPs (0x90) at a site, so no copy may hold
one (check()).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from linkfix.errors import BadInput
from linkfix.padding import NOPS
from linkfix.stubgen.insn import decode
from linkfix.stubgen.sitetext import repl_lines

if TYPE_CHECKING:
    from linkfix.stubgen.opmodel import Alt, OpModel
    from linkfix.stubgen.spec import Spec

X86_FEATURE_ALWAYS = 3 * 32 + 21  # arch/x86/include/asm/cpufeatures.h
ALTINSTR_FLAG_INV = 0x8000  # ALT_NOT(): patch if the feature is absent
NEVER = ALTINSTR_FLAG_INV | X86_FEATURE_ALWAYS  # 0x8075
MAX_PATCH_LEN = 254  # arch/x86/kernel/alternative.c: longer sites BUG() at boot
ALT_INSTR_SIZE = 12  # s32 instr_offset, s32 repl_offset, u16 cpuid, u8 instrlen, replacementlen


def alt_problem(code: bytes, fields: tuple[tuple[int, int], ...]) -> str | None:
    """Why objtool would refuse these body bytes as an alternative, or None: a
    relocated field anywhere but in a call (or jump) that starts the body."""
    if not fields:
        return None
    if len(fields) == 1 and fields[0] == (1, 4) and code[:1] in (b"\xe8", b"\xe9"):
        return None
    pos, size = next((f for f in fields if f != (1, 4)), fields[0])
    return (f"its {size}-byte relocated field at offset {pos} is not the target of a call "
            f"starting the body, the only relocation objtool accepts in an alternative")


def nop_run(code: bytes) -> int | None:
    """Offset of the first of two consecutive one-byte NOPs (0x90), or None."""
    from linkfix.arch import X86_64

    prev_nop = False
    for insn in decode(X86_64, code):
        nop = insn.size == 1 and code[insn.address] == 0x90
        if nop and prev_nop:
            return insn.address - 1
        prev_nop = nop
    return None


def depths(code: bytes) -> dict[int, int]:
    """Bytes pushed when each reachable instruction of a site copy starts, by offset."""
    from capstone import CS_GRP_CALL, CS_GRP_JUMP
    from capstone.x86 import X86_INS_JMP

    from linkfix.arch import X86_64
    from linkfix.stubgen.insn import branch_target, instruction_rules, is_relative

    rules = instruction_rules()
    insns = {i.address: i for i in decode(X86_64, code)}
    seen: dict[int, int] = {}
    todo = [(0, 0)]
    while todo:
        off, depth = todo.pop()
        if off in seen or off not in insns:  # visited, or the end of the copy
            continue
        seen[off] = depth
        insn = insns[off]
        after = depth + 8 * ((insn.id in rules.push) - (insn.id in rules.pop))
        jump = insn.group(CS_GRP_JUMP) or (is_relative(insn) and not insn.group(CS_GRP_CALL))
        if jump:
            todo.append((branch_target(insn), after))
        if not (jump and insn.id == X86_INS_JMP):
            todo.append((off + insn.size, after))
    return seen


def _stack_conflict(m: OpModel) -> str | None:
    """Why the alternatives' unwind data cannot share the site, or None: an instruction
    of one alternative starts where the stack-moving one has pushed something. The ORC
    table has one entry per address, and objtool takes it from the stack-moving one."""
    if not m.stack_alt:
        return None
    mover = m.alts[m.stack_alt]
    moved = {off: d for off, d in depths(mover.code).items() if d}
    for a in m.alts:
        if a.present and a.k != mover.k:
            for off, d in sorted(depths(a.code).items()):
                if off in moved and moved[off] != d:
                    return (f"alternatives '{mover.name}' and '{a.name}' both have an "
                            f"instruction at offset {off} of the site, where '{mover.name}' "
                            f"has pushed {moved[off]} bytes: one ORC entry cannot describe "
                            f"both; change one of the bodies (or the site length: "
                            f"site_budget)")
    return None


def check(spec: Spec, m: OpModel) -> None:
    """Refuse a site the kernel would rewrite or reject, or whose unwind data cannot be
    right for every alternative."""
    op = m.op.name
    conflict = _stack_conflict(m)
    if conflict is not None:
        raise BadInput(spec.path, f"op '{op}': profile linux: {conflict}")
    if m.site_len > MAX_PATCH_LEN:
        raise BadInput(spec.path, f"op '{op}': profile linux: its {m.site_len}-byte site is "
                                  f"longer than the kernel's alternatives allow "
                                  f"({MAX_PATCH_LEN} bytes, MAX_PATCH_LEN); lower site_budget")
    for a in m.alts:
        if not a.present:
            continue
        at = nop_run(a.code)
        if at is not None:
            raise BadInput(spec.path, f"op '{op}': backend '{a.name}': profile linux: the site "
                                      f"holds two one-byte NOPs (0x90) at offset {at}, which "
                                      f"the kernel's optimize_nops() would rewrite at boot; "
                                      f"use one longer NOP (nopw, nopl) in the body")


def noendbr_lines(labels: list[str]) -> list[str]:
    """ANNOTATE_NOENDBR for each label (include/linux/objtool.h: an absolute pointer)."""
    return ["\t.pushsection .discard.noendbr", *(f"\t.quad {label}" for label in labels),
            "\t.popsection"]


def _alt_entry(site: str, repl: str, length: int) -> list[str]:
    return ['\t.pushsection .altinstructions,"a"',
            f"\t.long {site} - .",
            f"\t.long {repl} - .",
            f"\t.short 0x{NEVER:04x}",  # ALT_NOT(X86_FEATURE_ALWAYS): never applied
            f"\t.byte {length}, {length}",
            "\t.popsection"]


def _key(a: Alt) -> tuple[object, ...]:
    return a.code, tuple((p, n, link.pcrel, link.expr) for p, n, link in a.fields)


def op_site_lines(spec: Spec, m: OpModel, uid: str) -> list[str]:
    """A site's annotation and its alternatives (after the site's own lines); a written
    site (written.py) has no alternatives: objtool sees its bytes as written by hand."""
    site = f".Llf_s_{uid}"
    lines = noendbr_lines([site])
    if spec.profile.written is not None:
        return lines
    seen: set[tuple[object, ...]] = set()
    # The alternative that moves the stack pointer inside the site goes last: objtool
    # 6.1 starts the site's CFI array afresh for every alt_instr of it, so only the
    # last entry's instructions reach the ORC table (there is at most one: opmodel.py).
    order = sorted(m.alts[1:], key=lambda a: a.k == m.stack_alt)
    for a in order:
        if not a.present or _key(a) in seen:
            continue
        seen.add(_key(a))
        repl = f".Llf_r{a.k}_{uid}"
        lines += _alt_entry(site, repl, m.site_len)
        lines += ['\t.pushsection .altinstr_replacement,"ax"',
                  *repl_lines(repl, a.code, a.fields, spec.arch.word), "\t.popsection"]
    return lines


def branch_site_lines(spec: Spec) -> list[str]:
    """The same for a branch site `linkfix_backend_is(b)` (asm goto: labels __lf_yes,
    __lf_generic): a jump to the true branch, and a 5-byte NOP for the other backends."""
    uid = "%="
    site = f".Llf_s_{uid}"
    lines = noendbr_lines([site, "%l[__lf_generic]", "%l[__lf_yes]"])
    if spec.profile.written is not None:
        return lines
    jmp, end = f".Llf_rj_{uid}", f".Llf_rje_{uid}"
    lines += _alt_entry(site, jmp, 5)
    lines += ['\t.pushsection .altinstr_replacement,"ax"', f"{jmp}:", "\t.byte 0xe9",
              f"\t.long %l[__lf_yes] - {end}", f"{end}:", "\t.popsection"]
    if len(spec.backends) > 1:
        nop = f".Llf_rn_{uid}"
        lines += _alt_entry(site, nop, 5)
        lines += ['\t.pushsection .altinstr_replacement,"ax"',
                  *repl_lines(nop, NOPS[5], (), spec.arch.word), "\t.popsection"]
    return lines
