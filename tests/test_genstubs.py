"""gen-stubs output, built with the real toolchain: gcc, GNU as, ld, objdump.

x86_64 and i386 alike: the header compiles freestanding, every site leaves one
record, the GAS macros assemble (and refuse a wrong clobber list), the pieces
link with a script that INCLUDEs linkfix.lds, the meta header parses, a
`cli` / `call` op costs the compiler no register, and the ops tables, thunks
and boot-time selection run correctly in a user-space program.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linkfix import layout, measure, sitetext
from linkfix.arch import I386, X86_64
from linkfix.gencache import CACHE_NAME
from linkfix.genstubs import generate
from linkfix.padding import pad
from linkfix.sitefill import nop_fill

ROOT = Path(__file__).resolve().parent.parent
SPECS = Path(__file__).parent / "specs"
OUTPUTS = ("linkfix.h", "linkfix_asm.h", "linkfix_thunks.S", "linkfix_ops.c", "linkfix_boot.c",
           "linkfix.lds",
           "linkfix.json")

CFLAGS = {
    "x86_64": ["-O2", "-ffreestanding", "-mno-red-zone", "-fno-pic", "-Wall", "-Wextra",
               "-Werror"],
    "i386": ["-m32", "-mregparm=3", "-O2", "-ffreestanding", "-fno-pic", "-Wall", "-Wextra",
             "-Werror"],
}
ASFLAGS = {"x86_64": [], "i386": ["-m32"]}
LDEMU = {"x86_64": "elf_x86_64", "i386": "elf_i386"}
REG = {"x86_64": "rax", "i386": "eax"}
SP = {"x86_64": "rsp", "i386": "esp"}


def run(cmd: list[str], cwd: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr}")
    return proc


def gen_cli(spec: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "linkfix", "gen-stubs", str(spec), "-o",
                           str(out), *extra], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module", params=["x86_64", "i386"])
def stubs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    arch = request.param
    out = tmp_path_factory.mktemp(f"stubs-{arch}")
    proc = gen_cli(SPECS / f"{arch}.toml", out)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "linkfix.json").read_text())
    return arch, out, manifest


# ------------------------------------------------------------------ build helpers

USES_C = r"""
#include "linkfix.h"

unsigned long lguest_irq_enabled, lguest_last_pfn;
unsigned char xen_vcpu_mask;
unsigned long cr3_shadow;

void LINKFIX_CALLEE xen_irq_disable(void) {}
void xen_irq_enable(void) {}
unsigned long LINKFIX_CALLEE xen_save_fl(void) { return 0x200; }
void LINKFIX_CALLEE xen_write_cr3(unsigned long v) { cr3_shadow = v; }
unsigned long LINKFIX_CALLEE xen_read_cr3(void) { return cr3_shadow; }
void LINKFIX_CALLEE xen_set_pte(unsigned long *p, unsigned long v) { *p = v; }

#define NI __attribute__((noinline))
NI void s1(void) { irq_disable(); }
NI void s2(void) { irq_enable(); }
NI unsigned long s3(void) { return save_fl(); }
NI void s4(unsigned long f) { restore_fl(f); }
NI void s5(unsigned long v) { write_cr3(v); }
NI unsigned long s6(void) { return read_cr3(); }
NI void s7(unsigned long *p, unsigned long v) { set_pte(p, v); }
NI unsigned long s8(unsigned long *p)
{
	unsigned long f = save_fl();

	irq_disable();
	set_pte(p, f);
	restore_fl(f);
	return f;
}
NI int b1(int a) { if (linkfix_backend_is(xen)) return a * 3; return a + 1; }
NI int b2(int a) { if (linkfix_backend_is(native)) return a - 3; return a; }
NI int b3(int a) { if (linkfix_backend_is(lguest)) return a * 7; return a ^ 5; }

void _start(void)
{
	unsigned long pte;

	linkfix_boot_select("root=/dev/sda linkfix=xen");
	s1(); s2(); s4(s3()); s5(s6()); s7(&pte, 1); s8(&pte);
	b1(1); b2(2); b3(3);
	for (;;)
		;
}
"""
# op name -> sites of it in USES_C; branch backend -> sites
C_OP_SITES = {"irq_disable": 2, "irq_enable": 1, "save_fl": 2, "restore_fl": 2, "write_cr3": 1,
              "read_cr3": 1, "set_pte": 2}
C_BRANCH_SITES = {"xen": 1, "native": 1, "lguest": 1}

USES_S = r"""
#include "linkfix_asm.h"
	.text
	.globl asm_uses
asm_uses:
	LINKFIX_irq_disable
	LINKFIX_save_fl %{ret}
	LINKFIX_set_pte {ret}, {clob}
	LINKFIX_restore_fl
	LINKFIX_restore_fl
	ret
	.section .note.GNU-stack,"",@progbits
"""
S_OP_SITES = {"irq_disable": 1, "save_fl": 1, "set_pte": 1, "restore_fl": 2}

# The example linker script in ldscripts/ that INCLUDEs linkfix.lds.
LINK_LDS = (Path(__file__).resolve().parents[1] / "ldscripts" / "minimal.lds").read_text()


def build_image(arch: str, out: Path, work: Path) -> Path:
    (work / "uses.c").write_text(USES_C)
    clob = "rcx" if arch == "x86_64" else "ecx"
    (work / "uses.S").write_text(USES_S.replace("{ret}", REG[arch]).replace("{clob}", clob))
    (work / "image.lds").write_text(LINK_LDS)
    cc = ["gcc", *CFLAGS[arch], f"-I{out}", "-c"]
    run([*cc, "uses.c", "-o", "uses.o"], cwd=work)
    run(["gcc", *ASFLAGS[arch], f"-I{out}", "-c", "uses.S", "-o", "uses_s.o"], cwd=work)
    run(["gcc", *ASFLAGS[arch], "-c", str(out / "linkfix_thunks.S"), "-o", "thunks.o"], cwd=work)
    run([*cc, str(out / "linkfix_ops.c"), "-o", "ops.o"], cwd=work)
    run(["ld", "-m", LDEMU[arch], "-L", str(out), "-T", "image.lds", "-o", "image",
         "uses.o", "uses_s.o", "thunks.o", "ops.o"], cwd=work)
    return work / "image"


class Image:
    """The linked image, read with pyelftools."""

    def __init__(self, path: Path) -> None:
        from elftools.elf.elffile import ELFFile

        self.f = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.elf = ELFFile(self.f)
        self.sections = {s.name: s for s in self.elf.iter_sections()}
        symtab = self.elf.get_section_by_name(".symtab")
        self.symbols = {s.name: s["st_value"] for s in symtab.iter_symbols() if s.name}

    def section(self, name: str) -> tuple[int, bytes]:
        sec = self.sections[name]
        return sec["sh_addr"], sec.data()

    def read(self, addr: int, n: int) -> bytes:
        for sec in self.sections.values():
            base, size = sec["sh_addr"], sec["sh_size"]
            if sec["sh_type"] == "SHT_PROGBITS" and base <= addr and addr + n <= base + size:
                return sec.data()[addr - base: addr - base + n]
        raise KeyError(hex(addr))

    def close(self) -> None:
        self.f.close()


def section_size(obj: Path, name: str) -> int:
    out = run(["objdump", "-h", str(obj)]).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == name:
            return int(parts[2], 16)
    return 0


# ------------------------------------------------------------------ tests


def test_generated_files(stubs) -> None:
    arch, out, manifest = stubs
    # the generated files and gen-stubs' cache, nothing else
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS, CACHE_NAME])
    assert (out / "linkfix.lds").read_bytes() == (ROOT / "ldscripts" / "linkfix.lds").read_bytes()
    assert manifest["arch"] == arch
    assert manifest["format_version"] == layout.VERSION
    assert manifest["backends"] == ["native", "xen", "lguest"]
    ops = {op["name"]: op for op in manifest["ops"]}
    for op in ops.values():
        # The default backend's body stays inline; longer ones go out of line.
        own = op["bodies"].get("native", {"length": 0})["length"]
        assert op["site_budget"] == max(5, own)
        inline = [b["length"] for b in op["bodies"].values() if b["length"] <= max(5, own)]
        assert op["site_size"] == max(5, *inline)
        for b in op["bodies"].values():
            assert b["placement"] == ("ool" if b["length"] > op["site_size"] else
                                      "empty" if b["kind"] == "empty" else b["kind"])
    assert ops["irq_disable"]["bodies"]["native"] == {
        "kind": "inline", "text": "cli", "source": "cli", "length": 1,
        "placement": "inline", "executed_insns": 1, "executed_bytes": 5, "padding_insns": 0}
    assert ops["irq_disable"]["bodies"]["xen"]["kind"] == "call"
    assert ops["restore_fl"]["bodies"]["lguest"]["kind"] == "empty"
    assert ops["save_fl"]["clobbers"] == [REG[arch]]
    assert [b["index"] for b in manifest["branch_ops"]] == [7, 8, 9]
    assert manifest["spec_hash"].startswith("0x")


def test_records_match_sites(stubs, tmp_path: Path) -> None:
    arch, out, manifest = stubs
    image = build_image(arch, out, tmp_path)
    n_c = sum(C_OP_SITES.values())
    n_s = sum(S_OP_SITES.values())
    n_b = sum(C_BRANCH_SITES.values())
    assert section_size(tmp_path / "uses.o", ".linkfix.sites") == n_c * 8
    assert section_size(tmp_path / "uses.o", ".linkfix.branches") == n_b * 24
    assert section_size(tmp_path / "uses_s.o", ".linkfix.sites") == n_s * 8
    assert section_size(tmp_path / "uses.o", ".linkfix.repl") == 0  # copies: thunks.o only

    ops = manifest["ops"]
    names = [op["name"] for op in ops]
    img = Image(image)
    try:
        # the meta header: fixed part, names, bounds, then the body table
        mbase, meta = img.section(".linkfix.meta")
        assert img.symbols["__linkfix_meta_start"] == mbase
        fixed = layout.META_FIXED.unpack_from(meta)
        magic, version, machine, n_ops, n_backends, recsize, names_size, spec_hash = fixed[:8]
        assert magic == layout.MAGIC and version == layout.VERSION == 4
        assert machine == (62 if arch == "x86_64" else 3)
        assert (n_ops, n_backends, recsize) == (10, 3, 8)
        assert spec_hash == int(manifest["spec_hash"], 16)
        assert fixed[8:10] == (0, 0)  # not patched
        blob = meta[28 + n_ops: 28 + n_ops + names_size]
        assert blob.split(b"\0")[:-1] == [
            b"native", b"xen", b"lguest", *(n.encode() for n in names),
            b"backend_is(native)", b"backend_is(xen)", b"backend_is(lguest)"]
        at = 28 + n_ops + names_size
        at += -at % 4
        bounds = struct.unpack_from("<6i", meta, at)
        for j, sym in enumerate(("sites_start", "sites_end", "branches_start", "branches_end",
                                 "repl_start", "repl_end")):
            assert mbase + at + 4 * j + bounds[j] == img.symbols[f"__linkfix_{sym}"]
        table = at + 24
        copies = {}
        for op in range(n_ops):
            for k in range(4):
                e = table + 16 * (op * 4 + k)
                rel, _crc, length, flags = struct.unpack_from("<iIBB", meta, e)
                copies[(op, k)] = (mbase + e + rel if rel else None, length, flags)

        # op site records: 8 bytes, the linked call and its padding
        base, data = img.section(".linkfix.sites")
        assert len(data) == (n_c + n_s) * 8
        seen_ops: dict[str, int] = {}
        for i in range(0, len(data), 8):
            rel, op_index, site_len, check = struct.unpack_from("<iHBB", data, i)
            site = base + i + rel
            assert check == ~op_index & 0xFF  # the op, repeated
            op = ops[op_index]
            seen_ops[op["name"]] = seen_ops.get(op["name"], 0) + 1
            assert site_len == op["site_size"]
            site_bytes = img.read(site, site_len)
            assert site_bytes[0] == 0xE8
            rel32 = struct.unpack_from("<i", site_bytes, 1)[0]
            assert site + 5 + rel32 == img.symbols[f"__lf_dispatch_{op['name']}"]
            assert site_bytes[5:] == nop_fill(site_len - 5)
            g_addr, g_len, g_flags = copies[(op_index, 0)]
            assert (g_len, g_flags) == (site_len, layout.FLAG_PRESENT | layout.FLAG_CALL)
            g = img.read(g_addr, g_len)
            # the generic copy: the same call, relocated from where it is stored
            assert g[0] == 0xE8 and g_addr + 5 + struct.unpack_from("<i", g, 1)[0] == \
                site + 5 + rel32 and g[5:] == site_bytes[5:]
            for k, backend in enumerate(manifest["backends"], start=1):
                addr, length, flags = copies[(op_index, k)]
                body = op["bodies"].get(backend)
                if body is None:
                    assert (addr, length, flags) == (None, 0, 0)
                    continue
                assert flags & layout.FLAG_PRESENT and length == site_len
                assert bool(flags & layout.FLAG_CALL) == (body["placement"] == "call")
                assert bool(flags & layout.FLAG_OOL) == (body["placement"] == "ool")
                copy = img.read(addr, length)
                if body["text"] == "cli":  # CS-prefixed cli: 2e... fa (i386: DS, 3e)
                    prefix = 0x2E if arch == "x86_64" else 0x3E
                    assert copy == bytes([prefix]) * (site_len - 1) + b"\xfa"
                if body["placement"] == "ool":
                    target = addr + 5 + struct.unpack_from("<i", copy, 1)[0]
                    assert copy[0] == 0xE8 and \
                        target == img.symbols[f"__lf_body_{op['name']}_{backend}"]
        expected = {k: C_OP_SITES.get(k, 0) + S_OP_SITES.get(k, 0)
                    for k in set(C_OP_SITES) | set(S_OP_SITES)}
        assert seen_ops == expected
        assert set(seen_ops) <= set(names)

        # branch records: 24 bytes, the jump and its two targets, named twice
        bbase, bdata = img.section(".linkfix.branches")
        assert len(bdata) == n_b * 24
        seen_branches: dict[str, int] = {}
        for i in range(0, len(bdata), 24):
            rs, rg, ry, op_index, site_len, kind, rg2, ry2 = struct.unpack_from("<iiiHBBii",
                                                                               bdata, i)
            assert (rg2 + 12, ry2 + 12) == (rg, ry)
            site = bbase + i + rs
            b = op_index - len(ops) + 1
            assert (site_len, kind) == (b, layout.KIND_BRANCH)  # byte 14: backend tested
            backend = manifest["backends"][b - 1]
            seen_branches[backend] = seen_branches.get(backend, 0) + 1
            site_bytes = img.read(site, 5)
            assert site_bytes[0] == 0xE9
            # as linked, the jump leads to the generic target the record names
            assert site + 5 + struct.unpack_from("<i", site_bytes, 1)[0] == bbase + i + 4 + rg
            assert bbase + i + 8 + ry != bbase + i + 4 + rg
            for k in range(4):
                addr, length, flags = copies[(op_index, k)]
                if k in (0, b):
                    assert (addr, length, flags) == (None, 5, layout.FLAG_PRESENT |
                                                     layout.FLAG_JMP)
                else:
                    assert flags == layout.FLAG_PRESENT and img.read(addr, 5) == nop_fill(5)
        assert seen_branches == C_BRANCH_SITES
        assert len(meta) % 4 == 0
    finally:
        img.close()


def test_ops_c_needs_no_libc(stubs, tmp_path: Path) -> None:
    arch, out, manifest = stubs
    run(["gcc", *CFLAGS[arch], "-c", str(out / "linkfix_ops.c"), "-o", "ops.o"], cwd=tmp_path)
    undefined = set(run(["nm", "-u", "ops.o"], cwd=tmp_path).stdout.split()) - {"U"}
    targets = {sym for op in manifest["ops"] for sym in op["ops_table"].values()}
    assert undefined == targets | {"__linkfix_meta_start"}


def test_asm_macro_refuses_a_register_not_free(stubs, tmp_path: Path) -> None:
    arch, out, _ = stubs
    other = "rcx" if arch == "x86_64" else "ecx"
    (tmp_path / "bad.S").write_text(f'#include "linkfix_asm.h"\n\tLINKFIX_save_fl {other}\n')
    proc = run(["gcc", *ASFLAGS[arch], f"-I{out}", "-c", "bad.S", "-o", "bad.o"],
               cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert (f"Error: linkfix: LINKFIX_save_fl may clobber %{REG[arch]}, which is not in its "
            f"list of free registers") in proc.stderr


def test_thunks_save_what_the_op_does_not_clobber(stubs, tmp_path: Path) -> None:
    arch, out, manifest = stubs
    run(["gcc", *ASFLAGS[arch], "-c", str(out / "linkfix_thunks.S"), "-o", "t.o"], cwd=tmp_path)
    dis = run(["objdump", "-d", "--no-show-raw-insn", "t.o"], cwd=tmp_path).stdout
    saved = {"x86_64": ["rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"],
             "i386": ["eax", "ecx", "edx"]}[arch]
    for op in manifest["ops"]:
        body = re.search(rf"<__lf_dispatch_{op['name']}>:\n(.*?)\n\n", dis, re.S)
        assert body, op["name"]
        pushes = re.findall(r"push\s+%(\w+)", body.group(1))
        assert pushes == [r for r in saved if r not in op["clobbers"]]
        assert re.search(r"\bcall\s+\*", body.group(1))
    source = (out / "linkfix_thunks.S").read_text()
    for op in manifest["ops"]:
        word, rip = (8, "(%rip)") if arch == "x86_64" else (4, "")
        assert f"\tcall *linkfix_ops+{word * op['index']}{rip}\n" in source


CLI_OR_CALL = """
[linkfix]
arch = "{arch}"
backends = ["native", "xen"]

[ops.irq_disable.bodies]
native = "cli"
xen = "call xen_irq_disable"
"""

KEEP_C = {
    "x86_64": """
#include "linkfix.h"
long f(long a, long b, long c, long d) { irq_disable(); return a + b * c - d; }
extern void ext(void);
long g(long a, long b, long c, long d) { ext(); return a + b * c - d; }
""",
    "i386": """
#include "linkfix.h"
long f(long a, long b, long c) { irq_disable(); return a + b * c; }
extern void ext(void);
long g(long a, long b, long c) { ext(); return a + b * c; }
""",
}


@pytest.mark.parametrize("arch", ["x86_64", "i386"])
def test_call_op_clobbers_nothing(arch: str, tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(CLI_OR_CALL.format(arch=arch))
    out = tmp_path / "out"
    assert gen_cli(spec, out, "-q").returncode == 0
    manifest = json.loads((out / "linkfix.json").read_text())
    assert manifest["ops"][0]["site_size"] == 5
    assert manifest["ops"][0]["clobbers"] == []
    (tmp_path / "keep.c").write_text(KEEP_C[arch])
    run(["gcc", *CFLAGS[arch], f"-I{out}", "-c", "keep.c", "-o", "keep.o"], cwd=tmp_path)
    dis = run(["objdump", "-d", "--no-show-raw-insn", "keep.o"], cwd=tmp_path).stdout
    funcs = dict(re.findall(r"<(\w+)>:\n(.*?)(?=\n\n|\Z)", dis, re.S))
    callee_saved = {"x86_64": ["rbx", "rbp", "r12", "r13", "r14", "r15"],
                    "i386": ["ebx", "ebp", "esi", "edi"]}[arch]

    def spills(code: str) -> list[str]:
        code = code.split("\tret")[0]  # the alignment NOPs after ret name registers too
        found = re.findall(r"\bpush\b", code)
        found += re.findall(rf"%{SP[arch]}\b", code)
        found += [r for r in callee_saved if re.search(rf"%{r}\b", code)]
        return found

    # The site: a 5-byte call and nothing saved around it; the arguments stay in
    # their registers across it.
    assert "call" in funcs["f"]
    assert spills(funcs["f"]) == [], funcs["f"]
    # Control: an ordinary call forces the compiler to save the live values.
    assert spills(funcs["g"]) != []


def test_output_is_deterministic_and_unchanged_files_are_kept(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    p = gen_cli(SPECS / "x86_64.toml", a)
    assert p.returncode == 0 and "7 of 7 files updated" in p.stdout
    assert gen_cli(SPECS / "x86_64.toml", b, "-q").returncode == 0
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    before = {n: (a / n).stat().st_mtime_ns for n in OUTPUTS}
    time.sleep(0.01)
    p = gen_cli(SPECS / "x86_64.toml", a)
    assert p.returncode == 0 and "0 of 7 files updated" in p.stdout
    assert {n: (a / n).stat().st_mtime_ns for n in OUTPUTS} == before
    assert gen_cli(SPECS / "x86_64.toml", a, "-q").stdout == ""


def test_outdir_is_created(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "er"
    assert gen_cli(SPECS / "i386.toml", out, "-q").returncode == 0
    # the generated files and gen-stubs' cache, nothing else
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS, CACHE_NAME])


# ------------------------------------------------------------------ run the tables

RUNTIME_C = r"""
#include "linkfix.h"

#ifdef __x86_64__
#define TRASH() __asm__ __volatile__("mov $-1, %%rax\n\tmov $-1, %%rcx\n\tmov $-1, %%rdx\n\t" \
	"mov $-1, %%rsi\n\tmov $-1, %%rdi\n\tmov $-1, %%r8\n\tmov $-1, %%r9\n\t" \
	"mov $-1, %%r10\n\tmov $-1, %%r11" ::: "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", \
	"r10", "r11")
#else
#define TRASH() __asm__ __volatile__("mov $-1, %%eax\n\tmov $-1, %%ecx\n\tmov $-1, %%edx" \
	::: "eax", "ecx", "edx")
#endif

unsigned long bump_count, bump_enabled = 1;
static unsigned long unknown_reports, unknown_length;

/* The kernel's own report of an unknown linkfix= value (overrides the weak one). */
void linkfix_unknown_backend(const char *value, unsigned long length)
{
	unknown_reports++;
	unknown_length = length;
	(void)value;
}

unsigned long LINKFIX_CALLEE xen_get_id(void) { TRASH(); return 2; }
void LINKFIX_CALLEE xen_add_to(unsigned long *p, unsigned long v) { TRASH(); *p += 10 * v; }
void xen_bump(void) { TRASH(); bump_count += 100; }

/* Values live in argument registers across sites whose C callees trash them. */
__attribute__((noinline)) unsigned long keep(unsigned long a, unsigned long b, unsigned long c)
{
	unsigned long id = get_id();

	return id * 1000 + a + b * c;
}

__attribute__((noinline)) unsigned long keep2(unsigned long a, unsigned long b, unsigned long c)
{
	bump();
	return a + b * c;
}

static int same(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

/* After `linkfix patch --target xen --op bump=native`: the state record, read at run time. */
static int patched_checks(void)
{
	if (!linkfix_image_patched() || linkfix_patched_target() != LINKFIX_BACKEND_XEN) return 30;
	if (linkfix_op_state(LINKFIX_OP_GET_ID) != LINKFIX_BACKEND_XEN) return 31;
	if (linkfix_op_state(LINKFIX_OP_BUMP) != LINKFIX_BACKEND_NATIVE) return 32;
	/* add_to has no lguest body, but has a xen one */
	if (linkfix_op_state(LINKFIX_OP_ADD_TO) != LINKFIX_BACKEND_XEN) return 33;
	if (linkfix_op_state(LINKFIX_OP_BACKEND_IS_XEN) != LINKFIX_BACKEND_XEN) return 34;
	if (linkfix_op_state(LINKFIX_N_OPS + LINKFIX_N_BACKENDS) != 0) return 35;
	linkfix_boot_select("linkfix=native");  /* a patched image keeps its target */
	if (linkfix_current_backend != LINKFIX_BACKEND_XEN) return 36;
	if (keep(1, 2, 3) != 2007) return 37;
	return 0;
}

/* main is called by the C library, with its arguments on the stack (the rest of
 * this file is regparm(3) on i386). */
#ifdef __i386__
__attribute__((regparm(0)))
#endif
int main(int argc, char **argv)
{
	unsigned long x = 5;

	(void)argv;
	if (argc > 1)
		return patched_checks();
	if (linkfix_image_patched() || linkfix_op_state(LINKFIX_OP_GET_ID) != 0) return 40;
	if (LINKFIX_OP_GET_ID != 0 || LINKFIX_OP_BACKEND_IS_NATIVE != LINKFIX_N_OPS) return 41;

	if (linkfix_current_backend != LINKFIX_BACKEND_XEN) return 1;
	if (linkfix_patched_target() != 0) return 2;
	if (keep(1, 2, 3) != 2007) return 3;
	linkfix_boot_select("console=ttyS0 linkfix=lguest quiet");
	if (linkfix_current_backend != LINKFIX_BACKEND_LGUEST) return 4;
	if (keep(1, 2, 3) != 3007) return 5;
	add_to(&x, 2);                 /* no lguest body: the default backend's (xen) */
	if (x != 25) return 6;
	bump();                        /* empty lguest body */
	if (bump_count != 0) return 7;
	if (!linkfix_backend_is(lguest) || linkfix_backend_is(xen)) return 8;
	if (linkfix_select_backend_name("native") != 0) return 9;
	if (keep(1, 2, 3) != 1007) return 10;
	add_to(&x, 2);
	if (x != 27) return 11;
	bump();
	if (bump_count != 1) return 12;
	if (!linkfix_backend_is(native)) return 13;
	linkfix_select_backend_name("xen");
	if (keep2(1, 2, 3) != 7 || bump_count != 101) return 14;
	bump_enabled = 0;
	if (keep2(4, 5, 6) != 34 || bump_count != 101) return 15;
	if (linkfix_select_backend_name("vmi") != -1) return 16;
	if (linkfix_select_backend(0) != -1 || linkfix_select_backend(4) != -1) return 17;
	linkfix_select_backend(LINKFIX_BACKEND_NATIVE);
	linkfix_boot_select("linkfix=bogus");
	if (linkfix_current_backend != LINKFIX_BACKEND_XEN) return 18;
	if (unknown_reports != 1 || unknown_length != 5) return 42;
	linkfix_boot_select("linkfix=LGuest");  /* names compare ignoring case */
	if (linkfix_current_backend != LINKFIX_BACKEND_LGUEST) return 43;
	if (linkfix_select_backend_name("NATIVE") != 0) return 44;
	linkfix_select_backend(LINKFIX_BACKEND_NATIVE);
	linkfix_boot_select("xlinkfix=lguest linkfix=nativ");
	if (linkfix_current_backend != LINKFIX_BACKEND_XEN) return 19;
	linkfix_boot_select("linkfix=native");
	if (linkfix_current_backend != LINKFIX_BACKEND_NATIVE) return 20;
	linkfix_boot_select(0);
	if (linkfix_current_backend != LINKFIX_BACKEND_XEN) return 21;
	if (!same(linkfix_backend_name(0), "generic")) return 22;
	if (!same(linkfix_backend_name(3), "lguest") || linkfix_backend_name(4) != 0) return 23;
	return 0;
}
"""

INSERT_LDS = "SECTIONS { INCLUDE linkfix.lds } INSERT AFTER .rodata;\n"


@pytest.mark.parametrize("arch", ["x86_64", "i386"])
def test_tables_thunks_and_selection_run(arch: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = gen_cli(SPECS / f"runtime_{arch}.toml", out, "-q")
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "main.c").write_text(RUNTIME_C)
    (tmp_path / "insert.lds").write_text(INSERT_LDS)
    flags = [f for f in CFLAGS[arch] if f != "-ffreestanding"]
    if arch == "x86_64":
        flags.append("-mno-red-zone")
    run(["gcc", *flags, "-no-pie", f"-I{out}", "-L", str(out), "main.c",
         str(out / "linkfix_ops.c"), str(out / "linkfix_thunks.S"), "-Wl,-T,insert.lds",
         "-o", "prog"], cwd=tmp_path)
    result = subprocess.run([str(tmp_path / "prog")], capture_output=True)
    assert result.returncode == 0, f"check {result.returncode} failed"
    # The same program patched after the link reads its state record at run time.
    patched = tmp_path / "prog.xen"
    proc = subprocess.run([sys.executable, "-m", "linkfix", "patch", str(tmp_path / "prog"),
                           "-o", str(patched), "--target", "xen", "--op", "bump=native"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = subprocess.run([str(patched), "patched"], capture_output=True)
    assert result.returncode == 0, f"check {result.returncode} failed"


# ------------------------------------------------------------------ measuring, guards


def test_keystone_and_gnu_as_agree_where_keystone_is_right() -> None:
    from linkfix.body import split_statements

    bodies = ["cli", "pushf; pop %rax", "test $0x200, %rdi; jz 1f; call foo; 1:",
              "movl $0, lguest_irq_enabled(%rip)", "movb $1, %gs:xen_vcpu_mask"]
    stmts = [tuple(split_statements(b)) for b in bodies]
    ks = measure.keystone_assemble(X86_64, [measure.keystone_source(s) for s in stmts])
    gas = measure.gas_assemble(X86_64, [("op", str(i)) for i in range(len(bodies))], stmts)
    assert [len(c) for c, _relocs in gas] == [1, 2, 14, 10, 9]
    assert [s for s, _ in ks] == ["ok"] * 5
    assert [len(v) for _, v in ks[:4]] == [1, 2, 14, 10]  # type: ignore[arg-type]
    # keystone encodes %gs:sym as RIP-relative (8 bytes): GNU as decides lengths.
    assert len(ks[4][1]) == 8  # type: ignore[arg-type]


def _hang_worker(conn, mode64, texts):  # type: ignore[no-untyped-def]
    for i, text in enumerate(texts):
        conn.send((i, "start", None))
        if text == "HANG":
            time.sleep(3600)
        conn.send((i, "ok", b"\x90"))
    conn.close()


def test_keystone_hang_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure, "_ks_worker", _hang_worker)
    t0 = time.monotonic()
    res = measure.keystone_assemble(I386, ["nop", "HANG", "nop"], timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert [s for s, _ in res] == ["ok", "timeout", "ok"]


def test_a_body_longer_than_the_budget_runs_out_of_line(tmp_path: Path) -> None:
    """Site length is decided at gen time: a non-default body over the budget becomes a
    call to its out-of-line copy, and `site_budget` keeps it inline."""
    text = ('[linkfix]\narch = "x86_64"\nbackends = ["native", "xen"]\n[ops.f]\n'
            'args = ["long x"]\n[ops.f.bodies]\nnative = "cli"\n'
            'xen = "movl $0, lguest_irq_enabled(%rip)"\n')
    spec = tmp_path / "s.toml"
    spec.write_text(text)
    m = generate(str(spec))[1][0]
    assert (m.site_len, m.budget) == (5, 5)
    assert [a.how for a in m.alts] == ["generic", "inline", "ool"]
    assert m.alts[2].path_insns == 3  # call, the body, ret
    spec.write_text(text.replace("[ops.f]\n", "[ops.f]\nsite_budget = 10\n"))
    m = generate(str(spec))[1][0]
    assert m.site_len == 10 and [a.how for a in m.alts] == ["generic", "inline", "inline"]


def test_a_stack_relative_body_cannot_go_out_of_line(tmp_path: Path, capsys) -> None:
    text = ('[linkfix]\narch = "x86_64"\nbackends = ["native", "xen"]\n[ops.f]\n'
            '[ops.f.bodies]\nnative = "cli"\nxen = "push %rax; movq $1, (%rsp); pop %rax"\n')
    spec = tmp_path / "s.toml"
    spec.write_text(text)
    from linkfix.cli import main as cli_main

    assert cli_main(["gen-stubs", str(spec), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot run out of line" in err and "addresses the stack" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ properties

POOL_64 = ["cli", "sti", "nop", "pushf; pop %rax", "mov %rdi, %cr3", "", "call helper_fn",
           "movl $0, some_var(%rip)", "test %rdi, %rdi; jz 1f; call helper_fn; 1:",
           "push %rcx; mov $1, %rcx; pop %rcx", "movb $1, %gs:percpu_var",
           "mov %rdi, %rax; add $7, %rax"]


@st.composite
def random_spec(draw: st.DrawFn) -> str:
    n_backends = draw(st.integers(1, 3))
    backends = ["native", "xen", "lguest"][:n_backends]
    lines = ['[linkfix]', 'arch = "x86_64"', f"backends = {json.dumps(backends)}"]
    for i in range(draw(st.integers(1, 3))):
        lines.append(f"[ops.op{i}]")
        lines.append('args = ["unsigned long a"]')
        lines.append('returns = "unsigned long"')
        if draw(st.booleans()):
            lines.append('clobbers = ["rcx"]')
        lines.append(f"[ops.op{i}.bodies]")
        chosen = draw(st.lists(st.sampled_from(backends), min_size=1, unique=True))
        for b in chosen:
            lines.append(f'{b} = "{draw(st.sampled_from(POOL_64))}"')
    return "\n".join(lines) + "\n"


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=random_spec())
def test_random_specs_render_deterministically(text: str, tmp_path: Path) -> None:
    spec = tmp_path / "r.toml"
    spec.write_text(text)
    _, models, files = generate(str(spec))
    _, _, again = generate(str(spec))
    assert files == again
    manifest = json.loads(files["linkfix.json"])
    for m, op in zip(models, manifest["ops"], strict=True):
        budget = max(5, m.measured["native"].length if "native" in m.measured else 0)
        inline = [m.measured[b].length for b in m.bodies if m.measured[b].length <= budget]
        assert m.site_len == max([5, *inline]) == op["site_size"]
        assert all(len(a.code) == m.site_len for a in m.alts if a.present)
        assert len(m.pad) == m.site_len - 5
        # the site's assembly carries exactly that padding
        assert any(line == f"\t.byte {','.join(f'0x{x:02x}' for x in m.pad)}"
                   for line in sitetext.op_site_lines(m, "1", lambda s: s)) == bool(m.pad)


@given(n=st.integers(0, 300))
def test_padding_is_one_instruction_of_exact_length(n: int) -> None:
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs

    data = pad(n)
    assert len(data) == n
    if n:
        first = next(Cs(CS_ARCH_X86, CS_MODE_64).disasm(data, 0))
        # one instruction: it covers the padding, or jumps over the INT3 filler to its end
        if first.size != n:
            assert first.mnemonic == "jmp"
            assert int(first.op_str, 16) == n


def test_renaming_the_spec_changes_no_generated_file(tmp_path: Path) -> None:
    text = (SPECS / "x86_64.toml").read_text()
    (tmp_path / "a.toml").write_text(text)
    (tmp_path / "other-name.toml").write_text(text)
    for name, out in (("a.toml", "one"), ("other-name.toml", "two")):
        proc = gen_cli(tmp_path / name, tmp_path / out, "-q")
        assert proc.returncode == 0, proc.stderr
    for f in OUTPUTS:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def test_verbose_prints_the_command_line_and_honours_v_1(tmp_path: Path) -> None:
    spec = SPECS / "x86_64.toml"
    proc = gen_cli(spec, tmp_path / "a", "-v")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("linkfix gen-stubs ") and str(spec) in lines[0]
    assert any(line.startswith("  irq_disable: site ") for line in lines)
    env = dict(os.environ, V="1")
    quiet = subprocess.run([sys.executable, "-m", "linkfix", "gen-stubs", str(spec), "-o",
                            str(tmp_path / "b")], capture_output=True, text=True, env=env,
                           cwd=ROOT)
    assert quiet.returncode == 0
    assert quiet.stdout.splitlines()[0] == lines[0].replace(str(tmp_path / "a"),
                                                            str(tmp_path / "b")).replace(
        " -v", "")
    assert any(line.startswith("  irq_disable: site ") for line in quiet.stdout.splitlines())


def test_declared_inner_calls_get_prototypes(tmp_path: Path) -> None:
    """`[ops.<op>.calls]` declares what an inline body's callee takes; linkfix.h then
    declares it, and a definition that disagrees no longer compiles silently."""
    text = (SPECS / "x86_64.toml").read_text().replace(
        "[ops.write_cr3]", '[ops.restore_fl.calls]\nxen_irq_enable = "void (void)"\n\n'
        "[ops.write_cr3]", 1)
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    proc = gen_cli(spec, tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    header = (tmp_path / "out" / "linkfix.h").read_text()
    assert "void LINKFIX_CALLEE xen_irq_enable(void);" in header
    ok = tmp_path / "ok.c"
    ok.write_text('#include "linkfix.h"\nvoid LINKFIX_CALLEE xen_irq_enable(void) {}\n')
    bad = tmp_path / "bad.c"
    bad.write_text('#include "linkfix.h"\nint xen_irq_enable(int x) { return x; }\n')
    cc = ["gcc", "-c", "-Wall", "-Wextra", "-Werror", f"-I{tmp_path / 'out'}", "-o",
          str(tmp_path / "x.o")]
    assert subprocess.run([*cc, str(ok)], capture_output=True).returncode == 0
    assert subprocess.run([*cc, str(bad)], capture_output=True).returncode != 0


@pytest.mark.parametrize("calls,message", [
    ('nope = "void (void)"', "field 'calls.nope': not a function an inline body of this op "
                             "calls"),
    ('xen_irq_enable = "void"', "is not \"<return type> (<parameters>)\""),
    ('xen_irq_enable = "struct x (void)"', "cannot be passed in a register"),
    ('xen_irq_enable = "void (unsigned long)"', "parameter name 'long' is a C keyword"),
])
def test_bad_inner_call_declarations(tmp_path: Path, calls: str, message: str) -> None:
    text = (SPECS / "x86_64.toml").read_text().replace(
        "[ops.write_cr3]", f"[ops.restore_fl.calls]\n{calls}\n\n[ops.write_cr3]", 1)
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    proc = gen_cli(spec, tmp_path / "out", "-q")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "op 'restore_fl'" in proc.stderr
    assert message in proc.stderr, proc.stderr
