"""Finish a body to its site's length without adding work on its path.

A site is as long as its longest inline body; a shorter body must fill the
rest. linkfix first gives the body's own instructions redundant segment
prefixes (the CPU decodes them as part of the instruction: no extra
instruction executes), then fills what is left with the fewest long NOPs, and
only beyond two NOPs with a jump over INT3s. Which prefix is a no-op is
decided from the decoded instruction, never from the body's text:

* 64-bit mode: CS (`2e`); CS, DS, ES and SS overrides are ignored there.
* i386: the segment the instruction uses anyway: SS (`36`) for a memory
  operand based on %esp/%ebp, DS (`3e`) for any other memory operand or none.
* Never on a branch (2e/3e are branch hints), a string instruction or xlat
  (their implicit operands take overrides), an instruction that already has a
  segment override, or past 15 bytes; at most `PREFIX_CAP` per instruction
  (docs/BENCHMARKS.md has the measurement). Prefixes go before the
  instruction's own prefixes, so never between REX/VEX and the opcode.
* Not at all in a body with relative branches of its own: their
  displacements would change.
"""

from __future__ import annotations

from linkfix import layout
from linkfix.arch import Arch
from linkfix.padding import MAX_NOP, NOPS, pad
from linkfix.stubgen.insn import decode

PREFIX_CAP = 5  # per instruction: GNU as pads branches with up to 5; bench/prefixcost.py
MAX_INSN = 15
NOP_LIMIT = 2  # up to this many NOPs before a jump over INT3s is cheaper

Field = tuple[int, int, layout.Link]

_STRING = frozenset({"movs", "cmps", "stos", "lods", "scas", "ins", "outs", "xlat"})
_SEGMENTS = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65})


def nop_fill(n: int) -> bytes:
    """`n` bytes of padding: one long NOP, two, or a jump over INT3s."""
    if n <= MAX_NOP:
        return NOPS[n]
    if n <= NOP_LIMIT * MAX_NOP:
        return NOPS[MAX_NOP] + NOPS[n - MAX_NOP]
    return pad(n)


def count_insns(fill: bytes) -> int:
    """Instructions that padding from `nop_fill` executes."""
    n = len(fill)
    if n == 0:
        return 0
    if n <= MAX_NOP or n > NOP_LIMIT * MAX_NOP:
        return 1
    return 2


def executed_bytes(fill: bytes) -> int:
    """Bytes of `nop_fill` padding that execute (a jump skips its INT3s)."""
    n = len(fill)
    if n > NOP_LIMIT * MAX_NOP:
        return 2 if fill[0] == 0xEB else 5
    return n


def _prefix_for(arch: Arch, insn) -> int | None:  # type: ignore[no-untyped-def]
    """The no-op segment prefix this instruction may take, or None."""
    from capstone import CS_GRP_BRANCH_RELATIVE, CS_GRP_CALL, CS_GRP_JUMP, CS_GRP_RET
    from capstone.x86 import X86_OP_MEM, X86_REG_EBP, X86_REG_ESP

    if any(insn.group(g) for g in (CS_GRP_JUMP, CS_GRP_CALL, CS_GRP_RET,
                                   CS_GRP_BRANCH_RELATIVE)):
        return None
    mnemonic = insn.mnemonic.split()[-1]
    if any(mnemonic.startswith(s) for s in _STRING):
        return None
    if any(b in _SEGMENTS for b in insn.prefix):
        return None
    if arch.elf_class == 64:
        return 0x2E
    for op in insn.operands:
        if op.type == X86_OP_MEM and op.mem.base in (X86_REG_ESP, X86_REG_EBP):
            return 0x36
    return 0x3E


def _own_branches(insns, fields: tuple[Field, ...]) -> bool:  # type: ignore[no-untyped-def]
    """Does the decoded body hold a relative branch of its own (one whose displacement
    no relocation fills: it stays inside the body, and a prefix would move its target)?"""
    from capstone import CS_GRP_BRANCH_RELATIVE

    relocated = {pos for pos, _n, _l in fields}
    return any(i.group(CS_GRP_BRANCH_RELATIVE) and i.address + i.imm_offset not in relocated
               for i in insns)


def finish(arch: Arch, code: bytes, fields: tuple[Field, ...], site_len: int
           ) -> tuple[bytes, tuple[Field, ...], int, int]:
    """The body grown to `site_len` bytes: (bytes, its fields moved, the body's length
    with its prefixes, padding instructions after it)."""
    room = site_len - len(code)
    if room <= 0:
        return code, fields, len(code), 0
    insns = decode(arch, code)
    if _own_branches(insns, fields):
        insns = []
    prefixes = [_prefix_for(arch, i) for i in insns]
    added = [0] * len(insns)
    progress = True
    while room and progress:
        progress = False
        for j, ins in enumerate(insns):
            if room and prefixes[j] is not None and added[j] < PREFIX_CAP \
                    and ins.size + added[j] < MAX_INSN:
                added[j] += 1
                room -= 1
                progress = True
    out = bytearray()
    shift_at: list[tuple[int, int]] = []  # (instruction start, bytes added before its end)
    total = 0
    for j, ins in enumerate(insns):
        if added[j]:
            out += bytes([prefixes[j]]) * added[j]  # type: ignore[list-item]
        total += added[j]
        out += code[ins.address:ins.address + ins.size]
        shift_at.append((ins.address + ins.size, total))
    if not insns:
        out += code
    moved = []
    for pos, size, link in fields:
        shift = next((s for end, s in shift_at if pos < end), total)
        moved.append((pos + shift, size, link))
    fill = nop_fill(room)
    return bytes(out) + fill, tuple(moved), len(out), count_insns(fill)


def ool_problem(arch: Arch, code: bytes) -> str | None:
    """Why the body cannot run as a called copy (one return address deeper), or None."""
    from capstone.x86 import X86_OP_MEM, X86_REG_ESP, X86_REG_RSP, X86_REG_SP

    stack = {X86_REG_RSP, X86_REG_ESP, X86_REG_SP}
    for ins in decode(arch, code):
        for op in ins.operands:
            if op.type == X86_OP_MEM and (op.mem.base in stack or op.mem.index in stack):
                return f"'{ins.mnemonic} {ins.op_str}' addresses the stack through the stack " \
                       "pointer"
    return None
