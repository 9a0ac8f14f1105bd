"""The linux profile without a kernel tree: what its sites put in an object (alt_instr
records, their per-site copies, ANNOTATE_NOENDBR entries), read back from the bytes
and relocations gcc and GNU as produce; which bodies it moves out of line; what it
refuses. tests/stubgen/test_linux_objtool.py runs the real objtool on the same files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import altcheck
import pytest

from linkfix.errors import BadInput
from linkfix.stubgen import kernelsite
from linkfix.stubgen.genstubs import generate
from linkfix.stubgen.opmodel import OpModel

SPEC = Path(__file__).resolve().parents[1] / "specs" / "linux_x86_64.toml"

# What <asm/asm.h> gives the sites in a kernel build.
FAKE_ASM_H = """
register unsigned long current_stack_pointer asm("rsp");
#define ASM_CALL_CONSTRAINT "+r" (current_stack_pointer)
"""

USES_C = r"""
#include "linkfix.h"
int counter;
unsigned long f(unsigned long v)
{
	unsigned long fl = lf_save_fl();
	lf_irq_disable();
	lf_write_cr3(lf_read_cr3() + v);
	counter += lf_read_cr2() != 0;
	lf_restore_fl(fl);
	lf_irq_enable();
	lf_safe_halt();
	lf_halt();
	if (linkfix_backend_is(model))
		counter++;
	if (linkfix_backend_is(native))
		counter += 2;
	return fl;
}
"""

USES_S = r"""
#include "linkfix_asm.h"
	.text
	.globl g
g:
	LINKFIX_irq_disable
	LINKFIX_save_fl rax
	LINKFIX_read_cr2 rax
	ret
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[list[OpModel], dict[str, bytes], Path]:
    tmp = tmp_path_factory.mktemp("linux-sites")
    _spec, models, files = generate(str(SPEC))
    out = tmp / "out"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    (tmp / "asm").mkdir()
    (tmp / "asm" / "asm.h").write_text(FAKE_ASM_H)
    (tmp / "uses.c").write_text(USES_C)
    (tmp / "uses_s.S").write_text(USES_S)
    cc = ["gcc", "-O2", "-ffreestanding", "-mno-red-zone", "-fno-pic", "-Wall", "-Werror",
          f"-I{tmp}", f"-I{out}", "-c"]
    for src, obj in (("uses.c", "uses.o"), ("uses_s.S", "uses_s.o")):
        r = subprocess.run([*cc, src, "-o", obj], cwd=tmp, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return models, files, tmp


def _models(built) -> dict[int, OpModel]:  # type: ignore[no-untyped-def]
    return {m.op.index: m for m in built[0]}


@pytest.mark.parametrize("obj", ["uses.o", "uses_s.o"])
def test_alt_instr_records(built, obj: str) -> None:  # type: ignore[no-untyped-def]
    """Every site has one `struct alt_instr` (12 bytes, ALT_NOT(X86_FEATURE_ALWAYS), both
    lengths the site's) per distinct alternative with a body, pointing at a copy of
    exactly that alternative's site bytes; only a leading call carries a relocation;
    the alternative that moves the stack pointer comes last."""
    models = _models(built)
    got = altcheck.read(built[2] / obj)
    assert got.sites
    by_site: dict[tuple[str, int], list[altcheck.AltInstr]] = {}
    for a in got.alts:
        assert a.cpuid == 0x8075 == kernelsite.NEVER
        assert a.instrlen == a.replacementlen
        by_site.setdefault(a.site, []).append(a)
    for place, (op, site_len) in got.sites.items():
        m = models[op]
        alts = by_site.pop(place)
        want = {altcheck.masked(x.code, [(p, n) for p, n, _l in x.fields]): x
                for x in m.alts[1:] if x.present}
        assert len(alts) == len(want), m.op.name
        for a in alts:
            assert a.instrlen == site_len == m.site_len
            fields = [(r.offset, 4) for r in a.relocs]
            alt = want[altcheck.masked(a.copy, fields)]
            assert [(p, n) for p, n, _l in alt.fields] == fields
            for r in a.relocs:
                assert r.offset == 1 and a.copy[0] == 0xE8 and r.type == altcheck.R_X86_64_PLT32
                assert r.symbol + f"{r.addend:+d}" == alt.fields[0][2].expr
            assert altcheck.nop_runs(a.copy) == []
        if m.stack_alt:
            last = alts[-1]
            assert last.copy == m.alts[m.stack_alt].code  # pushf; pop %rax
        assert place in got.noendbr
    for place, (gen, yes, _op) in got.branches.items():
        alts = by_site.pop(place)
        assert [a.copy for a in alts] == [b"\xe9" + bytes(4), bytes.fromhex("0f1f440000")]
        (r,) = alts[0].relocs
        assert r.offset == 1 and r.type == altcheck.R_X86_64_PC32
        assert r.place is not None and (r.place[0], r.place[1] + 4) == yes
        assert {place, gen, yes} <= got.noendbr
    assert not by_site  # no record for anything but a site


def test_depths() -> None:
    """Bytes pushed at each reachable instruction of a copy, along its branches."""
    pushf_pop = bytes.fromhex("2e2e9c2e58")
    assert kernelsite.depths(pushf_pop) == {0: 0, 3: 8}
    # push %rax; test %edi,%edi; jz 1f; pop %rax; jmp 2f; 1: pop %rax; 2: (and a NOP)
    branchy = bytes.fromhex("5085ff740358eb01580f1f00")
    assert kernelsite.depths(branchy) == {0: 0, 1: 8, 3: 8, 5: 8, 6: 0, 8: 8, 9: 0}
    # a jump over INT3 padding: the INT3s are not reached
    assert kernelsite.depths(bytes.fromhex("fa" "eb03cccccc")) == {0: 0, 1: 0}


def test_no_nop_runs_in_any_copy(built) -> None:  # type: ignore[no-untyped-def]
    for m in built[0]:
        for a in m.alts:
            if a.present:
                assert altcheck.nop_runs(a.code) == [], (m.op.name, a.name)


def test_placements(built) -> None:  # type: ignore[no-untyped-def]
    """RIP-relative (and any relocated field but a leading call) runs out of line; the
    rest as the freestanding profile would place it."""
    how = {m.op.name: {a.name: a.how for a in m.alts} for m in built[0]}
    assert how["read_cr2"] == {"generic": "generic", "native": "inline", "model": "ool"}
    assert how["save_fl"] == {"generic": "generic", "native": "inline", "model": "call"}
    assert how["restore_fl"]["native"] == "inline"
    save_fl = next(m for m in built[0] if m.op.name == "save_fl")
    assert save_fl.stack_alt == 1


def test_kernel_style_thunks(built) -> None:  # type: ignore[no-untyped-def]
    s = built[1]["linkfix_thunks.S"].decode()
    for h in ("linux/linkage.h", "linux/objtool.h", "asm/frame.h", "asm/nospec-branch.h"):
        assert f"#include <{h}>" in s
    assert "\tret\n" not in s and "\tRET\n" in s
    assert "SYM_FUNC_START_NOALIGN(__lf_dispatch_read_cr3)" in s
    noinstr = s.index('.pushsection .noinstr.text, "ax"')
    assert s.index("SYM_FUNC_START_NOALIGN(__lf_dispatch_irq_disable)") > noinstr
    assert s.index("SYM_FUNC_START_NOALIGN(__lf_dispatch_read_cr3)") < noinstr
    # a noinstr op's dispatcher calls each backend's function directly
    disp = s[s.index("SYM_FUNC_START_NOALIGN(__lf_dispatch_save_fl)"):]
    disp = disp[:disp.index("SYM_FUNC_END")]
    assert "cmpb $2, linkfix_current_backend(%rip)" in disp
    assert "call __lf_body_save_fl_native" in disp and "call model_save_fl" in disp
    assert "CALL_NOSPEC" not in disp
    assert "\tCALL_NOSPEC rax\n" in s  # read_cr3, write_cr3, safe_halt, halt
    assert s.count("ANNOTATE_NOENDBR") == s.count("SYM_FUNC_START_NOALIGN(")
    assert b"LINKFIX_TABLES" in built[1]["linkfix.lds.h"]


HEAD = """
[linkfix]
arch = "x86_64"
backends = ["native", "model"]
profile = "linux"
"""


def gen(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    spec = tmp_path / "s.toml"
    spec.write_text(HEAD + text)
    return generate(str(spec))


def test_second_stack_moving_body_runs_out_of_line(tmp_path: Path) -> None:
    """objtool 6.1 describes one alternative's stack inside a site: the default
    backend's keeps the site, another that pushes runs out of line."""
    _s, models, _f = gen(tmp_path, '[ops.save_fl]\nreturns = "unsigned long"\n'
                         '[ops.save_fl.bodies]\nnative = "pushf; pop %rax"\n'
                         'model = "push %rcx; pop %rax"\n')
    (m,) = models
    assert [a.how for a in m.alts] == ["generic", "inline", "ool"]
    assert m.stack_alt == 1


def test_no_thunkless_calls(tmp_path: Path) -> None:
    """An op that clobbers every caller-saved register still calls through a thunk, so
    that every call target a table records is a generated function (kernelthunks.py)."""
    regs = '["rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"]'
    _s, models, files = gen(tmp_path, f'[ops.f]\nreturns = "long"\nclobbers = {regs}\n'
                            '[ops.f.bodies]\nnative = "xor %eax, %eax"\nmodel = "call mf"\n')
    assert models[0].saved == ()
    assert models[0].bodies["model"].statements == ("call __lf_thunk_f_model",)
    assert "SYM_FUNC_START_NOALIGN(__lf_thunk_f_model)" in files["linkfix_thunks.S"].decode()


REFUSED = [
    ("ool-impossible", '[ops.f]\n[ops.f.bodies]\nnative = "nop"\n'
     'model = "push %rcx; mov model_x(%rip), %rcx; mov %rcx, (%rsp); pop %rcx"\n',
     "op 'f': backend 'model': profile linux: its 4-byte relocated field at offset 4 is not "
     "the target of a call starting the body, the only relocation objtool accepts in an "
     "alternative, so the body must run out of line, and it cannot ('movq %rcx, (%rsp)' "
     "addresses the stack through the stack pointer)"),
    ("nop-run", '[ops.f]\n[ops.f.bodies]\nnative = "nop; nop; nop; nop; nop"\n',
     "op 'f': backend 'native': profile linux: the site holds two one-byte NOPs (0x90) at "
     "offset 0, which the kernel's optimize_nops() would rewrite at boot; use one longer "
     "NOP (nopw, nopl) in the body"),
    ("nop-run-padding", '[ops.f]\nsite_budget = 6\n[ops.f.bodies]\n'
     'native = "test %edi, %edi; jz 1f; nop; 1:"\nmodel = "test %edi, %edi; jz 1f; cli; 1:; cli"\n',
     "op 'f': backend 'native': profile linux: the site holds two one-byte NOPs (0x90) at "
     "offset 4, which the kernel's optimize_nops() would rewrite at boot; use one longer "
     "NOP (nopw, nopl) in the body"),
    ("stack-conflict", '[ops.f]\nreturns = "long"\n[ops.f.bodies]\nnative = "pushf; pop %rax"\n'
     'model = "xor %eax, %eax; cli"\n',
     "op 'f': profile linux: alternatives 'native' and 'model' both have an instruction at "
     "offset 3 of the site, where 'native' has pushed 8 bytes: one ORC entry cannot describe "
     "both; change one of the bodies (or the site length: site_budget)"),
    ("site-too-long", '[ops.f]\nreturns = "long"\nsite_budget = 255\n[ops.f.bodies]\n'
     'native = "' + "; ".join(["mov %cr2, %rax"] * 85) + '"\n',
     "op 'f': profile linux: its 255-byte site is longer than the kernel's alternatives "
     "allow (254 bytes, MAX_PATCH_LEN); lower site_budget"),
]


@pytest.mark.parametrize("text,message", [(t, m) for _, t, m in REFUSED],
                         ids=[n for n, _, _ in REFUSED])
def test_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(BadInput) as exc:
        gen(tmp_path, text)
    assert exc.value.message == message


def test_eight_outputs_and_the_cache(tmp_path: Path) -> None:
    """The linux profile writes linkfix.lds.h too; an unchanged re-run serves it from the
    cache like the rest."""
    import os
    import sys

    from linkfix.stubgen.gencache import CACHE_NAME
    from linkfix.stubgen.render import LINUX_OUTPUTS

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(root))
    runs = [subprocess.run([sys.executable, "-m", "linkfix", "gen-stubs", str(SPEC), "-o",
                            str(out)], capture_output=True, text=True, env=env)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    assert "8 of 8 files updated" in runs[0].stdout
    assert "0 of 8 files updated" in runs[1].stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([*LINUX_OUTPUTS, CACHE_NAME])
    assert (out / "linkfix.lds.h").read_bytes() == (root / "ldscripts" /
                                                     "linkfix.lds.h").read_bytes()
