"""The spec's profile fields: what kind of program the generated files go into.

`[linkfix]` may name a `profile` ("freestanding", the default, or "linux"), a
`prefix` for the C functions of the ops and a `call_constraint`, an extra asm
output operand every site carries; `[ops.<op>]` may say `noinstr = true` (linux
only). This module validates them; kernelsite.py and kernelthunks.py render what
the linux profile changes. docs/SPEC.md ("Profiles") describes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from linkfix.arch import Arch
from linkfix.stubgen import cnames

FREESTANDING = "freestanding"
LINUX = "linux"
PROFILES = (FREESTANDING, LINUX)

# `"<constraint>" (<lvalue>)`: a constraint string without quotes or backslashes, then
# a parenthesised C expression (checked for balance and for what C would misread).
_OPERAND = re.compile(r'"([^"\\]+)"\s*\((.+)\)\Z')
_CONSTRAINT_CHARS = re.compile(r"[+=&%A-Za-z0-9,]+\Z")


@dataclass(frozen=True)
class Profile:
    name: str = FREESTANDING
    prefix: str = ""  # prepended to each op's C function: lf_ + irq_disable
    call_constraint: str | None = None  # extra asm output operand of every op site
    # gen-stubs --written BACKEND (written.py): not a spec field, so not in canonical()
    written: str | None = None

    @property
    def linux(self) -> bool:
        return self.name == LINUX

    def c_name(self, op: str) -> str:
        """The C function of op `op` in linkfix.h."""
        return self.prefix + op

    def canonical(self) -> dict[str, Any]:
        """Only what differs from the default, so older specs keep their spec hash."""
        out: dict[str, Any] = {}
        if self.name != FREESTANDING:
            out["profile"] = self.name
        if self.prefix:
            out["prefix"] = self.prefix
        if self.call_constraint is not None:
            out["call_constraint"] = self.call_constraint
        return out


def load(ck, head: dict[str, Any], arch: Arch) -> Profile:  # type: ignore[no-untyped-def]
    """The profile fields of `[linkfix]` (`ck`: spec._Checker, for one-line refusals)."""
    name = head.get("profile", FREESTANDING)
    if not isinstance(name, str) or name not in PROFILES:
        raise ck.fail(f"unknown profile {name!r} (expected one of: {', '.join(PROFILES)})",
                      fld="linkfix.profile")
    if name == LINUX and arch.name != "x86_64":
        raise ck.fail(f"profile 'linux' supports arch x86_64 only, not {arch.name}",
                      fld="linkfix.profile")
    return Profile(name=name, prefix=_prefix(ck, head.get("prefix", "")),
                   call_constraint=_constraint(ck, head.get("call_constraint")))


def _prefix(ck, value: Any) -> str:  # type: ignore[no-untyped-def]
    fld = "linkfix.prefix"
    if not isinstance(value, str):
        raise ck.fail("must be a string (the start of a C identifier, such as \"lf_\")",
                      fld=fld)
    if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ck.fail(f"'{value}' is not the start of a C identifier (letters, digits and "
                      f"'_', not starting with a digit)", fld=fld)
    if len(value) > 64:
        raise ck.fail("longer than 64 characters", fld=fld)
    return value


def _constraint(ck, value: Any) -> str | None:  # type: ignore[no-untyped-def]
    """An asm output operand pasted into every site's asm statement: a macro name
    (`ASM_CALL_CONSTRAINT`) or `"<constraint>" (<lvalue>)`."""
    fld = "linkfix.call_constraint"
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ck.fail("must be a non-empty string: a macro such as ASM_CALL_CONSTRAINT, or "
                      "an output operand such as '\"+r\" (current_stack_pointer)'", fld=fld)
    text = value.strip()
    if cnames.IDENT.match(text):
        # A macro of the program's headers (reserved spellings such as __X are fine).
        if text in cnames.C_KEYWORDS:
            raise ck.fail(f"'{text}' is a C keyword, not a macro", fld=fld)
        if cnames.own(text) or cnames.predefined(text):
            raise ck.fail(f"'{text}' is linkfix's or the compiler's name, not a macro of "
                          f"the program's headers", fld=fld)
        return text
    m = _OPERAND.match(text)
    if not m:
        raise ck.fail(f"'{text}' is neither a macro name nor an asm output operand "
                      f"'\"<constraint>\" (<lvalue>)'", fld=fld)
    constraint, expr = m.group(1), m.group(2)
    if not constraint.startswith(("=", "+")) or not _CONSTRAINT_CHARS.match(constraint):
        raise ck.fail(f"'{constraint}' is not an output constraint (it starts with '=' or "
                      f"'+': \"+r\")", fld=fld)
    problem = _expression_problem(expr)
    if problem is not None:
        raise ck.fail(f"'{text}': {problem}", fld=fld)
    return text


def _expression_problem(expr: str) -> str | None:
    """Why a C expression cannot be pasted into an asm operand list, or None."""
    if not expr.isprintable():
        return "the operand holds a control character"
    for bad in (";", "{", "}", '"', "'", "\\", "/*", "//", "#"):
        if bad in expr:
            return f"the operand's expression holds '{bad}'"
    depth = 0
    for c in expr:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            return "the operand's parentheses do not balance"
    if depth:
        return "the operand's parentheses do not balance"
    if _top_level_comma(expr):
        return "the operand's expression holds a ',' outside parentheses (two operands)"
    return None


def _top_level_comma(expr: str) -> bool:
    depth = 0
    for c in expr:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if c == "," and depth == 0:
            return True
    return False


def op_noinstr(ck, profile: Profile, op: str, value: Any) -> bool:  # type: ignore[no-untyped-def]
    """`[ops.<op>] noinstr`: the op's generated functions go into .noinstr.text."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ck.fail("must be true or false", op=op, fld="noinstr")
    if value and not profile.linux:
        raise ck.fail("only with profile = \"linux\" (it places the op's thunks in "
                      ".noinstr.text)", op=op, fld="noinstr")
    return value
