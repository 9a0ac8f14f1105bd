"""ldscripts/linkfix.lds.h: the tables placed by a cpp-processed, kernel-style linker
script (LINKFIX_TABLES, `AT(ADDR(x) - LOAD_OFFSET)`, inside an init region), and
`linkfix patch`, `verify` and the generated boot patcher still find them."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from linkfix.postlink import image, tables

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "tests" / "specs"
LOAD_OFFSET = 0x40000000
TARGETS = ("native", "xen", "lguest", "generic")

# Like arch/x86/kernel/vmlinux.lds.S: virtual addresses LOAD_OFFSET above the load
# addresses, and the tables between __init_begin and __init_end.
KERNEL_LDS = f"""
#define LOAD_OFFSET {LOAD_OFFSET:#x}
#include "linkfix.lds.h"
ENTRY(_start)
SECTIONS
{{
	. = LOAD_OFFSET + 0x100000;
	.text : AT(ADDR(.text) - LOAD_OFFSET) {{ *(.text .text.*) }}
	.rodata : AT(ADDR(.rodata) - LOAD_OFFSET) {{ *(.rodata .rodata.*) }}
	. = ALIGN(4096);
	.init.begin : AT(ADDR(.init.begin) - LOAD_OFFSET) {{ __init_begin = .; }}
	LINKFIX_TABLES
	. = ALIGN(4096);
	.init.end : AT(ADDR(.init.end) - LOAD_OFFSET) {{ __init_end = .; }}
	.data : AT(ADDR(.data) - LOAD_OFFSET) {{ *(.data .data.*) }}
	.bss : AT(ADDR(.bss) - LOAD_OFFSET) {{ *(.bss .bss.*) *(COMMON) }}
}}
"""

USES_C = r"""
#include "linkfix.h"
unsigned long lguest_irq_enabled, lguest_last_pfn, cr3_shadow;
unsigned char xen_vcpu_mask;
void xen_irq_disable(void) {}
void xen_irq_enable(void) {}
unsigned long xen_save_fl(void) { return 0x200; }
void xen_write_cr3(unsigned long v) { cr3_shadow = v; }
unsigned long xen_read_cr3(void) { return cr3_shadow; }
void xen_set_pte(unsigned long *p, unsigned long v) { *p = v; }
#define NI __attribute__((noinline))
NI unsigned long f1(unsigned long *p)
{
	unsigned long f = save_fl();
	irq_disable();
	set_pte(p, f);
	write_cr3(read_cr3());
	restore_fl(f);
	irq_enable();
	return f;
}
NI int f2(int a) { if (linkfix_backend_is(xen)) return a * 3; return a + 1; }
static void copy(void *dst, const void *src, unsigned long n)
{
	unsigned long i;

	for (i = 0; i < n; i++)
		((volatile unsigned char *)dst)[i] = ((const unsigned char *)src)[i];
}
static const struct linkfix_boot_hooks hooks = { copy, 0, 0 };
int patched;
NI void done(void) { for (;;) __asm__ volatile("hlt"); }
void _start(void)
{
	linkfix_boot_select("");
	patched = linkfix_boot_patch(LINKFIX_BACKEND_XEN, &hooks);
	done();
}
"""


def sym(img: image.Image, name: str) -> int:
    value = img.symbol_value(name)
    assert value is not None, name
    return value


def sh(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, (cmd, r.stderr)


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linkfix", *argv], capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def linked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("lds-h")
    out = tmp / "stubs"
    r = cli("gen-stubs", str(SPECS / "x86_64.toml"), "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    (tmp / "uses.c").write_text(USES_C)
    (tmp / "kernel.lds.S").write_text(KERNEL_LDS)
    # The kernel preprocesses its script with cpp -P (scripts/Makefile.build, cpp_lds_S).
    sh(["cpp", "-P", "-C", "-D__ASSEMBLY__", "-DLINKER_SCRIPT", f"-I{ROOT / 'ldscripts'}",
        "kernel.lds.S", "-o", "kernel.lds"], tmp)
    cc = ["gcc", "-mno-red-zone", "-O2", "-ffreestanding", "-fno-pic", "-mcmodel=kernel",
          f"-I{out}", "-c"]
    sh([*cc, "uses.c", "-o", "uses.o"], tmp)
    sh([*cc, str(out / "linkfix_ops.c"), "-o", "ops.o"], tmp)
    sh([*cc, str(out / "linkfix_boot.c"), "-o", "boot.o"], tmp)
    sh(["gcc", "-c", str(out / "linkfix_thunks.S"), "-o", "thunks.o"], tmp)
    sh(["ld", "-m", "elf_x86_64", "--emit-relocs", "-T", "kernel.lds", "-o", "vmlinux",
        "uses.o", "ops.o", "boot.o", "thunks.o"], tmp)
    return tmp / "vmlinux"


def test_tables_in_init_memory_at_their_load_address(linked: Path) -> None:
    img = image.load(str(linked))
    begin, end = sym(img, "__init_begin"), sym(img, "__init_end")
    from elftools.elf.elffile import ELFFile

    with linked.open("rb") as f:
        elf = ELFFile(f)
        for name in ("meta", "sites", "branches", "repl"):
            sec = elf.get_section_by_name(f".linkfix.{name}")
            assert sec is not None and sec["sh_size"] > 0, name
            addr = sec["sh_addr"]
            assert begin <= addr and addr + sec["sh_size"] <= end, name
            assert sym(img, f"__linkfix_{name}_start") == addr
            assert sym(img, f"__linkfix_{name}_end") == addr + sec["sh_size"]
            seg = next(s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"
                       and s["p_vaddr"] <= addr < s["p_vaddr"] + s["p_memsz"])
            assert seg["p_vaddr"] - seg["p_paddr"] == LOAD_OFFSET  # AT(ADDR(x) - LOAD_OFFSET)


@pytest.mark.parametrize("target", TARGETS)
def test_patch_and_verify_find_the_tables(linked: Path, target: str, tmp_path: Path) -> None:
    assert cli("verify", str(linked)).returncode == 0
    dest = tmp_path / f"vmlinux.{target}"
    r = cli("patch", str(linked), "-o", str(dest), "--target", target)
    assert r.returncode == 0, r.stderr
    r = cli("verify", str(dest), "--target", target)
    assert r.returncode == 0, r.stderr
    t = tables.load(image.load(str(dest)))
    assert len(tables.check_records(t).site_addrs) > 0


def test_boot_patcher_finds_the_tables(linked: Path, tmp_path: Path) -> None:
    """The generated boot patcher, run under unicorn, writes what `linkfix patch
    --target xen` writes."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn import x86_const as x

    img = image.load(str(linked))
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    for seg in img.load_segments:
        lo, hi = seg.vaddr & ~0xFFF, (seg.vaddr + seg.memsz + 0xFFF) & ~0xFFF
        uc.mem_map(lo, hi - lo)
        uc.mem_write(seg.vaddr, img.data[seg.offset:seg.offset + seg.filesz])
    stack = 0x7F000000
    uc.mem_map(stack, 0x10000)
    uc.reg_write(x.UC_X86_REG_RSP, stack + 0x8000)
    uc.emu_start(sym(img, "_start"), sym(img, "done"), count=5_000_000)
    patched = struct.unpack("<i", uc.mem_read(sym(img, "patched"), 4))[0]
    assert patched > 0
    dest = tmp_path / "vmlinux.xen"
    assert cli("patch", str(linked), "-o", str(dest), "--target", "xen").returncode == 0
    want = image.load(str(dest))
    text = want.section(".text")
    assert text is not None
    content = want.read(text.addr, text.size)
    assert content is not None
    assert bytes(uc.mem_read(text.addr, text.size)) == content
    assert content != img.read(text.addr, text.size)  # the sites did change
