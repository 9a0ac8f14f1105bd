"""Which general-purpose registers does a body write?

A site promises the compiler that it changes only the op's declared clobbers
and its return register. capstone decodes the assembled body (implicit
operands included: `pushf`, `cpuid`, `rep movs`...) and every GPR written must
be one the op may clobber. Writes to the stack pointer (push/pop), the
instruction pointer, the flags and non-GPR state (control registers, segment
registers: the point of most ops) are allowed. A body that saves registers
with leading pushes and restores them with the matching trailing pops is
treated as preserving them.
"""

from __future__ import annotations

from dataclasses import dataclass

from linkfix.arch import Arch

_LEGACY = {
    "a": ("al", "ah", "ax"), "b": ("bl", "bh", "bx"),
    "c": ("cl", "ch", "cx"), "d": ("dl", "dh", "dx"),
}
_INDEX = {"si": ("sil", "si"), "di": ("dil", "di"), "bp": ("bpl", "bp"), "sp": ("spl", "sp")}


def _sub_registers(arch: Arch) -> dict[str, str]:
    """capstone register name -> full-width GPR of `arch`."""
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


# Instructions that write nothing but the flags. capstone 5 reports `test
# $imm, %eax` (the short 0xa9 form) as writing %eax; these mnemonics never do.
_FLAGS_ONLY = frozenset({"test", "cmp", "bt"})


@dataclass(frozen=True)
class RegReport:
    written: tuple[str, ...]  # full-width GPRs the body changes, in arch order
    preserved: tuple[str, ...]  # written but saved/restored by a push/pop bracket


class DecodeError(ValueError):
    pass


def _decoder(arch: Arch):  # type: ignore[no-untyped-def]
    from capstone import CS_ARCH_X86, CS_MODE_32, CS_MODE_64, Cs

    cs = Cs(CS_ARCH_X86, CS_MODE_64 if arch.elf_class == 64 else CS_MODE_32)
    cs.detail = True
    return cs


def written_registers(arch: Arch, code: bytes) -> RegReport:
    """GPRs that `code` writes (sub-registers mapped to the full register)."""
    cs = _decoder(arch)
    table = _sub_registers(arch)
    insns = list(cs.disasm(code, 0))
    if sum(i.size for i in insns) != len(code):
        raise DecodeError(f"capstone cannot decode the body ({code.hex()})")
    sp = "rsp" if arch.elf_class == 64 else "esp"
    written: set[str] = set()
    for insn in insns:
        if insn.mnemonic in _FLAGS_ONLY:
            continue
        _, writes = insn.regs_access()
        for reg in writes:
            full = table.get(insn.reg_name(reg))
            if full is not None and full != sp:
                written.add(full)
    preserved = _bracketed(insns, table)
    return RegReport(
        written=tuple(r for r in arch.gprs if r in written and r not in preserved),
        preserved=tuple(r for r in arch.gprs if r in preserved),
    )


def _bracketed(insns: list, table: dict[str, str]) -> set[str]:  # type: ignore[type-arg]
    """Registers pushed by the leading pushes and popped back by the trailing pops."""
    def reg_of(insn, mnemonic: str) -> str | None:  # type: ignore[no-untyped-def]
        if not insn.mnemonic.startswith(mnemonic) or len(insn.operands) != 1:
            return None
        op = insn.operands[0]
        if op.type != 1:  # X86_OP_REG
            return None
        return table.get(insn.reg_name(op.reg))

    pushed: list[str] = []
    for insn in insns:
        r = reg_of(insn, "push")
        if r is None:
            break
        pushed.append(r)
    popped: list[str] = []
    for insn in reversed(insns[len(pushed):]):
        r = reg_of(insn, "pop")
        if r is None:
            break
        popped.append(r)
    # Only an exact bracket counts: as many pops as pushes, outermost with outermost.
    if not pushed or pushed != popped:
        return set()
    return set(pushed)


def check(arch: Arch, allowed: tuple[str, ...] | set[str], code: bytes) -> list[str]:
    """The GPRs `code` writes that are not in `allowed`, in arch order."""
    report = written_registers(arch, code)
    return [r for r in report.written if r not in allowed]
