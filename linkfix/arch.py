"""What linkfix needs to know about each supported architecture."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    name: str
    e_machine: int
    elf_class: int  # 32 or 64
    word: int  # pointer size in bytes
    gprs: tuple[str, ...]  # full-width general-purpose registers
    arg_regs: tuple[str, ...]  # argument registers, in order
    ret_reg: str
    caller_saved: tuple[str, ...]  # registers a C function may clobber
    asm_constraints: dict[str, str]  # register -> GCC single-register constraint


X86_64 = Arch(
    name="x86_64",
    e_machine=62,
    elf_class=64,
    word=8,
    gprs=(
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    ),
    arg_regs=("rdi", "rsi", "rdx", "rcx"),
    ret_reg="rax",
    caller_saved=("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"),
    asm_constraints={"rax": "a", "rbx": "b", "rcx": "c", "rdx": "d", "rsi": "S", "rdi": "D"},
)

I386 = Arch(
    name="i386",
    e_machine=3,
    elf_class=32,
    word=4,
    gprs=("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp"),
    # regparm(3), as the kernel builds i386 C code.
    arg_regs=("eax", "edx", "ecx"),
    ret_reg="eax",
    caller_saved=("eax", "ecx", "edx"),
    asm_constraints={"eax": "a", "ebx": "b", "ecx": "c", "edx": "d", "esi": "S", "edi": "D"},
)

ARCHES: dict[str, Arch] = {a.name: a for a in (X86_64, I386)}
BY_MACHINE: dict[int, Arch] = {a.e_machine: a for a in (X86_64, I386)}
