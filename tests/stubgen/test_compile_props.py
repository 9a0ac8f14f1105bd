"""Whatever gen-stubs accepts compiles, assembles and links, with gcc and with clang.

Random specs (names near every rule: single letters, '_' inside, names close to
keywords, mixed case; random argument types from what spec.py accepts, results,
clobbers, and bodies from a pool of known-good ones) go through gen-stubs. A
refusal must be the one-line exit 2; an accepted spec must give files that build
freestanding (-O2 -ffreestanding -mno-red-zone -mgeneral-regs-only, -Wall -Wextra
-Werror) into an image linked with ldscripts/minimal.lds: a C file calling every
op and every `linkfix_backend_is`, a .S file using every GAS macro, the ops
tables and the thunks. With gcc (GNU as, GNU ld) and, when installed, clang (its
integrated assembler, ld.lld).

Also here: the site-length guards fire in both assemblers when a length is wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from linkfix import cli
from linkfix.arch import ARCHES
from linkfix.stubgen import opmodel, sitetext
from linkfix.stubgen.genstubs import generate

ROOT = Path(__file__).resolve().parents[2]
LINK_LDS = ROOT / "ldscripts" / "minimal.lds"
CLANG = shutil.which("clang")
LLD = shutil.which("ld.lld")
CFLAGS = ["-O2", "-ffreestanding", "-mno-red-zone", "-mgeneral-regs-only", "-fno-pic"]
WARN = ["-Wall", "-Wextra", "-Werror"]
MODE = {"x86_64": [], "i386": ["-m32"]}
LDEMU = {"x86_64": "elf_x86_64", "i386": "elf_i386"}

# ---------------------------------------------------------------- random specs

# Names near the rules. The test's own C names start with zz_, so generated names
# never do. One spec in four may also use names gen-stubs refuses (keywords,
# reserved, linkfix's own, a qualified result), which exercises the refusal path.
NEAR_NAMES = ["a", "h", "x", "_x", "a_b", "f_b", "b_c", "c", "typeof_", "asm1", "Int", "INT",
              "Return", "n_ops", "need", "_need_", "linux_", "unix2", "i386x", "mixedCase",
              "A", "Z9", "pte_t", "Foo", "foo", "x_y", "BACKEND", "_1", "a__b", "h_"]
BAD_NAMES = ["int", "typeof", "__x", "_X", "linkfix_x", "LINKFIXx", "linux", "generic",
             "N_OPS", "_need", "_Atomic", "__int128"]
OK_NAMES = st.one_of(st.sampled_from(NEAR_NAMES),
                     st.from_regex(r"[a-z][A-Za-z0-9_]{0,6}", fullmatch=True)).filter(
    lambda n: not n.lower().startswith("zz"))
ANY_NAMES = st.one_of(OK_NAMES, st.sampled_from(BAD_NAMES))

POINTERS = ["void *", "const char *", "unsigned long *", "struct page *", "union uu *",
            "pte_t *", "const pte_t *", "int * const", "const volatile void *", "char **",
            "float *", "_Bool *"]
SCALARS = ["_Bool", "char", "signed char", "unsigned char", "short", "unsigned short int",
           "int", "unsigned", "signed int", "long", "unsigned long", "long int",
           "const int", "volatile unsigned char", "unsigned const long"]
WIDE = ["long long", "unsigned long long"]  # x86_64 only (i386 refuses: wider than eax)
RETURNS = ["void", "int", "unsigned long", "_Bool", "char", "void *", "const char *",
           "pte_t *", "struct page *"]
BAD_RETURNS = ["const int", "char * const"]  # refused: the qualifier would be ignored

POOL = {
    "x86_64": ["cli", "sti", "nop", "", ".byte 0x90", "CALL", "nop; call zz_i0",
               "test %rdi, %rdi; jz 1f; call zz_i1; 1:", "movl $0, zz_var(%rip)",
               "movb $1, %gs:zz_pcpu", "test $1, %edi; jnz 1f; nop; 1:", "pushf; pop %rax"],
    "i386": ["cli", "sti", "nop", "", ".byte 0x90", "CALL", "nop; call zz_i0",
             "test %eax, %eax; jz 1f; call zz_i1; 1:", "movl $0, zz_var",
             "movb $1, %gs:zz_pcpu", "test $1, %eax; jnz 1f; nop; 1:", "pushf; pop %eax"],
}


@st.composite
def specs(draw: st.DrawFn, arch: str) -> str:
    a = ARCHES[arch]
    bad = draw(st.integers(0, 3)) == 0
    names = ANY_NAMES if bad else OK_NAMES
    backends = draw(st.lists(names, min_size=1, max_size=3, unique_by=str.lower))
    lines = ["[linkfix]", f'arch = "{arch}"', f"backends = {json.dumps(backends)}",
             f'default_backend = "{draw(st.sampled_from(backends))}"']
    free_regs = [r for r in a.gprs if r not in (a.gprs[6], a.gprs[7])]
    for i, op in enumerate(draw(st.lists(names, min_size=1, max_size=4, unique_by=str.lower))):
        lines.append(f'[ops."{op}"]')
        types = POINTERS + SCALARS + (WIDE if arch == "x86_64" else [])
        n_args = draw(st.integers(0, len(a.arg_regs)))
        arg_names = draw(st.lists(names, min_size=n_args, max_size=n_args, unique=True))
        args = [f"{draw(st.sampled_from(types))} {n}" for n in arg_names]
        lines.append(f"args = {json.dumps(args)}")
        ret = draw(st.sampled_from(RETURNS + (BAD_RETURNS if bad else [])))
        lines.append(f'returns = "{ret}"')
        clobbers = draw(st.one_of(
            st.lists(st.sampled_from(free_regs), max_size=3, unique=True),
            st.just(list(a.caller_saved))))  # nothing left to save: direct calls, no thunks
        lines.append(f"clobbers = {json.dumps(clobbers)}")
        lines.append(f'[ops."{op}".bodies]')
        writable = set(clobbers) | ({a.ret_reg} if ret != "void" else set())
        pool = [b for b in POOL[arch] if "pop %" not in b or b.split("%")[-1] in writable]
        for b in draw(st.lists(st.sampled_from(backends), min_size=1, unique=True)):
            body = draw(st.sampled_from(pool)).replace("CALL", f"call zz_w{i}")
            lines.append(f'"{b}" = "{body}"')
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- building the output

def _sh(cmd: list[str], cwd: Path, no_warnings: bool = False) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stderr}"
    if no_warnings:
        assert "warning" not in proc.stderr, f"{' '.join(cmd)}:\n{proc.stderr}"


def _params(op: dict) -> str:  # type: ignore[type-arg]
    decls = [f"{a['type']}{'' if a['type'].endswith('*') else ' '}{a['name']}"
             for a in op["args"]]
    return ", ".join(decls) or "void"


def uses_c(manifest: dict) -> str:  # type: ignore[type-arg]
    """A C file that calls every op and tests every backend, and defines what the
    bodies call and name."""
    out = ["struct page;", "union uu;"]
    types = [t for op in manifest["ops"] for t in (op["returns"] or "",
                                                   *(a["type"] for a in op["args"]))]
    if any("pte_t" in t.split() for t in types):  # declared only when used, as a kernel would
        out.append("typedef unsigned long pte_t;")
    out += ['#include "linkfix.h"', "volatile unsigned long zz_sink;",
            "unsigned int zz_var;", "unsigned char zz_pcpu;",
            "void zz_i0(void) {}", "void zz_i1(void) {}"]
    calls: list[str] = []
    for op in manifest["ops"]:
        ret = op["returns"] or "void"
        callees = {b["callee"] for b in op["bodies"].values() if "callee" in b}
        for fn in sorted(callees):
            unused = "".join(f" (void){a['name']};" for a in op["args"])
            result = "" if ret == "void" else " return 0;"
            out.append(f"{ret} LINKFIX_CALLEE {fn}({_params(op)}) {{{unused}{result} }}")
        args = ", ".join(f"({a['type']})zz_sink" for a in op["args"])
        call = f"{op['name']}({args})"
        calls.append(f"\t{call};" if ret == "void" else f"\tzz_sink += (unsigned long){call};")
    for b in manifest["backends"]:
        calls.append(f"\tif (linkfix_backend_is({b}))\n\t\tzz_sink++;")
    out += ["void zz_all(void)", "{", *calls, "}",
            "void _start(void)", "{", '\tlinkfix_boot_select("");', "\tzz_all();",
            "\tfor (;;)", "\t\t;", "}"]
    return "\n".join(out) + "\n"


def uses_s(manifest: dict) -> str:  # type: ignore[type-arg]
    """Every GAS macro, with every register but the stack and frame pointers free."""
    a = ARCHES[manifest["arch"]]
    free = ", ".join(r for r in a.gprs if r not in (a.gprs[6], a.gprs[7]))
    sites = [f"\tLINKFIX_{op['name']} {free}" for op in manifest["ops"]]
    return "\n".join(['#include "linkfix_asm.h"', "\t.text", "\t.globl zz_asm", "zz_asm:",
                      *sites, "\tret", '\t.section .note.GNU-stack,"",@progbits']) + "\n"


def build(out: Path, arch: str, cc: str) -> None:
    """Compile the generated files and the uses, link an image."""
    work = out / f"build-{cc}"
    work.mkdir()
    m = MODE[arch]
    _sh([cc, *m, *CFLAGS, *WARN, f"-I{out}", "-c", str(out / "uses.c"), "-o", "uses.o"], work)
    _sh([cc, *m, *CFLAGS, *WARN, "-c", str(out / "linkfix_ops.c"), "-o", "ops.o"], work)
    # GNU as and clang's integrated assembler: no warning either (an unused macro
    # parameter was one under clang).
    _sh([cc, *m, f"-I{out}", "-Wa,--fatal-warnings", "-c", str(out / "uses.S"), "-o",
         "uses_s.o"], work, no_warnings=True)
    _sh([cc, *m, "-c", str(out / "linkfix_thunks.S"), "-o", "thunks.o"], work, no_warnings=True)
    ld = "ld" if cc == "gcc" or not LLD else LLD
    _sh([ld, "-m", LDEMU[arch], "-L", str(out), "-T", str(LINK_LDS), "-o", "image",
         "uses.o", "ops.o", "uses_s.o", "thunks.o"], work)


def gen_stubs(spec: Path, out: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["gen-stubs", str(spec), "-o", str(out), "-q"])
    return rc, err.getvalue()


COMPILERS = ["gcc"] + (["clang"] if CLANG else [])


@pytest.mark.parametrize("arch", ["x86_64", "i386"])
def test_accepted_specs_compile(arch: str) -> None:
    @settings(max_examples=30, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(text=specs(arch))
    def check(text: str) -> None:
        with tempfile.TemporaryDirectory(prefix="lf-props-") as tmp:
            spec, out = Path(tmp) / "spec.toml", Path(tmp) / "out"
            spec.write_text(text)
            rc, err = gen_stubs(spec, out)
            if rc != 0:
                # A refusal is one line, exit 2, naming the spec; never an internal error.
                assert rc == 2, err
                assert err.startswith(f"linkfix: {spec}: ") and err.count("\n") == 1, err
                assert not out.exists()
                event("refused")
                return
            event("accepted")
            manifest = json.loads((out / "linkfix.json").read_text())
            (out / "uses.c").write_text(uses_c(manifest))
            (out / "uses.S").write_text(uses_s(manifest))
            for cc in COMPILERS:
                build(out, arch, cc)

    check()


# ---------------------------------------------------------------- the length guards

GUARD_SPEC = """[linkfix]
arch = "x86_64"
backends = ["native", "xen", "lguest"]
[ops.f]
args = ["long x"]
[ops.f.bodies]
native = "movl $1, zz_var(%rip)"
xen = "call zz_fn"
lguest = "movl $0, zz_var(%rip); test %rdi, %rdi; jz 1f; call zz_fn; 1:"
"""


def _model(tmp_path: Path) -> opmodel.OpModel:
    spec = tmp_path / "g.toml"
    spec.write_text(GUARD_SPEC)
    return generate(str(spec))[1][0]


def _assemble(m: opmodel.OpModel, work: Path, cc: str,
              inline: bool) -> subprocess.CompletedProcess[str]:
    """The site of `m` as inline asm in C (`%=` labels) or as a .s file (`1`)."""
    if inline:
        lines = sitetext.op_site_lines(m, "%=", sitetext.c_asm_escape)
        asm = "\n".join(f"\t\t{sitetext.c_string(line)}" for line in lines)
        (work / "g.c").write_text(f'void g(void)\n{{\n\t__asm__ __volatile__(\n{asm}\n'
                                  f'\t\t: : : "memory");\n}}\n')
        src = "g.c"
    else:
        (work / "g.s").write_text("\n".join(sitetext.op_site_lines(m, "1", lambda s: s)) + "\n")
        src = "g.s"
    return subprocess.run([cc, "-c", "-O2", src, "-o", "g.o"], cwd=work, capture_output=True,
                          text=True)


WRONG = {
    # the site holds more bytes than its records say
    "site-longer": lambda m: dataclasses.replace(m, site_len=m.site_len - 1),
    # the site holds fewer bytes than its records say
    "site-shorter": lambda m: dataclasses.replace(m, site_len=m.site_len + 1),
}


@pytest.mark.parametrize("inline", [True, False], ids=["c-inline-asm", "asm-file"])
@pytest.mark.parametrize("cc", COMPILERS)
def test_site_guards_fire_in_both_assemblers(tmp_path: Path, cc: str, inline: bool) -> None:
    m = _model(tmp_path)
    ok = _assemble(m, tmp_path, cc, inline)
    assert ok.returncode == 0, ok.stderr
    for name, wrong in WRONG.items():
        proc = _assemble(wrong(m), tmp_path, cc, inline)
        assert proc.returncode != 0, name
        if cc == "gcc":  # GNU as: the readable message
            expect = f"linkfix: site of op f is not {wrong(m).site_len} bytes"
            assert f"Error: {expect}" in proc.stderr, proc.stderr
        else:
            assert "invalid .org offset" in proc.stderr, proc.stderr


def test_guards_emit_no_bytes(tmp_path: Path) -> None:
    """gcc/GNU as and clang's integrated assembler give the same site and records."""
    if not CLANG:
        pytest.skip("clang is not installed")
    m = _model(tmp_path)
    dumps = []
    for cc in ("gcc", "clang"):
        assert _assemble(m, tmp_path, cc, inline=False).returncode == 0
        dumps.append(subprocess.run(
            ["objdump", "-s", "-j", ".text", "-j", ".linkfix.sites",
             "g.o"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
            .split("\n", 3)[3])
    assert dumps[0] == dumps[1]
    text = dumps[0].split("Contents of section .linkfix.sites")[0]
    site = bytes.fromhex("".join(line[6:41] for line in text.splitlines()[1:]))
    assert site == b"\xe8\0\0\0\0" + m.pad  # the call, its padding, nothing from the guards


@pytest.mark.parametrize("cc", COMPILERS)
@pytest.mark.parametrize("arch", ["x86_64", "i386"])
def test_fixture_specs_build_without_warnings(tmp_path: Path, arch: str, cc: str) -> None:
    """The test specs' bodies carry `$imm` operands (which clang's assembler once took
    for positional macro parameters) and ops with and without clobbers."""
    out = tmp_path / "out"
    rc, err = gen_stubs(ROOT / "tests" / "specs" / f"{arch}.toml", out)
    assert rc == 0, err
    manifest = json.loads((out / "linkfix.json").read_text())
    (out / "uses.S").write_text(uses_s(manifest))
    m = MODE[arch]
    _sh([cc, *m, f"-I{out}", "-Wa,--fatal-warnings", "-c", str(out / "uses.S"), "-o",
         str(tmp_path / "uses_s.o")], tmp_path, no_warnings=True)
    _sh([cc, *m, *CFLAGS, *WARN, "-c", str(out / "linkfix_ops.c"), "-o",
         str(tmp_path / "ops.o")], tmp_path, no_warnings=True)
