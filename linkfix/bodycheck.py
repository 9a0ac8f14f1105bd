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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from linkfix.arch import Arch
from linkfix.layout import Link

# ELF relocation types (x86-64 and i386 share these numbers).
R_ABS32_64 = {1, 10, 11}  # R_X86_64_64, _32, _32S
R_PC_64 = {2, 4}  # R_X86_64_PC32, _PLT32
R_ABS_386 = {1}  # R_386_32
R_PC_386 = {2, 4}  # R_386_PC32, _PLT32


_SYMBOL = re.compile(r"[A-Za-z_.][A-Za-z0-9_.$]*")


class BodyCheckError(ValueError):
    """A body that breaks the site contract; names the offset and decoded instruction."""


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


_LEGACY = {"a": ("al", "ah", "ax"), "b": ("bl", "bh", "bx"),
           "c": ("cl", "ch", "cx"), "d": ("dl", "dh", "dx")}
_INDEX = {"si": ("sil", "si"), "di": ("dil", "di"), "bp": ("bpl", "bp"), "sp": ("spl", "sp")}


def gpr_table(arch: Arch) -> dict[str, str]:
    """capstone register name -> full-width GPR of `arch` (sub-registers included)."""
    wide = arch.elf_class == 64
    table: dict[str, str] = {}
    for letter, names in _LEGACY.items():
        full = f"r{letter}x" if wide else f"e{letter}x"
        for n in (*names, f"e{letter}x", f"r{letter}x"):
            table[n] = full
    for base, names in _INDEX.items():
        full = f"r{base}" if wide else f"e{base}"
        for n in (*names, f"e{base}", f"r{base}"):
            table[n] = full
    if wide:
        for i in range(8, 16):
            for suffix in ("", "b", "w", "d"):
                table[f"r{i}{suffix}"] = f"r{i}"
    return table


def _ids():  # type: ignore[no-untyped-def]
    from capstone import x86_const as c

    return c


class _Rules:
    """Instruction-id tables, built once capstone is imported."""

    def __init__(self) -> None:
        c = _ids()
        self.c = c
        self.flags_only = {c.X86_INS_TEST, c.X86_INS_CMP, c.X86_INS_BT}
        # GPRs written but not reported by capstone 5's regs_access().
        acc = ("a",)
        self.implicit = {
            c.X86_INS_CMPXCHG: acc, c.X86_INS_XLATB: acc,
            c.X86_INS_SYSCALL: ("c", "r11"), c.X86_INS_ENTER: ("bp", "sp"),
            c.X86_INS_RDPKRU: ("a", "d"), c.X86_INS_AAA: acc, c.X86_INS_AAS: acc,
            c.X86_INS_DAA: acc, c.X86_INS_DAS: acc, c.X86_INS_AAM: acc, c.X86_INS_AAD: acc,
            c.X86_INS_SALC: acc, c.X86_INS_VMCALL: acc, c.X86_INS_VMMCALL: acc,
            c.X86_INS_ENCLS: ("a", "b", "c", "d"), c.X86_INS_ENCLU: ("a", "b", "c", "d"),
            c.X86_INS_GETSEC: ("a", "b", "c"),
            c.X86_INS_LEAVE: ("bp", "sp"),
        }
        self.push = {c.X86_INS_PUSH, c.X86_INS_PUSHFQ, c.X86_INS_PUSHFD, c.X86_INS_PUSHF}
        self.pop = {c.X86_INS_POP, c.X86_INS_POPFQ, c.X86_INS_POPFD, c.X86_INS_POPF}
        self.pusha = {c.X86_INS_PUSHAL, c.X86_INS_PUSHAW}
        self.popa = {c.X86_INS_POPAL, c.X86_INS_POPAW}
        # Leave the body for good (or for another privilege level): never allowed.
        self.leave = {c.X86_INS_SYSENTER, c.X86_INS_SYSEXIT, c.X86_INS_SYSRET,
                      c.X86_INS_LJMP, c.X86_INS_LCALL, c.X86_INS_RETF, c.X86_INS_RETFQ,
                      c.X86_INS_INT, c.X86_INS_INT1, c.X86_INS_INTO, c.X86_INS_INT3,
                      c.X86_INS_UD1}


_RULES: _Rules | None = None
_CS: dict[int, object] = {}


def _decoder(bits: int):  # type: ignore[no-untyped-def]
    cs = _CS.get(bits)
    if cs is None:
        from capstone import CS_ARCH_X86, CS_MODE_32, CS_MODE_64, CS_OPT_SYNTAX_ATT, Cs

        cs = Cs(CS_ARCH_X86, CS_MODE_64 if bits == 64 else CS_MODE_32)
        cs.detail = True
        cs.syntax = CS_OPT_SYNTAX_ATT
        _CS[bits] = cs
    return cs


def _rules() -> _Rules:
    global _RULES
    if _RULES is None:
        _RULES = _Rules()
    return _RULES


def _text(insn) -> str:  # type: ignore[no-untyped-def]
    return f"{insn.mnemonic} {insn.op_str}".strip()


def _fail(insn, message: str) -> BodyCheckError:  # type: ignore[no-untyped-def]
    return BodyCheckError(f"offset {insn.address}: '{_text(insn)}' "
                          f"({bytes(insn.bytes).hex()}): {message}")


def decode(arch: Arch, code: bytes) -> list:  # type: ignore[type-arg]
    """Every instruction of `code`; BodyCheckError if some bytes do not decode."""
    insns = list(_decoder(arch.elf_class).disasm(code, 0))
    end = sum(i.size for i in insns)
    if end != len(code):
        raise BodyCheckError(f"offset {end}: bytes {code[end:end + 8].hex()} do not decode "
                             "as an instruction")
    return insns


def check(arch: Arch, code: bytes, relocs: tuple[Reloc, ...], allowed: set[str],
          callees: set[str]) -> Checked:
    """Check `code` (one body as assembled) against the site contract.

    `allowed`: full-width GPRs the site may change; `callees`: the symbols a
    `call` in this body may reach (its thunks). Raises BodyCheckError.
    """
    rules = _rules()
    insns = decode(arch, code)
    table = gpr_table(arch)
    by_off = {i.address: i for i in insns}
    fields = _check_relocs(arch, insns, relocs)
    reloc_at = {r.offset: r for r in relocs}
    for insn in insns:
        _check_flow(arch, rules, insn, len(code), by_off, reloc_at, callees)
    pushes = _check_paths(arch, rules, insns, len(code), table, allowed)
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
            raise _fail(insn, f"relocation against '{r.symbol}' does not fill an operand "
                              "field of the instruction")
        if r.type in pcrel:
            # A moved body keeps only PC-relative fields the splicer re-targets: a
            # relative branch or call, or a RIP-relative displacement.
            rip = any(op.type == 3 and insn.reg_name(op.mem.base) == "rip"
                      for op in insn.operands)
            if not (imm and _is_relative(insn)) and not (disp and rip):
                raise _fail(insn, f"PC-relative relocation against '{r.symbol}' in a field "
                                  "that is not a branch or RIP-relative displacement")
        elif r.type not in absolute:
            raise _fail(insn, f"relocation type {r.type} against '{r.symbol}' is not "
                              "supported in a body")
        if not _SYMBOL.fullmatch(r.symbol):
            raise _fail(insn, f"relocation against '{r.symbol}', a name the image header "
                              "cannot record")
        out.append((r.offset, size, Link(r.type in pcrel, expr=f"{r.symbol}{r.addend:+d}")))
    return tuple(out)


def _is_relative(insn) -> bool:  # type: ignore[no-untyped-def]
    from capstone import CS_GRP_BRANCH_RELATIVE

    return insn.group(CS_GRP_BRANCH_RELATIVE)


# -- control flow ----------------------------------------------------------------------------


def _branch_target(insn) -> int:  # type: ignore[no-untyped-def]
    imm = insn.operands[0].imm
    return imm


def _check_flow(arch: Arch, rules: _Rules, insn, length: int, by_off: dict,  # type: ignore
                reloc_at: dict, callees: set[str]) -> None:
    from capstone import CS_GRP_CALL, CS_GRP_IRET, CS_GRP_JUMP, CS_GRP_RET

    if insn.group(CS_GRP_RET) or insn.group(CS_GRP_IRET) or insn.id in rules.leave:
        raise _fail(insn, "control leaves the body (a body runs inside its caller and must "
                          "reach its end)")
    relative = _is_relative(insn)
    field = insn.address + insn.imm_offset if insn.imm_size else None
    if insn.group(CS_GRP_CALL):
        if not relative or insn.size != 5:
            raise _fail(insn, "indirect or far call: only a direct call to a generated "
                              "thunk is allowed")
        r = reloc_at.get(field)
        if r is None:
            raise _fail(insn, "call without a relocation: it must reach a generated thunk "
                              "by symbol")
        if r.symbol not in callees:
            allowed = ", ".join(sorted(callees)) or "none"
            raise _fail(insn, f"calls '{r.symbol}', which is not one of this body's thunks "
                              f"({allowed})")
        if r.addend != -4:
            raise _fail(insn, f"call to '{r.symbol}{r.addend + 4:+d}' does not reach the "
                              "start of the function")
        return
    if insn.group(CS_GRP_JUMP) or relative:
        if not relative:
            raise _fail(insn, "indirect or far jump: control must reach the end of the body")
        if field is not None and field in reloc_at:
            raise _fail(insn, f"jumps to '{reloc_at[field].symbol}', outside the body")
        target = _branch_target(insn) & ((1 << arch.elf_class) - 1)
        if target != length and target not in by_off:
            where = "outside the body" if not 0 <= target <= length else \
                "into the middle of an instruction"
            raise _fail(insn, f"branch target {target:#x} is {where} (body is {length} "
                              "bytes)")


# -- registers and stack, path by path --------------------------------------------------------


@dataclass(frozen=True)
class _State:
    depth: int  # bytes pushed since entry
    slots: tuple[str | None, ...]  # what each pushed word holds: a GPR's entry value, or None
    dirty: frozenset[str]  # GPRs not known to hold their entry value

    def merge(self, other: _State) -> _State:
        slots = tuple(a if a == b else None for a, b in zip(self.slots, other.slots,
                                                              strict=True))
        return _State(self.depth, slots, self.dirty | other.dirty)


def _written(arch: Arch, rules: _Rules, insn, table: dict[str, str]) -> set[str]:  # type: ignore
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


def _check_paths(arch: Arch, rules: _Rules, insns: list, length: int,  # type: ignore[type-arg]
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
        is_jump = insn.group(CS_GRP_JUMP) or (_is_relative(insn) and
                                              not insn.group(CS_GRP_CALL))
        if is_jump:
            succ.append(_branch_target(insn) & ((1 << arch.elf_class) - 1))
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
                raise _fail(at, f"reached with {old.depth} and with {state.depth} bytes "
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
        raise _fail(insn, f"writes {regs}, not the op's return register or a declared "
                          "clobber")
    return deepest


def _step(arch: Arch, rules: _Rules, insn, st: _State, table: dict[str, str],  # type: ignore
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
        raise _fail(insn, "16-bit push/pop is not supported in a body")
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
            raise _fail(insn, "pops above the stack pointer the body started with")
        slot = slots.pop()
        depth -= word
        dst = None
        if insn.operands and insn.operands[0].type == 1:
            dst = table.get(insn.reg_name(insn.operands[0].reg))
        if dst == sp:
            raise _fail(insn, "pops into the stack pointer")
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
            raise _fail(insn, "pops above the stack pointer the body started with")
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
        raise _fail(insn, "changes the stack pointer other than by a balanced push/pop")
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
            raise _fail(insn, "writes the caller's stack (above what the body pushed)")
