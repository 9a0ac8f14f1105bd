"""Names gen-stubs must refuse: each would make output that does not compile or link.

Every refusal is one line naming the op and the field, exit status 2, and no
output directory. The cases are the ones that used to pass gen-stubs: C and GNU
keywords, names linkfix generates, case-insensitive GAS macro names, symbols
that collide once joined with '_', callees that are not usable link symbols, and
body text one of the generated files would read differently.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from linkfix.cli import main

HEAD = '[linkfix]\narch = "x86_64"\nbackends = ["native", "xen"]\n'
NEED_NAMES = 65535  # names_size in the image header is a u16


def gen(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> tuple[int, str, Path]:
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    out = tmp_path / "out"
    rc = main(["gen-stubs", str(spec), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert not out.exists(), "no output may be created for a refused spec"
    return rc, err, spec


def refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str) -> None:
    rc, err, spec = gen(tmp_path, capsys, text)
    assert (rc, err) == (2, f"linkfix: {spec}: {message}\n")


def accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    rc = main(["gen-stubs", str(spec), "-o", str(tmp_path / "out"), "-q"])
    assert rc == 0, capsys.readouterr().err


KEYWORD = "is a C keyword (C11 to C23 or GNU C)"
OWN = ("is reserved for linkfix's generated code (names starting with linkfix_, LINKFIX, __lf_ "
       "or __linkfix)")
RESERVED = ("is a reserved identifier (names starting with __, or with _ and a capital letter, "
            "belong to the compiler and the C library)")


# ---------------------------------------------------------------- op and argument names

@pytest.mark.parametrize("name", ["typeof", "_Atomic", "__asm__", "__int128"])
def test_op_named_like_a_keyword(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 name: str) -> None:
    refused(tmp_path, capsys, HEAD + f'[ops.{name}.bodies]\nnative = "cli"\n',
            f"op '{name}': the op name {KEYWORD}")


@pytest.mark.parametrize("name", ["typeof", "_Atomic", "__asm__", "__int128"])
def test_argument_named_like_a_keyword(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       name: str) -> None:
    refused(tmp_path, capsys,
            HEAD + f'[ops.f]\nargs = ["long {name}"]\n[ops.f.bodies]\nnative = "cli"\n',
            f"op 'f': field 'args': 'long {name}': parameter name '{name}' {KEYWORD}")


@pytest.mark.parametrize("name,problem", [
    ("__put", RESERVED), ("_Put", RESERVED), ("linkfix_put", OWN), ("LINKFIXput", OWN),
    ("linux", "is a macro gcc and clang predefine (the C preprocessor would replace it)"),
])
def test_reserved_op_names(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
                           problem: str) -> None:
    refused(tmp_path, capsys, HEAD + f'[ops.{name}.bodies]\nnative = "cli"\n',
            f"op '{name}': the op name {problem}")


@pytest.mark.parametrize("name,problem", [("__lf_a0", OWN), ("__x", RESERVED),
                                          ("LINKFIX_CALLEE", OWN), ("i386", "is a macro gcc "
                                          "and clang predefine (the C preprocessor would "
                                          "replace it)")])
def test_reserved_argument_names(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
                                 problem: str) -> None:
    refused(tmp_path, capsys,
            HEAD + f'[ops.f]\nargs = ["long {name}"]\n[ops.f.bodies]\nnative = "cli"\n',
            f"op 'f': field 'args': 'long {name}': parameter name '{name}' {problem}")


@pytest.mark.parametrize("name,problem", [("int", KEYWORD), ("__xen", RESERVED),
                                          ("_Xen", RESERVED), ("linkfix_xen", OWN)])
def test_reserved_backend_names(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
                                problem: str) -> None:
    text = HEAD.replace('"xen"', f'"{name}"') + '[ops.f.bodies]\nnative = "cli"\n'
    refused(tmp_path, capsys, text, f"field 'linkfix.backends': backend '{name}' {problem}")


def test_ops_differing_only_in_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(tmp_path, capsys,
            HEAD + '[ops.Foo.bodies]\nnative = "cli"\n[ops.foo.bodies]\nnative = "sti"\n',
            "op 'foo': its GAS macro LINKFIX_foo is the same as LINKFIX_Foo, the GAS macro of "
            "op 'Foo' (GAS macro names ignore case)")


@pytest.mark.parametrize("name", ["_need", "_nEEd"])
def test_op_named_like_the_gas_helper_macro(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            name: str) -> None:
    refused(tmp_path, capsys, HEAD + f'[ops.{name}.bodies]\nnative = "cli"\n',
            f"op '{name}': its GAS macro LINKFIX_{name} is the same as LINKFIX__need, "
            f"linkfix_asm.h's helper (GAS macro names ignore case)")


@pytest.mark.parametrize("name", ["N_OPS", "H", "CALLEE", "BACKEND_XEN", "BACKEND_xen"])
def test_op_named_like_a_linkfix_macro(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       name: str) -> None:
    refused(tmp_path, capsys, HEAD + f'[ops.{name}.bodies]\nnative = "cli"\n',
            f"op '{name}': its GAS macro LINKFIX_{name} would be spelled like one of "
            f"linkfix's C macros")


def test_op_named_like_a_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(tmp_path, capsys,
            HEAD + '[ops.g]\nargs = ["pte_t *p"]\n[ops.g.bodies]\nnative = "cli"\n'
            '[ops.pte_t.bodies]\nnative = "cli"\n',
            "op 'pte_t': the op name is also a type name in the spec (the op's C function "
            "would redeclare it)")


def test_parameter_named_like_a_type_of_its_op(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    refused(tmp_path, capsys,
            HEAD + '[ops.f]\nargs = ["unsigned long pte_t", "pte_t *p"]\n'
            '[ops.f.bodies]\nnative = "cli"\n',
            "op 'f': field 'args': parameter 'pte_t' is also a type name in this op's "
            "signature (C would read the type as the parameter)")


# ---------------------------------------------------------------- types

@pytest.mark.parametrize("fld,decl,message", [
    ("args", "struct int *p", "malformed struct type ('struct' must be followed by a tag)"),
    ("args", "struct const page *p",
     "malformed struct type ('struct' must be followed by a tag)"),
    ("args", "_Atomic long *p", "'_Atomic' is a C keyword that a spec type cannot use"),
    ("args", "typeof *p", "'typeof' is a C keyword that a spec type cannot use"),
    ("args", "const const int x", "'const' given twice"),
    ("args", "int * volatile volatile p", "'volatile' given twice"),
    ("args", "struct linkfix_backend *p",
     "'linkfix_backend' cannot name a type: the name belongs to linkfix's generated code"),
    ("args", "unix *p", "'unix' cannot name a type: it is a macro gcc and clang predefine"),
    ("returns", "const long", "a qualifier on a returned value has no effect (gcc -Wextra "
     "warns); drop it"),
    ("returns", "char * const", "'const' qualifies the returned pointer itself, which has no "
     "effect (gcc -Wextra warns); drop it"),
])
def test_types_are_parsed_not_pasted(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     fld: str, decl: str, message: str) -> None:
    value = f'args = ["{decl}"]' if fld == "args" else f'returns = "{decl}"'
    refused(tmp_path, capsys, HEAD + f'[ops.f]\n{value}\n[ops.f.bodies]\nnative = "nop"\n',
            f"op 'f': field '{fld}': '{decl}': {message}")


# ---------------------------------------------------------------- generated symbols

def test_thunks_that_collide_once_joined(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # op f + backend b_c and op f_b + backend c: both __lf_thunk_f_b_c
    text = ('[linkfix]\narch = "x86_64"\nbackends = ["b_c", "c"]\n'
            '[ops.f.bodies]\nb_c = "call fn1"\n[ops.f_b.bodies]\nc = "call fn2"\n')
    refused(tmp_path, capsys, text,
            "op 'f_b': field 'bodies.c': generated symbol '__lf_thunk_f_b_c' is also generated "
            "for op 'f', backend 'b_c' (linkfix joins op, backend and function names with "
            "'_'); rename one")


def test_bodies_that_collide_once_joined(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    text = ('[linkfix]\narch = "x86_64"\nbackends = ["b_c", "c"]\n'
            '[ops.f.bodies]\nb_c = "nop"\n[ops.f_b.bodies]\nc = "cli"\n')
    refused(tmp_path, capsys, text,
            "op 'f_b': field 'bodies.c': generated symbol '__lf_body_f_b_c' is also generated "
            "for op 'f', backend 'b_c' (linkfix joins op, backend and function names with "
            "'_'); rename one")


def test_inner_call_thunk_that_collides_with_another_ops_thunk(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = ('[linkfix]\narch = "x86_64"\nbackends = ["x", "c"]\n'
            '[ops.f.bodies]\nx = "nop; call b_c"\n[ops.f_b.bodies]\nc = "call g"\n')
    refused(tmp_path, capsys, text,
            "op 'f_b': field 'bodies.c': generated symbol '__lf_thunk_f_b_c' is also generated "
            "for op 'f', backend 'x' (its call to 'b_c') (linkfix joins op, backend and "
            "function names with '_'); rename one")


def test_no_thunks_no_collision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An op that clobbers every caller-saved register calls its functions directly:
    # no thunk symbols, nothing to collide.
    every = '["rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"]'
    accepted(tmp_path, capsys,
             '[linkfix]\narch = "x86_64"\nbackends = ["b_c", "c"]\n'
             f'[ops.f]\nclobbers = {every}\n[ops.f.bodies]\nb_c = "call fn1"\n'
             f'[ops.f_b]\nclobbers = {every}\n[ops.f_b.bodies]\nc = "call fn2"\n')


# ---------------------------------------------------------------- callees

CALLEES = [
    ("int", KEYWORD),
    ("return", KEYWORD),
    ("linkfix_select_backend", OWN),
    ("__lf_dispatch_f", OWN),  # the op's own dispatch: infinite recursion
    ("__linkfix_sites_start", OWN),
    (".Lfoo", "is a local label or section name (it starts with '.'), not a function"),
    ("__builtin_trap", "is a compiler builtin, not a link symbol"),
    ("f", "is an op (a site, not a function)"),
]


@pytest.mark.parametrize("callee,problem", CALLEES)
@pytest.mark.parametrize("form", ["call {}", "nop; call {}"], ids=["whole", "inline"])
def test_callees_must_be_usable_link_symbols(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             callee: str, problem: str, form: str) -> None:
    body = form.format(callee)
    refused(tmp_path, capsys, HEAD + f'[ops.f.bodies]\nxen = "{body}"\n',
            f"op 'f': field 'bodies.xen': body calls '{callee}', which {problem}")


def test_callee_named_like_a_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(tmp_path, capsys,
            HEAD + '[ops.f]\nargs = ["pte_t *p"]\n[ops.f.bodies]\nxen = "call pte_t"\n',
            "op 'f': field 'bodies.xen': body calls 'pte_t', which is a type name in the spec")


def test_kernel_style_callees_are_fine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Callees are link symbols: __-prefixed kernel functions are allowed.
    accepted(tmp_path, capsys, HEAD + '[ops.f.bodies]\nxen = "call __xen_irq_disable"\n'
             'native = "nop; call __fentry__"\n')


# ---------------------------------------------------------------- body text

PREPROCESSED = "linkfix_thunks.S and linkfix_asm.h go through the C preprocessor"


@pytest.mark.parametrize("body,message", [
    ("nop\\u0000", "body contains the character U+0000: only printable characters, tab and "
                   "newline may appear in a body"),
    ("nop\\u001b", "body contains the character U+001B: only printable characters, tab and "
                   "newline may appear in a body"),
    ("nop\\r\\nnop", "body contains the character U+000D: only printable characters, tab and "
                     "newline may appear in a body"),
    ("nop /* unterminated", f"body contains '/*', C comment syntax: {PREPROCESSED}; use '#' "
                            f"comments"),
    ("nop */", f"body contains '*/', C comment syntax: {PREPROCESSED}; use '#' comments"),
    ("nop \\\\ nop", "body contains a backslash: in linkfix_asm.h the body is inside a GAS "
                     ".macro, where '\\' starts a macro argument"),
    ("mov $1, %eax{x}", "body contains '{': gcc and clang read braces in an asm template as "
                        "assembler-dialect alternatives"),
    ("movl $0, linux(%rip)", f"body uses 'linux', a macro gcc and clang predefine: "
                             f"{PREPROCESSED}, which would replace it"),
    ("nop; LINKFIX_g", "body uses 'LINKFIX_g': LINKFIX* names are linkfix's macros (in "
                       "linkfix_asm.h, LINKFIX_<op> is another op's site)"),
], ids=["nul", "escape", "cr", "open-comment", "close-comment", "backslash", "brace",
        "predefined-macro", "linkfix-macro"])
def test_body_text(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str,
                   message: str) -> None:
    refused(tmp_path, capsys, HEAD + f'[ops.f.bodies]\nnative = "{body}"\n',
            f"op 'f': field 'bodies.native': {message}")


def test_comments_may_say_anything_printable(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # '#' comments never reach the generated files.
    accepted(tmp_path, capsys,
             HEAD + '[ops.f.bodies]\nnative = """\ncli  # /* {x} \\\\ linux */\n"""\n')


# ---------------------------------------------------------------- the image header

def test_name_table_overflowing_the_header(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # 'native' + 'backend_is(native)' = 26 bytes with their NULs; each op below 201.
    ops = "".join(f'[ops.{"o" * 197}{i:03d}.bodies]\nnative = "nop"\n' for i in range(400))
    text = '[linkfix]\narch = "x86_64"\nbackends = ["native"]\n' + ops
    n = (NEED_NAMES - 26) // 201 + 1  # the op that crosses the limit
    refused(tmp_path, capsys, text,
            f"op '{'o' * 197}{n - 1:03d}': with this op the names of backends and ops take "
            f"{26 + 201 * n} bytes in the image header's name table, more than its 16-bit size "
            f"allows ({NEED_NAMES})")


def test_backend_names_overflowing_the_header(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    backends = ", ".join(f'"b{"x" * 250}{i:03d}"' for i in range(200))
    text = f'[linkfix]\narch = "x86_64"\nbackends = [{backends}]\n[ops.f.bodies]\n'
    size = 200 * (2 * 254 + len("backend_is()") + 2)
    refused(tmp_path, capsys, text,
            f"field 'linkfix.backends': backend names take {size} bytes in the image header's "
            f"name table, more than its 16-bit size allows ({NEED_NAMES})")


# ---------------------------------------------------------------- still fine

def test_names_near_the_rules_are_accepted(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Lower-case '_x', single letters, names containing keywords, and an op whose
    # GAS macro only differs in case from a C macro (cpp is case-sensitive).
    accepted(tmp_path, capsys,
             '[linkfix]\narch = "x86_64"\nbackends = ["Native", "x_y", "linux"]\n'
             '[ops._x.bodies]\nNative = "cli"\n'
             '[ops.h]\nargs = ["long int_", "struct typeof_ *_p"]\n[ops.h.bodies]\n'
             'x_y = "call typeof_fn"\n'
             '[ops.n_ops]\nreturns = "const char *"\n[ops.n_ops.bodies]\nlinux = "nop"\n')
