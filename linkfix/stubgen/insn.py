"""Decoded-instruction helpers shared by the body checks: capstone, register names, errors.

capstone is imported on first use: only gen-stubs decodes bodies.
"""

from __future__ import annotations

from linkfix.arch import Arch


class BodyCheckError(ValueError):
    """A body that breaks the site contract; names the offset and decoded instruction."""


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


class Rules:
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


_RULES: Rules | None = None
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


def instruction_rules() -> Rules:
    global _RULES
    if _RULES is None:
        _RULES = Rules()
    return _RULES


def _text(insn) -> str:  # type: ignore[no-untyped-def]
    return f"{insn.mnemonic} {insn.op_str}".strip()


def fail(insn, message: str) -> BodyCheckError:  # type: ignore[no-untyped-def]
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


def is_relative(insn) -> bool:  # type: ignore[no-untyped-def]
    from capstone import CS_GRP_BRANCH_RELATIVE

    return insn.group(CS_GRP_BRANCH_RELATIVE)


def branch_target(insn) -> int:  # type: ignore[no-untyped-def]
    imm = insn.operands[0].imm
    return imm
