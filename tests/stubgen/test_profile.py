"""The spec's profile fields: prefix, profile, call_constraint and noinstr, and what
they refuse (docs/SPEC.md, "Profiles")."""

from __future__ import annotations

from pathlib import Path

import pytest

from linkfix.errors import BadInput
from linkfix.stubgen.genstubs import generate
from linkfix.stubgen.spec import loads

HEAD = """
[linkfix]
arch = "x86_64"
backends = ["native", "model"]
"""

IRQ = """
[ops.irq_disable.bodies]
native = "cli"
model = "call model_irq_disable"
"""


def head(**fields: str) -> str:
    return HEAD + "".join(f"{k} = {v}\n" for k, v in fields.items())


def refused(text: str) -> str:
    with pytest.raises(BadInput) as exc:
        loads(text, "s.toml")
    return exc.value.message


BAD = [
    ("profile-unknown", head(profile='"kernel"') + IRQ,
     "field 'linkfix.profile': unknown profile 'kernel' (expected one of: freestanding, linux)"),
    ("profile-type", head(profile="1") + IRQ,
     "field 'linkfix.profile': unknown profile 1 (expected one of: freestanding, linux)"),
    ("profile-i386", head(profile='"linux"').replace("x86_64", "i386") + IRQ,
     "field 'linkfix.profile': profile 'linux' supports arch x86_64 only, not i386"),
    ("prefix-type", head(prefix="3") + IRQ,
     "field 'linkfix.prefix': must be a string (the start of a C identifier, such as \"lf_\")"),
    ("prefix-digit", head(prefix='"1x_"') + IRQ,
     "field 'linkfix.prefix': '1x_' is not the start of a C identifier (letters, digits and "
     "'_', not starting with a digit)"),
    ("prefix-dash", head(prefix='"lf-"') + IRQ,
     "field 'linkfix.prefix': 'lf-' is not the start of a C identifier (letters, digits and "
     "'_', not starting with a digit)"),
    ("prefix-makes-keyword", head(prefix='"in"') + "[ops.t.bodies]\nnative = \"nop\"\n",
     "op 't': its C function 'int' (prefix 'in') is a C keyword (C11 to C23 or GNU C)"),
    ("prefix-own", head(prefix='"linkfix_"') + IRQ,
     "op 'irq_disable': its C function 'linkfix_irq_disable' (prefix 'linkfix_') is reserved "
     "for linkfix's generated code (names starting with linkfix_, LINKFIX, __lf_ or "
     "__linkfix)"),
    ("prefix-reserved", head(prefix='"_"') + "[ops.Foo.bodies]\nnative = \"nop\"\n",
     "op 'Foo': its C function '_Foo' (prefix '_') is a reserved identifier (names starting "
     "with __, or with _ and a capital letter, belong to the compiler and the C library)"),
    ("prefix-predefined", head(prefix='"li"') + "[ops.nux.bodies]\nnative = \"nop\"\n",
     "op 'nux': its C function 'linux' (prefix 'li') is a macro gcc and clang predefine (the "
     "C preprocessor would replace it)"),
    ("prefix-meets-callee", head(prefix='"lf_"') + IRQ
     + "[ops.irq_enable.bodies]\nnative = \"sti\"\nmodel = \"call lf_irq_disable\"\n",
     "op 'irq_enable': field 'bodies.model': body calls 'lf_irq_disable', which is the C "
     "function of an op (prefix 'lf_')"),
    ("prefix-meets-type", head(prefix='"lf_"') + "[ops.t]\nargs = [\"lf_t *p\"]\n"
     "[ops.t.bodies]\nnative = \"nop\"\n",
     "op 't': its C function 'lf_t' is also a type name in the spec (the op's C function "
     "would redeclare it)"),
    ("constraint-type", head(call_constraint="1") + IRQ,
     "field 'linkfix.call_constraint': must be a non-empty string: a macro such as "
     "ASM_CALL_CONSTRAINT, or an output operand such as '\"+r\" (current_stack_pointer)'"),
    ("constraint-empty", head(call_constraint='" "') + IRQ,
     "field 'linkfix.call_constraint': must be a non-empty string: a macro such as "
     "ASM_CALL_CONSTRAINT, or an output operand such as '\"+r\" (current_stack_pointer)'"),
    ("constraint-keyword", head(call_constraint='"volatile"') + IRQ,
     "field 'linkfix.call_constraint': 'volatile' is a C keyword, not a macro"),
    ("constraint-own", head(call_constraint='"LINKFIX_CALLEE"') + IRQ,
     "field 'linkfix.call_constraint': 'LINKFIX_CALLEE' is linkfix's or the compiler's name, "
     "not a macro of the program's headers"),
    ("constraint-garbage", head(call_constraint='"+r sp"') + IRQ,
     "field 'linkfix.call_constraint': '+r sp' is neither a macro name nor an asm output "
     "operand '\"<constraint>\" (<lvalue>)'"),
    ("constraint-input", head(call_constraint="'\"r\" (sp)'") + IRQ,
     "field 'linkfix.call_constraint': 'r' is not an output constraint (it starts with '=' or "
     "'+': \"+r\")"),
    ("constraint-two-operands", head(call_constraint="'\"+r\" (a), \"=r\" (b)'") + IRQ,
     "field 'linkfix.call_constraint': '\"+r\" (a), \"=r\" (b)': the operand's expression "
     "holds '\"'"),
    ("constraint-comma", head(call_constraint="'\"+r\" (a, b)'") + IRQ,
     "field 'linkfix.call_constraint': '\"+r\" (a, b)': the operand's expression holds a ',' "
     "outside parentheses (two operands)"),
    ("constraint-semicolon", head(call_constraint="'\"+r\" (x); y'") + IRQ,
     "field 'linkfix.call_constraint': '\"+r\" (x); y' is neither a macro name nor an asm "
     "output operand '\"<constraint>\" (<lvalue>)'"),
    ("constraint-brace", head(call_constraint="'\"+r\" ({ x; })'") + IRQ,
     "field 'linkfix.call_constraint': '\"+r\" ({ x; })': the operand's expression holds ';'"),
    ("constraint-parens", head(call_constraint="'\"+r\" ((x)'") + IRQ,
     "field 'linkfix.call_constraint': '\"+r\" ((x)': the operand's parentheses do not "
     "balance"),
    ("noinstr-type", HEAD + "[ops.irq_disable]\nnoinstr = 1\n" + IRQ,
     "op 'irq_disable': field 'noinstr': must be true or false"),
    ("noinstr-freestanding", HEAD + "[ops.irq_disable]\nnoinstr = true\n" + IRQ,
     "op 'irq_disable': field 'noinstr': only with profile = \"linux\" (it places the op's "
     "thunks in .noinstr.text)"),
]


@pytest.mark.parametrize("text,message", [(t, m) for _, t, m in BAD], ids=[n for n, _, _ in BAD])
def test_profile_fields_refused(text: str, message: str) -> None:
    assert refused(text) == message


def test_defaults_keep_the_spec_hash() -> None:
    plain = loads(HEAD + IRQ, "a")
    explicit = loads(head(profile='"freestanding"', prefix='""') + IRQ, "b")
    assert plain.spec_hash() == explicit.spec_hash()
    assert plain.profile == explicit.profile and not plain.profile.linux
    others = [head(profile='"linux"'), head(prefix='"lf_"'),
              head(call_constraint='"ASM_CALL_CONSTRAINT"')]
    hashes = {loads(h + IRQ, "c").spec_hash() for h in others}
    assert len(hashes) == 3 and plain.spec_hash() not in hashes


def test_fields_are_read() -> None:
    spec = loads(head(profile='"linux"', prefix='"lf_"',
                      call_constraint="'\"+r\" (current_stack_pointer)'")
                 + "[ops.irq_disable]\nnoinstr = true\n" + IRQ, "s")
    assert spec.profile.linux and spec.profile.prefix == "lf_"
    assert spec.profile.call_constraint == '"+r" (current_stack_pointer)'
    assert spec.profile.c_name("irq_disable") == "lf_irq_disable"
    assert spec.ops[0].noinstr
    assert spec.canonical()["profile"] == "linux"


def test_prefix_renames_only_the_c_functions(tmp_path: Path) -> None:
    """The op's C function takes the prefix; the GAS macro, the op constants and the
    generated symbols (linkfix's own namespaces) do not."""
    spec = tmp_path / "s.toml"
    spec.write_text(head(prefix='"lf_"', call_constraint='"ASM_CALL_CONSTRAINT"') + IRQ)
    _, _, files = generate(str(spec))
    h = files["linkfix.h"].decode()
    assert "void lf_irq_disable(void)" in h and " irq_disable(void)" not in h
    assert "LINKFIX_OP_IRQ_DISABLE = 0," in h
    assert "call __lf_dispatch_irq_disable" in h
    assert ": ASM_CALL_CONSTRAINT\n" in h  # the only output operand of a void op
    assert ".macro LINKFIX_irq_disable" in files["linkfix_asm.h"].decode()
    assert "linkfix.lds.h" not in files  # the linux profile's fragment only
    assert b"altinstructions" not in files["linkfix.h"]
