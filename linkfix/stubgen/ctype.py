"""C types in a spec: parsed into tokens, checked, and rebuilt, never pasted.

An argument or result travels in one general-purpose register, so a type by
value must be a C integer type no wider than the register; any plain pointer is
fine. The text that reaches the generated C is rebuilt from checked tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from linkfix.arch import Arch
from linkfix.errors import BadInput
from linkfix.stubgen import cnames
from linkfix.stubgen.cnames import IDENT

# C integer types passed by value, with their size in bytes (None: the word size).
# Named typedefs (u64, pteval_t, ...) are not accepted by value because their
# size cannot be checked here; pointers to any type are fine.
SCALARS: dict[str, int | None] = {
    "_Bool": 1,
    "char": 1, "signed char": 1, "unsigned char": 1,
    "short": 2, "short int": 2, "signed short": 2, "signed short int": 2,
    "unsigned short": 2, "unsigned short int": 2,
    "int": 4, "signed": 4, "signed int": 4, "unsigned": 4, "unsigned int": 4,
    "long": None, "long int": None, "signed long": None, "signed long int": None,
    "unsigned long": None, "unsigned long int": None,
    "long long": 8, "long long int": 8, "signed long long": 8,
    "unsigned long long": 8, "unsigned long long int": 8,
}
QUALIFIERS = ("const", "volatile")



def parse(bad: Callable[[str], BadInput], arch: Arch, text: str, returned: bool = False
          ) -> str:
    """Parse a C type and check that it travels in one general-purpose register.

    `bad` builds the refusal. For a `returned` type, a qualifier on the value
    itself is refused too (`const int f(void)`: gcc -Wextra warns).
    """
    spaced = re.sub(r"\s*\*\s*", " * ", text).split()
    if not spaced:
        raise bad("missing type")
    check_tokens(bad, spaced)
    if "*" in spaced:
        first = spaced.index("*")
        base = [t for t in spaced[:first] if t not in QUALIFIERS]
        if not base:
            raise bad("pointer to nothing")
        if any(t != "*" and t not in QUALIFIERS for t in spaced[first:]):
            raise bad("not a plain pointer type")
        if base[0] in ("struct", "union", "enum"):
            if len(base) != 2:
                raise bad(f"malformed {base[0]} type")
        elif len(base) > 1 and " ".join(base) not in SCALARS:
            raise bad(f"unknown type '{' '.join(base)}'")
        if returned and spaced[-1] != "*":
            raise bad(f"'{spaced[-1]}' qualifies the returned pointer itself, which has no "
                      f"effect (gcc -Wextra warns); drop it")
        return join(spaced)
    plain = [t for t in spaced if t not in QUALIFIERS]
    name = " ".join(plain)
    if name == "void":
        return "void"
    if name not in SCALARS:
        raise bad(f"type '{name}' cannot be passed in a register (integer types "
                  f"such as 'unsigned long' or pointers only; typedef names only behind '*')")
    size = SCALARS[name] or arch.word
    if size > arch.word:
        raise bad(f"type '{name}' is wider than a {arch.name} register")
    if returned and len(plain) != len(spaced):
        raise bad("a qualifier on a returned value has no effect (gcc -Wextra warns); "
                  "drop it")
    return join(spaced)


def check_tokens(bad: Callable[[str], BadInput], tokens: list[str]) -> None:
    """Each token of a type is `*`, a type keyword or a name the C output can use."""
    for i, tok in enumerate(tokens):
        if tok == "*":
            continue
        if not IDENT.match(tok):
            raise bad(f"'{tok}' is not part of a C type")
        if tok in cnames.C_KEYWORDS and tok not in cnames.TYPE_KEYWORDS:
            raise bad(f"'{tok}' is a C keyword that a spec type cannot use")
        if tok not in cnames.C_KEYWORDS and (cnames.own(tok) or cnames.predefined(tok)):
            raise bad(f"'{tok}' cannot name a type: "
                      + ("it is a macro gcc and clang predefine" if cnames.predefined(tok) else
                         "the name belongs to linkfix's generated code"))
        if tok in ("struct", "union", "enum"):
            tag = tokens[i + 1] if i + 1 < len(tokens) else "*"
            if tag == "*" or tag in cnames.C_KEYWORDS:
                raise bad(f"malformed {tok} type ('{tok}' must be followed by a tag)")
    # One qualifier twice in one group (`const const int`): clang warns by default.
    group: list[str] = []
    for tok in [*tokens, "*"]:
        if tok == "*":
            group = []
        elif tok in QUALIFIERS:
            if tok in group:
                raise bad(f"'{tok}' given twice")
            group.append(tok)


def join(tokens: list[str]) -> str:
    out = ""
    for tok in tokens:
        if tok == "*":
            out = out.rstrip() + (" *" if not out.endswith("*") else "*")
        else:
            out += ("" if not out or out.endswith(" ") else " ") + tok
    return out.strip()
