"""Check an assembled body from its machine code: registers, stack, control flow, calls.

A site promises the compiler that it changes nothing but the op's return
register, its declared clobbers and the flags, that the stack is as it was,
and that control reaches the end of the site. That promise is checked here on
the exact bytes GNU as produced (so `.byte 0xc3`, `rep ret` or a `ds`-prefixed
indirect call are seen for what the CPU runs), decoded by capstone in detail
mode, together with the object's own relocations:

* registers: every GPR written, explicitly or implicitly, must be allowed,
  unless every path restores it from a slot its own push filled;
* stack: %rsp/%esp changes only by push/pop (net 0 at every exit, never above
  the entry value); nothing else writes it or the caller's stack above it;
* control flow: no return, interrupt return, far, indirect or out-of-body
  branch; relative branches land on an instruction of the body or its end;
* a `call` reaches, by its relocation, one of the functions gen-stubs routes
  body calls through (a callee-save thunk), and nothing else.

Vector, x87 and mask registers are outside the contract (kernels build with
-mgeneral-regs-only); segment, control and debug registers are what ops are for.

The path-by-path register and stack walk is in bodypaths.py, the capstone
helpers both use in insn.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from linkfix.arch import Arch
from linkfix.layout import Link
from linkfix.stubgen.bodypaths import check_paths
from linkfix.stubgen.insn import (
    BodyCheckError,
    Rules,
    branch_target,
    decode,
    fail,
    gpr_table,
    instruction_rules,
    is_relative,
)

# ELF relocation types (x86-64 and i386 share these numbers).
R_ABS32_64 = {1, 10, 11}  # R_X86_64_64, _32, _32S
R_PC_64 = {2, 4}  # R_X86_64_PC32, _PLT32
R_ABS_386 = {1}  # R_386_32
R_PC_386 = {2, 4}  # R_386_PC32, _PLT32


_SYMBOL = re.compile(r"[A-Za-z_.][A-Za-z0-9_.$]*")


@dataclass(frozen=True)
class Reloc:
    offset: int  # in the body
    type: int
    symbol: str
    addend: int  # RELA addend, or the implicit addend read from the field (REL)


@dataclass(frozen=True)
class Checked:
    masked: tuple[tuple[int, int], ...]  # (pos, size) of every relocated field, sorted
    links: tuple[Link, ...]  # per field: PC-relative or not, and its symbol + addend
    pushes: int  # most bytes pushed at any point


def check(arch: Arch, code: bytes, relocs: tuple[Reloc, ...], allowed: set[str],
          callees: set[str]) -> Checked:
    """Check `code` (one body as assembled) against the site contract.

    `allowed`: full-width GPRs the site may change; `callees`: the symbols a
    `call` in this body may reach (its thunks). Raises BodyCheckError.
    """
    rules = instruction_rules()
    insns = decode(arch, code)
    table = gpr_table(arch)
    by_off = {i.address: i for i in insns}
    fields = _check_relocs(arch, insns, relocs)
    reloc_at = {r.offset: r for r in relocs}
    for insn in insns:
        _check_flow(arch, rules, insn, len(code), by_off, reloc_at, callees)
    pushes = check_paths(arch, rules, insns, len(code), table, allowed)
    return Checked(masked=tuple((pos, size) for pos, size, _l in fields),
                   links=tuple(link for _p, _s, link in fields), pushes=pushes)


# -- relocations -----------------------------------------------------------------------------


def _check_relocs(arch: Arch, insns: list, relocs: tuple[Reloc, ...]  # type: ignore[type-arg]
                  ) -> tuple[tuple[int, int, Link], ...]:
    """Every relocation fills exactly an operand field; returns the fields (pos, size,
    where the link points it)."""
    wide = arch.elf_class == 64
    absolute, pcrel = (R_ABS32_64, R_PC_64) if wide else (R_ABS_386, R_PC_386)
    out: list[tuple[int, int, Link]] = []
    for r in sorted(relocs, key=lambda r: r.offset):
        insn = next((i for i in insns if i.address <= r.offset < i.address + i.size), None)
        if insn is None:
            raise BodyCheckError(f"offset {r.offset}: relocation against '{r.symbol}' lies "
                                 "outside the body's instructions")
        rel = r.offset - insn.address
        size = 8 if wide and r.type == 1 else 4
        disp = insn.disp_size and rel == insn.disp_offset and size == insn.disp_size
        imm = insn.imm_size and rel == insn.imm_offset and size == insn.imm_size
        if not (disp or imm):
            raise fail(insn, f"relocation against '{r.symbol}' does not fill an operand "
                             "field of the instruction")
        if r.type in pcrel:
            # A moved body keeps only PC-relative fields the splicer re-targets: a
            # relative branch or call, or a RIP-relative displacement.
            rip = any(op.type == 3 and insn.reg_name(op.mem.base) == "rip"
                      for op in insn.operands)
            if not (imm and is_relative(insn)) and not (disp and rip):
                raise fail(insn, f"PC-relative relocation against '{r.symbol}' in a field "
                                 "that is not a branch or RIP-relative displacement")
        elif r.type not in absolute:
            raise fail(insn, f"relocation type {r.type} against '{r.symbol}' is not "
                             "supported in a body")
        if not _SYMBOL.fullmatch(r.symbol):
            raise fail(insn, f"relocation against '{r.symbol}', a name the image header "
                             "cannot record")
        out.append((r.offset, size, Link(r.type in pcrel, expr=f"{r.symbol}{r.addend:+d}")))
    return tuple(out)


# -- control flow ----------------------------------------------------------------------------


def _check_flow(arch: Arch, rules: Rules, insn, length: int, by_off: dict,  # type: ignore
                reloc_at: dict, callees: set[str]) -> None:
    from capstone import CS_GRP_CALL, CS_GRP_IRET, CS_GRP_JUMP, CS_GRP_RET

    if insn.group(CS_GRP_RET) or insn.group(CS_GRP_IRET) or insn.id in rules.leave:
        raise fail(insn, "control leaves the body (a body runs inside its caller and must "
                         "reach its end)")
    relative = is_relative(insn)
    field = insn.address + insn.imm_offset if insn.imm_size else None
    if insn.group(CS_GRP_CALL):
        if not relative or insn.size != 5:
            raise fail(insn, "indirect or far call: only a direct call to a generated "
                             "thunk is allowed")
        r = reloc_at.get(field)
        if r is None:
            raise fail(insn, "call without a relocation: it must reach a generated thunk "
                             "by symbol")
        if r.symbol not in callees:
            allowed = ", ".join(sorted(callees)) or "none"
            raise fail(insn, f"calls '{r.symbol}', which is not one of this body's thunks "
                             f"({allowed})")
        if r.addend != -4:
            raise fail(insn, f"call to '{r.symbol}{r.addend + 4:+d}' does not reach the "
                             "start of the function")
        return
    if insn.group(CS_GRP_JUMP) or relative:
        if not relative:
            raise fail(insn, "indirect or far jump: control must reach the end of the body")
        if field is not None and field in reloc_at:
            raise fail(insn, f"jumps to '{reloc_at[field].symbol}', outside the body")
        target = branch_target(insn) & ((1 << arch.elf_class) - 1)
        if target != length and target not in by_off:
            where = "outside the body" if not 0 <= target <= length else \
                "into the middle of an instruction"
            raise fail(insn, f"branch target {target:#x} is {where} (body is {length} "
                             "bytes)")

