"""Spec validation: every class of bad spec is one line, names file/op/field, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from linkfix.errors import BadInput
from linkfix.stubgen.spec import loads

SPECS = Path(__file__).resolve().parents[1] / "specs"
ROOT = Path(__file__).resolve().parents[2]

HEAD = """
[linkfix]
arch = "x86_64"
backends = ["native", "xen", "lguest"]
"""

OK_OP = """
[ops.irq_disable.bodies]
native = "cli"
xen = "call xen_irq_disable"
"""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "linkfix", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT)


def gen(tmp_path: Path, text: str) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    out = tmp_path / "out"
    return run_cli("gen-stubs", str(spec), "-o", str(out)), spec, out


# (name, spec text, expected message after "linkfix: <spec>: ")
BAD = [
    ("toml-syntax", HEAD + "[ops.x]\nargs = [unsigned long]\n",
     "TOML syntax error: Invalid value (at line 6, column 9)"),
    ("unknown-op-field", HEAD + OK_OP + "[ops.save_fl]\nreturn = \"unsigned long\"\n"
     "[ops.save_fl.bodies]\nnative = \"pushf; pop %rax\"\n",
     "op 'save_fl': field 'return': unknown field (expected one of: args, returns, clobbers, "
     "bodies, calls, site_budget, noinstr)"),
    ("unknown-linkfix-field", HEAD.replace("[linkfix]", "[linkfix]\nbackend = \"x\"") + OK_OP,
     "field 'linkfix.backend': unknown field (expected one of: arch, backends, "
     "default_backend, includes, site_budget, profile, prefix, call_constraint)"),
    ("site-budget-small", HEAD + "[ops.irq_disable]\nsite_budget = 4\n" + OK_OP,
     "op 'irq_disable': field 'site_budget': must be a whole number of bytes from 5 to 255"),
    ("site-budget-type", HEAD.replace("[linkfix]", "[linkfix]\nsite_budget = \"8\"") + OK_OP,
     "field 'linkfix.site_budget': must be a whole number of bytes from 5 to 255"),
    ("duplicate-op", HEAD + "[ops.save_fl]\nreturns = \"unsigned long\"\n" + OK_OP
     + "[ops.save_fl]\nclobbers = []\n",
     "op 'save_fl': declared twice (second [ops.save_fl] table at line 11)"),
    ("duplicate-bodies", HEAD + OK_OP + "[ops.irq_disable.bodies]\nlguest = \"cli\"\n",
     "op 'irq_disable': field 'bodies': declared twice (second [ops.irq_disable.bodies] table "
     "at line 9)"),
    ("unknown-backend", HEAD + OK_OP + "vmi = \"cli\"\n",
     "op 'irq_disable': field 'bodies.vmi': unknown backend 'vmi' (backends: native, xen, "
     "lguest)"),
    ("does-not-assemble", HEAD + "[ops.irq_disable.bodies]\nnative = \"cli\"\n"
     "lguest = \"movl $0, lguest_irq_enabled(%rip\"\n",
     "op 'irq_disable': backend 'lguest': body does not assemble for x86_64: "
     "unbalanced parenthesis in operand 2"),
    ("no-such-instruction", HEAD + "[ops.irq_disable.bodies]\nnative = \"clix\"\n",
     "op 'irq_disable': backend 'native': body does not assemble for x86_64: "
     "no such instruction: `clix'"),
    ("writes-undeclared", HEAD + "[ops.save_fl.bodies]\nnative = \"pushf; pop %rcx\"\n",
     "op 'save_fl': backend 'native': offset 1: 'popq %rcx' (59): writes %rcx, "
     "not the op's return register or a declared clobber"),
    ("writes-return-of-void-op", HEAD + "[ops.read_cr3.bodies]\nnative = \"mov %cr3, %rax\"\n",
     "op 'read_cr3': backend 'native': offset 0: 'movq %cr3, %rax' (0f20d8): "
     "writes %rax, not the op's return register or a declared clobber"),
    ("writes-implicitly", HEAD + "[ops.cpuid]\nreturns = \"unsigned int\"\n"
     "[ops.cpuid.bodies]\nnative = \"cpuid\"\n",
     "op 'cpuid': backend 'native': offset 0: 'cpuid' (0fa2): writes %rbx, %rcx, "
     "%rdx, not the op's return register or a declared clobber"),
    ("too-many-args", HEAD + "[ops.f]\nargs = [\"long a\", \"long b\", \"long c\", \"long d\", "
     "\"long e\"]\n[ops.f.bodies]\nnative = \"nop\"\n",
     "op 'f': field 'args': too many arguments: 5 given, x86_64 passes at most 4 in "
     "registers (rdi, rsi, rdx, rcx)"),
    ("too-many-args-i386", HEAD.replace("x86_64", "i386") + "[ops.f]\nargs = [\"long a\", "
     "\"long b\", \"long c\", \"long d\"]\n[ops.f.bodies]\nnative = \"nop\"\n",
     "op 'f': field 'args': too many arguments: 4 given, i386 passes at most 3 in registers "
     "(eax, edx, ecx)"),
    ("bad-arch", HEAD.replace("x86_64", "arm64") + OK_OP,
     "field 'linkfix.arch': unknown arch 'arm64' (expected one of: x86_64, i386)"),
    ("bad-arg-type", HEAD + "[ops.f]\nargs = [\"double x\"]\n[ops.f.bodies]\nnative = \"nop\"\n",
     "op 'f': field 'args': 'double x': type 'double' cannot be passed in a register "
     "(integer types such as 'unsigned long' or pointers only; typedef names only behind '*')"),
    ("bad-return-type", HEAD + "[ops.f]\nreturns = \"struct pt_regs\"\n[ops.f.bodies]\n"
     "native = \"nop\"\n",
     "op 'f': field 'returns': 'struct pt_regs': type 'struct pt_regs' cannot be passed in a "
     "register (integer types such as 'unsigned long' or pointers only; typedef names only "
     "behind '*')"),
    ("wide-return-i386", HEAD.replace("x86_64", "i386") + "[ops.f]\n"
     "returns = \"unsigned long long\"\n[ops.f.bodies]\nnative = \"nop\"\n",
     "op 'f': field 'returns': 'unsigned long long': type 'unsigned long long' is wider than "
     "a i386 register"),
    ("bad-clobber", HEAD + "[ops.f]\nclobbers = [\"xmm0\"]\n[ops.f.bodies]\nnative = \"nop\"\n",
     "op 'f': field 'clobbers': 'xmm0' is not a x86_64 general-purpose register (rax, rbx, "
     "rcx, rdx, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15)"),
    ("i386-body-uses-64-bit-reg", HEAD.replace("x86_64", "i386")
     + "[ops.w]\nargs = [\"unsigned long v\"]\n[ops.w.bodies]\nnative = \"mov %rdi, %cr3\"\n",
     "op 'w': backend 'native': body does not assemble for i386: bad register name `%rdi'"),
    ("named-label", HEAD + "[ops.f.bodies]\nnative = \"nop; out: nop\"\n",
     "op 'f': backend 'native': named label 'out:' would be defined once per site; use "
     "numeric local labels (1: ... jz 1b/1f)"),
    ("dangling-local-label", HEAD + "[ops.f.bodies]\nnative = \"jz 1f; nop\"\n",
     "op 'f': backend 'native': local label '1f' has no '1:' after it in the body"),
    ("no-bodies", HEAD + "[ops.f]\nargs = []\n",
     "op 'f': field 'bodies': missing: give at least one backend's body"),
    ("default-backend", HEAD.replace("[linkfix]", "[linkfix]\ndefault_backend = \"vmi\"")
     + OK_OP,
     "field 'linkfix.default_backend': 'vmi' is not one of the backends (native, xen, lguest)"),
]


@pytest.mark.parametrize("text,message", [(t, m) for _, t, m in BAD], ids=[n for n, _, _ in BAD])
def test_bad_spec_is_one_line_exit_2(tmp_path: Path, text: str, message: str) -> None:
    proc, spec, out = gen(tmp_path, text)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == f"linkfix: {spec}: {message}\n"
    assert not out.exists(), "no output may be created for a bad spec"


def test_missing_spec_file(tmp_path: Path) -> None:
    proc = run_cli("gen-stubs", str(tmp_path / "nope.toml"), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr == f"linkfix: {tmp_path / 'nope.toml'}: spec file not found\n"
    assert not (tmp_path / "out").exists()


def test_output_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("x")
    proc = run_cli("gen-stubs", str(SPECS / "x86_64.toml"), "-o", str(target))
    assert proc.returncode == 2
    assert proc.stderr == f"linkfix: {target}: output exists and is not a directory\n"


def test_bad_spec_leaves_existing_output_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ok = run_cli("gen-stubs", str(SPECS / "x86_64.toml"), "-o", str(out), "-q")
    assert ok.returncode == 0, ok.stderr
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    proc, _, _ = gen(tmp_path, HEAD + "[ops.f.bodies]\nnative = \"frob\"\n")
    assert proc.returncode == 2
    bad = run_cli("gen-stubs", str(tmp_path / "spec.toml"), "-o", str(out))
    assert bad.returncode == 2
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert after == before


# ---------------------------------------------------------------- in-process


def test_fixture_spec_loads() -> None:
    spec = loads((SPECS / "x86_64.toml").read_bytes(), "x86_64.toml")
    assert spec.arch.name == "x86_64"
    assert spec.backends == ("native", "xen", "lguest")
    assert [op.name for op in spec.ops][:3] == ["irq_disable", "irq_enable", "save_fl"]
    set_pte = next(op for op in spec.ops if op.name == "set_pte")
    assert [(a.ctype, a.name) for a in set_pte.args] == [("unsigned long *", "ptep"),
                                                       ("unsigned long", "val")]
    assert set_pte.clobbers == ("rcx",)
    assert next(op for op in spec.ops if op.name == "save_fl").returns == "unsigned long"


def test_spec_hash_ignores_layout_but_not_content() -> None:
    a = loads(HEAD + OK_OP, "a")
    b = loads("# comment\n" + HEAD.replace(" = ", "=") + OK_OP, "b")
    c = loads(HEAD + OK_OP.replace("cli", "cli; nop"), "c")
    assert a.spec_hash() == b.spec_hash()
    assert a.spec_hash() != c.spec_hash()


@pytest.mark.parametrize("decl,ctype", [
    ("pte_t *ptep", "pte_t *"),
    ("pte_t*ptep", "pte_t *"),
    ("const struct page * p", "const struct page *"),
    ("unsigned   long  v", "unsigned long"),
    ("void **pp", "void **"),
    ("char c", "char"),
])
def test_arg_types_normalised(decl: str, ctype: str) -> None:
    spec = loads(HEAD + f'[ops.f]\nargs = ["{decl}"]\n[ops.f.bodies]\nnative = "nop"\n', "s")
    assert spec.ops[0].args[0].ctype == ctype


@pytest.mark.parametrize("decl", ["float x", "long", "u64 x", "struct s x", "int x[4]",
                                  "void v", "unsigned long if"])
def test_bad_arg_declarations(decl: str) -> None:
    with pytest.raises(BadInput) as exc:
        loads(HEAD + f'[ops.f]\nargs = ["{decl}"]\n[ops.f.bodies]\nnative = "nop"\n', "s")
    assert exc.value.message.startswith("op 'f': field 'args': ")


@pytest.mark.parametrize("snippet,message", [
    ('backends = ["native", "Native"]', "backend 'Native' listed twice"),
    ('backends = ["generic"]', "'generic' is reserved"),
    ('backends = []', "must be a non-empty list"),
    ('backends = ["x-y"]', "is not a C identifier"),
])
def test_bad_backends(snippet: str, message: str) -> None:
    text = HEAD.replace('backends = ["native", "xen", "lguest"]', snippet)
    with pytest.raises(BadInput) as exc:
        loads(text + '[ops.f.bodies]\n', "s")
    assert exc.value.message.startswith("field 'linkfix.backends': ")
    assert message in exc.value.message


def test_reserved_and_conflicting_names() -> None:
    with pytest.raises(BadInput, match="reserved"):
        loads(HEAD + '[ops.linkfix_x.bodies]\nnative = "nop"\n', "s")
    with pytest.raises(BadInput, match="different signature"):
        loads(HEAD + '[ops.a]\nreturns = "long"\n[ops.a.bodies]\nxen = "call f"\n'
              '[ops.b.bodies]\nxen = "call f"\n', "s")
    with pytest.raises(BadInput, match="stack and frame pointers"):
        loads(HEAD + '[ops.a]\nclobbers = ["rsp"]\n[ops.a.bodies]\nxen = "nop"\n', "s")


@pytest.mark.parametrize("body,message", [
    ("call foo@PLT", "'call foo@PLT': only 'call <function>' is supported in a body"),
    ("call *%rax", "'call *%rax': an indirect call may clobber any register; call a named "
                   "function instead"),
    ("jmp elsewhere", "'jmp elsewhere': a jump may only target a local label of the body "
                      "(jz 1f); control must reach the end of the body"),
    ("pushf; ret", "'ret': a body runs inside its caller; it cannot return"),
    (".section .text", "directive '.section' is not allowed in a body (only .byte, .short, "
                       ".word, .long, .quad)"),
])
def test_bodies_that_cannot_live_in_a_site(tmp_path: Path, body: str, message: str) -> None:
    from linkfix.stubgen.genstubs import generate

    spec = tmp_path / "s.toml"
    spec.write_text(HEAD + f'[ops.f]\nreturns = "long"\n[ops.f.bodies]\nnative = "{body}"\n')
    with pytest.raises(BadInput) as exc:
        generate(str(spec))
    assert exc.value.message == f"op 'f': backend 'native': {message}"


def test_clobber_names_ignore_case_and_percent() -> None:
    text = HEAD + OK_OP + ('[ops.f]\nclobbers = ["%rcx", "RDX", "R8"]\n'
                           '[ops.f.bodies]\nnative = "nop"\n')
    spec = loads(text, "spec.toml")
    op = next(o for o in spec.ops if o.name == "f")
    assert op.clobbers == ("rcx", "rdx", "r8")
    with pytest.raises(BadInput, match="'%RCX' listed twice"):
        loads(HEAD + '[ops.f]\nclobbers = ["rcx", "%RCX"]\n[ops.f.bodies]\nnative = "nop"\n',
              "spec.toml")
