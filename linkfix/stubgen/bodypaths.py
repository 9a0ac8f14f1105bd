"""Registers and stack of an assembled body, path by path.

Every GPR written, explicitly or implicitly, must be one the site may change,
unless every path restores it from a slot its own push filled; %rsp/%esp
changes only by push/pop (net 0 at every exit, never above the entry value),
and nothing else writes it or the caller's stack above it.
"""

from __future__ import annotations

from dataclasses import dataclass

from linkfix.arch import Arch
from linkfix.stubgen.insn import BodyCheckError, Rules, branch_target, fail, is_relative


@dataclass(frozen=True)
class _State:
    depth: int  # bytes pushed since entry
    slots: tuple[str | None, ...]  # what each pushed word holds: a GPR's entry value, or None
    dirty: frozenset[str]  # GPRs not known to hold their entry value

    def merge(self, other: _State) -> _State:
        slots = tuple(a if a == b else None for a, b in zip(self.slots, other.slots,
                                                              strict=True))
        return _State(self.depth, slots, self.dirty | other.dirty)


def _written(arch: Arch, rules: Rules, insn, table: dict[str, str]) -> set[str]:  # type: ignore
    """Full-width GPRs the instruction writes (explicit, implicit, unknown access)."""
    wide = arch.elf_class == 64
    if insn.id in rules.flags_only:
        return set()
    out: set[str] = set()
    _reads, writes = insn.regs_access()
    for reg in writes:
        full = table.get(insn.reg_name(reg))
        if full is not None:
            out.add(full)
    for op in insn.operands:
        # An explicit register operand whose access capstone does not know is
        # taken as written (rdsspq reports access 0).
        if op.type == 1 and op.access in (0, 2, 3):
            full = table.get(insn.reg_name(op.reg))
            if full is not None and (op.access != 0 or insn.id not in rules.push):
                out.add(full)
    for name in rules.implicit.get(insn.id, ()):
        out.add(_full(name, wide))
    return out


def _full(short: str, wide: bool) -> str:
    if short.startswith("r") and short[1:].isdigit():
        return short
    if len(short) == 1:
        return f"r{short}x" if wide else f"e{short}x"
    return f"r{short}" if wide else f"e{short}"


_PUSHA_ORDER = ("ax", "cx", "dx", "bx", "sp", "bp", "si", "di")


def check_paths(arch: Arch, rules: Rules, insns: list, length: int,  # type: ignore[type-arg]
                table: dict[str, str], allowed: set[str]) -> int:
    """Walk every path; returns the most bytes pushed. Raises BodyCheckError."""
    from capstone import CS_GRP_CALL, CS_GRP_JUMP

    wide = arch.elf_class == 64
    word = arch.word
    sp = "rsp" if wide else "esp"
    index = {insn.address: n for n, insn in enumerate(insns)}
    states: dict[int, _State] = {0: _State(0, (), frozenset())}
    first_write: dict[str, object] = {}
    todo = [0]
    exits: list[_State] = []
    deepest = 0
    while todo:
        off = todo.pop()
        state = states[off]
        if off == length:
            exits.append(state)
            continue
        insn = insns[index[off]]
        state = _step(arch, rules, insn, state, table, sp, word, first_write)
        deepest = max(deepest, state.depth)
        succ = []
        is_jump = insn.group(CS_GRP_JUMP) or (is_relative(insn) and
                                              not insn.group(CS_GRP_CALL))
        if is_jump:
            succ.append(branch_target(insn) & ((1 << arch.elf_class) - 1))
        if not (is_jump and insn.id == rules.c.X86_INS_JMP):
            succ.append(off + insn.size)
        for nxt in succ:
            old = states.get(nxt)
            if old is None:
                states[nxt] = state
                todo.append(nxt)
                continue
            if old.depth != state.depth:
                at = insns[index[nxt]] if nxt in index else insn
                raise fail(at, f"reached with {old.depth} and with {state.depth} bytes "
                               "pushed: the stack differs between paths")
            merged = old.merge(state)
            if merged != old:
                states[nxt] = merged
                todo.append(nxt)
    if not exits:
        raise BodyCheckError("no path reaches the end of the body")
    for st in exits:
        if st.depth:
            raise BodyCheckError(f"{st.depth} bytes left pushed at the end of the body: "
                                 "push and pop must balance")
    dirty = frozenset().union(*(st.dirty for st in exits))
    bad = [r for r in arch.gprs if r in dirty and r not in allowed and r != sp]
    if bad:
        insn = first_write[bad[0]]
        regs = ", ".join(f"%{r}" for r in bad)
        raise fail(insn, f"writes {regs}, not the op's return register or a declared "
                         "clobber")
    return deepest


def _step(arch: Arch, rules: Rules, insn, st: _State, table: dict[str, str],  # type: ignore
          sp: str, word: int, first_write: dict) -> _State:
    """The state after `insn`; refuses stack-pointer writes other than push/pop/call."""
    from capstone import CS_GRP_CALL

    wide = arch.elf_class == 64
    written = _written(arch, rules, insn, table)
    dirty = set(st.dirty)
    depth, slots = st.depth, list(st.slots)
    opsize16 = 0x66 in bytes(insn.prefix)
    stack_op = insn.id in rules.push | rules.pop | rules.pusha | rules.popa
    if stack_op and opsize16:
        raise fail(insn, "16-bit push/pop is not supported in a body")
    if insn.id in rules.push:
        src = None
        if insn.operands and insn.operands[0].type == 1:
            reg = table.get(insn.reg_name(insn.operands[0].reg))
            if reg is not None and reg != sp and reg not in dirty:
                src = reg
        depth += word
        slots.append(src)
        written.discard(sp)
    elif insn.id in rules.pop:
        if depth < word:
            raise fail(insn, "pops above the stack pointer the body started with")
        slot = slots.pop()
        depth -= word
        dst = None
        if insn.operands and insn.operands[0].type == 1:
            dst = table.get(insn.reg_name(insn.operands[0].reg))
        if dst == sp:
            raise fail(insn, "pops into the stack pointer")
        written.discard(sp)
        if dst is not None:
            written.discard(dst)
            _mark(dirty, dst, slot == dst, insn, first_write)
    elif insn.id in rules.pusha:
        for r in _PUSHA_ORDER:
            full = _full(r, wide)
            slots.append(full if full != sp and full not in dirty else None)
        depth += 8 * word
        written.discard(sp)
    elif insn.id in rules.popa:
        if depth < 8 * word:
            raise fail(insn, "pops above the stack pointer the body started with")
        for r in reversed(_PUSHA_ORDER):
            slot = slots.pop()
            full = _full(r, wide)
            if full != sp:
                _mark(dirty, full, slot == full, insn, first_write)
        depth -= 8 * word
        written = set()
    elif insn.group(CS_GRP_CALL):
        # The thunk returns with the stack as it was; the callee may change only
        # what the site may (the thunk saves the rest).
        written.discard(sp)
    if sp in written:
        raise fail(insn, "changes the stack pointer other than by a balanced push/pop")
    _check_stack_writes(insn, depth, sp)
    for reg in written:
        _mark(dirty, reg, False, insn, first_write)
    return _State(depth, tuple(slots), frozenset(dirty))


def _mark(dirty: set[str], reg: str, restored: bool, insn, first_write: dict) -> None:  # type: ignore
    if restored:
        dirty.discard(reg)
        return
    dirty.add(reg)
    first_write.setdefault(reg, insn)


def _check_stack_writes(insn, depth: int, sp: str) -> None:  # type: ignore[no-untyped-def]
    """A memory write through the stack pointer stays within what the body pushed."""
    for op in insn.operands:
        if op.type != 3 or not op.access & 2:
            continue
        if insn.reg_name(op.mem.base) != sp and insn.reg_name(op.mem.index) != sp:
            continue
        if op.mem.index or op.mem.disp + op.size > depth:
            raise fail(insn, "writes the caller's stack (above what the body pushed)")
