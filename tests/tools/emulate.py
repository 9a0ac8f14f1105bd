"""Run a stretch of an image's code under unicorn and report where it leaves.

Used to check that a spliced site does what its body did in .linkfix.repl:
same registers, same memory, same destination. unicorn runs at CPL 0 (cli,
sti, popf work) and only at low addresses, which is where the synthetic
images are linked.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from linkfix.postlink.image import Image

STACK64 = 0x7F000000
STACK32 = 0x0F000000
STACK_SIZE = 0x10000

REGS64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "eflags")
REGS32 = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eflags")


@dataclass
class Outcome:
    exit: int  # first address fetched outside [start, start+length)
    regs: dict[str, int]
    memory: bytes  # the watched data range after the run
    stack: bytes  # the stack page after the run


class Machine:
    """One unicorn instance holding an image's PT_LOAD segments and a stack."""

    def __init__(self, img: Image, watch: tuple[int, int]) -> None:
        from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_MODE_32, UC_MODE_64, Uc
        from unicorn import x86_const as x

        self.x = x
        self.bits = img.bits
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64 if img.bits == 64 else UC_MODE_32)
        self.regions: list[tuple[int, bytes]] = []
        mapped: set[int] = set()
        for seg in img.load_segments:
            lo = seg.vaddr & ~0xFFF
            hi = (seg.vaddr + seg.memsz + 0xFFF) & ~0xFFF
            for page in range(lo, hi, 0x1000):
                if page not in mapped:
                    self.uc.mem_map(page, 0x1000)
                    mapped.add(page)
            content = img.data[seg.offset:seg.offset + seg.filesz]
            self.uc.mem_write(seg.vaddr, content)
            self.regions.append((seg.vaddr, content + bytes(seg.memsz - seg.filesz)))
        self.stack = STACK64 if img.bits == 64 else STACK32
        self.uc.mem_map(self.stack, STACK_SIZE)
        self.watch = watch
        self.names = REGS64 if img.bits == 64 else REGS32
        self.ids = {n: getattr(x, f"UC_X86_REG_{n.upper()}") for n in self.names}
        self._range = (0, 0)
        self._exit: int | None = None
        self.uc.hook_add(UC_HOOK_CODE, self._hook)

    def _hook(self, uc, address, size, _data) -> None:  # noqa: ANN001 - unicorn callback
        lo, hi = self._range
        if not lo <= address < hi:
            self._exit = address
            uc.emu_stop()

    def run(self, start: int, length: int, regs: dict[str, int]) -> Outcome:
        for addr, content in self.regions:
            self.uc.mem_write(addr, content)
        self.uc.mem_write(self.stack, bytes(STACK_SIZE))
        sp = self.stack + STACK_SIZE // 2
        for name, value in regs.items():
            self.uc.reg_write(self.ids[name], value)
        self.uc.reg_write(self.ids["rsp" if self.bits == 64 else "esp"], sp)
        self._range = (start, start + length)
        self._exit = None
        if length == 0:
            self._exit = start
        else:
            self.uc.emu_start(start, 0, count=200)
        if self._exit is None:
            raise AssertionError(f"code at {start:#x} did not leave [{start:#x}, "
                                 f"{start + length:#x}) within 200 instructions")
        lo, hi = self.watch
        out_regs = {n: self.uc.reg_read(i) for n, i in self.ids.items()}
        return Outcome(self._exit, out_regs, bytes(self.uc.mem_read(lo, hi - lo)),
                       bytes(self.uc.mem_read(self.stack, STACK_SIZE)))

    def word(self, data: bytes, at: int) -> int:
        fmt = "<Q" if self.bits == 64 else "<I"
        return struct.unpack_from(fmt, data, at)[0]
