"""Bodies are checked as machine code: registers, stack, control flow and calls.

Every case runs real gen-stubs (GNU as assembles the body); a refusal is one
line, exit 2, naming op, backend, the instruction's offset and its decoding.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from linkfix.cli import main

HEAD = {
    "x86_64": '[linkfix]\narch = "x86_64"\nbackends = ["native", "xen"]\n',
    "i386": '[linkfix]\narch = "i386"\nbackends = ["native", "xen"]\n',
}


def spec_text(arch: str, body: str, args: str = "", returns: str = "",
              clobbers: str = "") -> str:
    lines = [HEAD[arch], "[ops.op]"]
    if args:
        lines.append(f"args = [{args}]")
    if returns:
        lines.append(f'returns = "{returns}"')
    if clobbers:
        lines.append(f"clobbers = [{clobbers}]")
    lines.append("[ops.op.bodies]")
    lines.append(f"native = '''{body}'''")
    lines.append('xen = "call xen_op"')
    return "\n".join(lines) + "\n"


def gen(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> tuple[int, str]:
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    code = main(["gen-stubs", str(spec), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    return code, err


# (id, arch, body, op fields, expected text in the message)
REFUSED = [
    ("cmpxchg", "x86_64", "lock cmpxchg %rsi, (%rdi)", {"args": '"long *p", "long v"'},
     "offset 0: 'lock cmpxchgq %rsi, (%rdi)' (f0480fb137): writes %rax"),
    ("cmpxchg-i386", "i386", "lock cmpxchg %edx, (%eax)", {"args": '"long *p", "long v"'},
     "writes %eax"),
    ("syscall", "x86_64", "syscall", {}, "'syscall' (0f05): writes %rcx, %r11"),
    ("xlat", "x86_64", "xlat", {}, "writes %rax"),
    ("enter", "x86_64", "enter $8, $0", {}, "changes the stack pointer"),
    ("rdpkru", "x86_64", "rdpkru", {"clobbers": '"rcx"'}, "writes %rax, %rdx"),
    ("rdsspq", "x86_64", "rdsspq %rcx", {}, "writes %rcx"),
    ("byte-ret", "x86_64", ".byte 0xc3", {}, "offset 0: 'retq' (c3): control leaves the body"),
    ("rep-ret", "x86_64", "rep ret", {}, "(f3c3): control leaves the body"),
    ("ds-call", "x86_64", "ds call *%rax", {"clobbers": '"rax"'}, "indirect or far call"),
    ("notrack-jmp", "x86_64", "notrack jmp *%rax", {"clobbers": '"rax"'},
     "indirect or far jump"),
    ("byte-jmp", "x86_64", ".byte 0xeb,0x10", {}, "branch target 0x12 is outside the body"),
    ("add-rsp", "x86_64", "add $8, %rsp", {}, "changes the stack pointer other than"),
    ("mov-rsp", "x86_64", "mov $0, %rsp", {}, "changes the stack pointer other than"),
    ("mov-esp", "i386", "mov $0, %esp", {}, "changes the stack pointer other than"),
    ("unbalanced", "x86_64", "push %rax", {"returns": "unsigned long"},
     "8 bytes left pushed at the end of the body"),
    ("pop-above", "x86_64", "pop %rax", {"returns": "unsigned long"},
     "pops above the stack pointer"),
    ("paths-differ", "x86_64", "test %edi, %edi; jz 1f; push %rax; 1:",
     {"args": '"int x"', "returns": "int"}, "the stack differs between paths"),
    ("caller-stack", "x86_64", "movq $0, 8(%rsp)", {}, "writes the caller's stack"),
    ("mid-insn", "x86_64", ".byte 0xeb, 0x01, 0x48, 0x90", {},
     "into the middle of an instruction"),
    ("call-no-reloc", "x86_64", ".byte 0xe8, 0, 0, 0, 0", {},
     "call without a relocation"),
    ("jmp-out", "x86_64", ".byte 0xe9; .long somewhere_else - . - 4", {},
     "jumps to 'somewhere_else', outside the body"),
    ("iret", "i386", ".byte 0xcf", {}, "'iretl' (cf): control leaves the body"),
    ("jmp-text", "x86_64", "jmp somewhere_else", {}, "a jump may only target a local label"),
    ("far-jmp", "i386", "ljmp $8, $0", {}, "control leaves the body"),
    ("int", "x86_64", "int $0x80", {}, "control leaves the body"),
    ("half-restored", "x86_64", "push %rbx; mov $1, %ebx; test %ebx, %ebx; jz 1f; pop %rbx; "
     "jmp 2f; 1: pop %rcx; 2:", {}, "offset 1: 'movl $1, %ebx' (bb01000000): writes %rbx, %rcx"),
    ("not-restored", "x86_64", "push %rbx; mov $1, %ebx; pop %rcx; push %rcx; pop %rcx",
     {}, "writes %rbx, %rcx"),
    ("pcrel-data", "x86_64", "movl $(foo - .), %eax", {"returns": "int"},
     "not a branch or RIP-relative displacement"),
    ("undecodable", "x86_64", "nop; .byte 0x0f, 0x04", {}, "offset 1: bytes 0f04 do not decode"),
]


@pytest.mark.parametrize("arch,body,fields,expected",
                         [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], arch: str, body: str,
                 fields: dict[str, str], expected: str) -> None:
    code, err = gen(tmp_path, capsys, spec_text(arch, body, **fields))
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"linkfix: {tmp_path / 'spec.toml'}: "
                                                   "op 'op': backend 'native': ")
    assert expected in err
    assert not (tmp_path / "out").exists()


ACCEPTED = [
    ("pushf-pop", "x86_64", "pushf; pop %rax", {"returns": "unsigned long"}),
    ("bracket", "x86_64", "push %rbx; mov $1, %ebx; pop %rbx", {}),
    ("bracket-branches", "x86_64", "push %rbx; test %edi, %edi; jz 1f; xor %ebx, %ebx; 1: "
     "pop %rbx", {"args": '"int x"'}),
    ("own-slot", "x86_64", "push %rax; movq $0, (%rsp); pop %rax", {"returns": "long"}),
    ("loop", "x86_64", "mov $3, %ecx; 1: dec %ecx; jnz 1b", {"clobbers": '"rcx"'}),
    ("to-end", "x86_64", "test %edi, %edi; jz 1f; cli; 1:", {"args": '"int x"'}),
    ("call-in-body", "x86_64", "test $0x200, %rdi; jz 1f; call helper; 1:",
     {"args": '"unsigned long f"'}),
    ("cmp-test", "x86_64", "test $1, %eax; cmp %rcx, %rdx; bt $3, %rdi", {}),
    ("cmpxchg-declared", "x86_64", "lock cmpxchg %rsi, (%rdi)",
     {"args": '"long *p", "long v"', "returns": "long"}),
    ("pusha-popa", "i386", "pusha; call helper; popa", {}),
    ("rip-relative", "x86_64", "movl $0, flag(%rip)", {}),
    ("absolute-i386", "i386", "movl $0, flag", {}),
    ("cr3", "x86_64", "mov %rdi, %cr3", {"args": '"unsigned long v"'}),
]


@pytest.mark.parametrize("arch,body,fields", [c[1:] for c in ACCEPTED],
                         ids=[c[0] for c in ACCEPTED])
def test_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str], arch: str, body: str,
                  fields: dict[str, str]) -> None:
    code, err = gen(tmp_path, capsys, spec_text(arch, body, **fields))
    assert code == 0, err
    assert (tmp_path / "out" / "linkfix.h").exists()
