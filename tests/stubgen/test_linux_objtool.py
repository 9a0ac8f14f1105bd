"""The linux profile against Linux 6.1 itself: the generated files compile with the
kernel's own gcc command line and headers, and the tree's objtool, run as Kbuild
runs it, reports nothing about them (config B: on an `ld -r` of the objects, as on
vmlinux.o; config C, frame pointers: on each object). The same ops in the
freestanding profile draw warnings of every kind the trial met, so the checks are
live. ORC after objtool describes the stack inside every `pushf; pop %rax` site.

Needs the source tree (tests/tools/linuxtree.py says where and what else); marked
`linux`: deselect with `-m "not linux"`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import altcheck
import linuxtree
import orccheck
import pytest

from linkfix.arch import X86_64
from linkfix.stubgen.genstubs import generate
from linkfix.stubgen.insn import decode
from linkfix.stubgen.opmodel import OpModel

# The tree and the config B/C build trees come from the harness (conftest.py).
pytestmark = [pytest.mark.linux, pytest.mark.usefixtures("linux_builds")]

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "tests" / "specs"
SPEC = SPECS / "linux_x86_64.toml"

# The model backend (noinstr where its op is) and code using every op, from noinstr
# code (entry paths) and from ordinary code.
USES_C = r"""
#include <linux/kernel.h>
#include <linux/compiler.h>
#include "linkfix.h"

unsigned long model_cr2, model_cr3;
int model_calls, lf_test_counter;
noinstr void model_irq_disable(void) { model_calls++; }
noinstr void model_irq_enable(void) { model_calls++; }
noinstr unsigned long model_save_fl(void) { return 0x200; }
noinstr void model_restore_fl(unsigned long flags) { model_calls += flags != 0; }
void model_safe_halt(void) { model_calls++; }
void model_halt(void) { model_calls++; }
unsigned long model_read_cr3(void) { return model_cr3; }
void model_write_cr3(unsigned long v) { model_cr3 = v; }

noinstr unsigned long lf_test_entry(void)
{
	unsigned long flags = lf_save_fl();

	lf_irq_disable();
	lf_test_counter += lf_read_cr2() != 0;
	lf_restore_fl(flags);
	return flags;
}

void lf_test_plain(unsigned long v)
{
	unsigned long flags = lf_save_fl();

	lf_irq_disable();
	lf_write_cr3(lf_read_cr3() + v);
	if (linkfix_backend_is(model))
		lf_test_counter++;
	lf_restore_fl(flags);
	lf_irq_enable();
	lf_safe_halt();
	lf_halt();
}
"""

USES_S = r"""
#include <linux/linkage.h>
#include <asm/frame.h>
#include "linkfix_asm.h"
SYM_FUNC_START(lf_test_asm)
	FRAME_BEGIN
	LINKFIX_irq_disable
	LINKFIX_save_fl rax
	LINKFIX_read_cr2 rax
	FRAME_END
	RET
SYM_FUNC_END(lf_test_asm)
"""

FREESTANDING_USES_C = USES_C.replace("lf_", "").replace("linkfix_backend_is(model)",
                                                         "linkfix_backend_is(native)")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _ok(cmd: list[str], cwd: Path) -> None:
    r = _run(cmd, cwd)
    assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stderr}"


def _freestanding_spec(tmp: Path) -> Path:
    """The same ops in the freestanding profile (what linkfix 0.1 generated)."""
    text = SPEC.read_text()
    for line in ('profile = "linux"\n', 'prefix = "lf_"\n',
                 'call_constraint = "ASM_CALL_CONSTRAINT"\n', "noinstr = true\n"):
        text = text.replace(line, "")
    spec = tmp / "freestanding.toml"
    spec.write_text(text)
    return spec


def build(tmp: Path, spec: Path, uses_c: str, config: str, with_asm: bool = True
          ) -> tuple[list[OpModel], list[Path]]:
    """gen-stubs, then every object compiled with the build directory's flags."""
    cflags, aflags = linuxtree.flags(linuxtree.build_dir(config))
    _spec, models, files = generate(str(spec))
    out = tmp / "out"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    (tmp / "uses.c").write_text(uses_c)
    (tmp / "uses_s.S").write_text(USES_S)
    (tmp / "stubs.S").write_text(linuxtree.THUNK_STUBS_S)
    objs = []
    for src, flags in ((tmp / "uses.c", cflags), (out / "linkfix_ops.c", cflags),
                       (out / "linkfix_boot.c", cflags), (out / "linkfix_thunks.S", aflags),
                       *([(tmp / "uses_s.S", aflags)] if with_asm else [])):
        obj = tmp / (src.stem + ".o")
        werror = ["-Werror"] if src.suffix == ".c" else []
        _ok(["gcc", *flags, *werror, f"-I{out}", "-c", str(src), "-o", str(obj)], tmp)
        objs.append(obj)
    return models, objs


def objtool_b(tmp: Path, objs: list[Path]) -> tuple[subprocess.CompletedProcess[str], Path]:
    """ld -r with the retpoline stand-ins, then objtool as on vmlinux.o in config B."""
    _ok(["gcc", *linuxtree.flags(linuxtree.build_dir("B"))[1], "-c", "stubs.S", "-o",
         "stubs.o"], tmp)
    linked = tmp / "linked.o"
    _ok(["ld", "-m", "elf_x86_64", "-r", "-o", str(linked), *map(str, objs), "stubs.o"], tmp)
    return _run([str(linuxtree.objtool()), *linuxtree.OBJTOOL_B, str(linked)], tmp), linked


@pytest.fixture(scope="module")
def config_b(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("linux-b")
    models, objs = build(tmp, SPEC, USES_C, "B")
    proc, linked = objtool_b(tmp, objs)
    return models, objs, proc, linked, tmp


def test_objtool_config_b_reports_nothing(config_b) -> None:  # type: ignore[no-untyped-def]
    proc = config_b[2]
    assert proc.returncode == 0 and proc.stdout + proc.stderr == ""


def test_objtool_sees_every_alternative(config_b) -> None:  # type: ignore[no-untyped-def]
    """The alt_instr records of the kernel-compiled object, read back from its bytes."""
    models = {m.op.index: m for m in config_b[0]}
    got = altcheck.read(config_b[1][0])  # uses.o
    per_site: dict[tuple[str, int], int] = {}
    for a in got.alts:
        assert a.cpuid == 0x8075 and a.instrlen == a.replacementlen
        assert altcheck.nop_runs(a.copy) == []
        per_site[a.site] = per_site.get(a.site, 0) + 1
    for place, (op, _len) in got.sites.items():
        assert per_site[place] == sum(1 for a in models[op].alts[1:] if a.present)
        assert place in got.noendbr
    assert len(got.sites) == 12 and len(got.branches) == 1


def test_objtool_whole_kernel_same_warnings(config_b, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """vmlinux.o of the config B build directory, linked as Kbuild links it, with and
    without the objects: objtool's warnings are the same."""
    build_dir = linuxtree.build_dir("B")
    if not (build_dir / "vmlinux.a").is_file():
        pytest.skip(f"{build_dir} has no vmlinux.a (not built)")
    _models, objs, _proc, _linked, _tmp = config_b
    out = {}
    for name, extra in (("without", []), ("with", [str(o) for o in objs])):
        vmlinux_o = tmp_path / f"vmlinux-{name}.o"
        _ok(["ld", "-m", "elf_x86_64", "-z", "noexecstack", "-r", "-o", str(vmlinux_o),
             "--whole-archive", "vmlinux.a", "--no-whole-archive", *extra], build_dir)
        r = _run([str(linuxtree.objtool()), *linuxtree.OBJTOOL_B, str(vmlinux_o)], tmp_path)
        out[name] = (r.stdout + r.stderr).replace(str(vmlinux_o), "vmlinux.o")
    assert out["with"] == out["without"]


def _orc(linked: Path, tmp: Path) -> dict[tuple[str, int], str]:
    """objtool --dump=orc: (section, offset) -> "sp:sp+16 bp:(und) ..."."""
    r = _run([str(linuxtree.objtool()), "--dump=orc", str(linked)], tmp)
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        m = re.match(r"(\S+)\+([0-9a-f]+): (.*)", line)
        if m:
            out[(m.group(1), int(m.group(2), 16))] = m.group(3)
    return out


def _sp(entry: str) -> int:
    m = re.match(r"sp:sp\+(\d+)", entry)
    assert m, entry
    return int(m.group(1))


def test_orc_inside_pushf_sites(config_b) -> None:  # type: ignore[no-untyped-def]
    """At the `pop` of every patched `pushf; pop %rax` the ORC table (made before the
    patch, from the alternatives) has the stack 8 bytes deeper than at the site."""
    models, _objs, _proc, linked, tmp = config_b
    orc = _orc(linked, tmp)
    save_fl = next(m for m in models if m.op.name == "save_fl")
    native = save_fl.alts[save_fl.stack_alt]
    pop_at = decode(X86_64, native.code)[1].address
    got = altcheck.read(linked)
    sites = [p for p, (op, _n) in got.sites.items() if op == save_fl.op.index]
    assert len(sites) == 3
    for sec, off in sites:
        before = max(k for k in orc if k[0] == sec and k[1] <= off)
        assert _sp(orc[(sec, off + pop_at)]) == _sp(orc[before]) + 8
        after = max(k for k in orc if k[0] == sec and k[1] <= off + save_fl.site_len)
        assert _sp(orc[after]) == _sp(orc[before])


def test_freestanding_profile_draws_the_trial_warnings(tmp_path: Path) -> None:
    """The control: linkfix 0.1's output (the freestanding profile) in the same build."""
    spec = _freestanding_spec(tmp_path)
    _models, objs = build(tmp_path, spec, FREESTANDING_USES_C.replace("noinstr ", ""), "B",
                          with_asm=False)
    proc, _linked = objtool_b(tmp_path, objs)
    out = proc.stdout + proc.stderr
    for kind in ("data relocation to !ENDBR", "'naked' return found in RETHUNK build",
                 "indirect call found in RETPOLINE build"):
        assert kind in out, out


@pytest.fixture(scope="module")
def config_c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("linux-c")


def _objtool_c(tmp: Path, objs: list[Path]) -> str:
    out = ""
    for obj in objs:
        r = _run([str(linuxtree.objtool()), *linuxtree.OBJTOOL_C, str(obj)], tmp)
        out += r.stdout + r.stderr
    return out


def test_objtool_config_c_reports_nothing(config_c: Path) -> None:
    _models, objs = build(config_c, SPEC, USES_C, "C")
    assert _objtool_c(config_c, objs) == ""


def test_config_c_without_call_constraint(tmp_path: Path) -> None:
    """The control: sites without ASM_CALL_CONSTRAINT in a frame-pointer build."""
    spec = tmp_path / "nocc.toml"
    spec.write_text(SPEC.read_text().replace('call_constraint = "ASM_CALL_CONSTRAINT"\n', ""))
    _models, objs = build(tmp_path, spec, USES_C, "C", with_asm=False)
    assert "call without frame pointer save/setup" in _objtool_c(tmp_path, objs[:1])


# -- the linked image: patch, verify, and the ORC table after the patch ----------------------

IMAGE_LDS = """
#include "linkfix.lds.h"
ENTRY(lf_test_plain)
SECTIONS
{
	. = 0xffffffff81000000;
	.text : { *(.text .text.*) *(.noinstr.text) *(.text..__x86.*) }
	.altinstr_replacement : { *(.altinstr_replacement) }
	.rodata : { *(.rodata .rodata.*) }
	.orc_unwind_ip : { KEEP(*(.orc_unwind_ip)) }
	.orc_unwind : { KEEP(*(.orc_unwind)) }
	.altinstructions : { *(.altinstructions) }
	LINKFIX_TABLES
	.data : { *(.data .data.*) }
	.bss : { *(.bss .bss.*) *(COMMON) }
	/DISCARD/ : { *(.discard) *(.discard.*) *(.note.GNU-stack) }
}
"""
def _link_and_patch(linked: Path, tmp_path: Path, target: str) -> Path:
    """vmlinux from an objtool-processed object (LINKFIX_TABLES from ldscripts/), then
    `linkfix patch --target` and `verify`."""
    (tmp_path / "image.lds.S").write_text(IMAGE_LDS)
    _ok(["cpp", "-P", "-D__ASSEMBLY__", "-DLINKER_SCRIPT", f"-I{ROOT / 'ldscripts'}",
         "image.lds.S", "-o", "image.lds"], tmp_path)
    vmlinux = tmp_path / "vmlinux"
    if not vmlinux.exists():
        _ok(["ld", "-m", "elf_x86_64", "--emit-relocs", "-T", "image.lds", "-o",
             str(vmlinux), str(linked)], tmp_path)
    dest = tmp_path / f"vmlinux.{target}"
    for argv in (["patch", str(vmlinux), "-o", str(dest), "--target", target],
                 ["verify", str(dest), "--target", target]):
        r = subprocess.run([sys.executable, "-m", "linkfix", *argv], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, r.stderr
    return dest


def test_patched_image_orc_describes_every_site(config_b, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """vmlinux from the objtool-processed object, patched for each target: `verify`
    agrees, and at every instruction of every site the ORC entry in force has the
    stack as deep as the site's own pushes make it (tests/tools/orccheck.py)."""
    linked = config_b[3]
    for target in ("native", "model", "generic"):
        sites, n, problems = orccheck.check(str(_link_and_patch(linked, tmp_path, target)))
        assert problems == [] and sites == 12 + 3 + 1 and n > sites, target  # op + branch


def test_orc_control_freestanding_profile(tmp_path: Path) -> None:
    """The control: without the alternatives (freestanding profile) every patched
    `pushf; pop %rax` has a stale ORC entry at its `pop`, as in the trial."""
    spec = _freestanding_spec(tmp_path)
    models, objs = build(tmp_path, spec, FREESTANDING_USES_C.replace("noinstr ", ""), "B",
                         with_asm=False)
    _proc, linked = objtool_b(tmp_path, objs)
    _sites, _n, problems = orccheck.check(str(_link_and_patch(linked, tmp_path, "native")))
    save_fl = next(m for m in models if m.op.name == "save_fl")
    pop_at = decode(X86_64, save_fl.alts[1].code)[1].address
    assert len(problems) == 2 and all(p.insn == p.site + pop_at for p in problems)
