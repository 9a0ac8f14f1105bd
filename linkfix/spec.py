"""The op spec: load a TOML file and validate it into dataclasses.

Every problem is reported as one `BadInput` line naming the spec file, the op
and the field, so a kernel build stops with a message a person can act on.
The schema is documented in docs/SPEC.md.
"""

from __future__ import annotations

import json
import re
import tomllib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from linkfix.arch import ARCHES, Arch
from linkfix.errors import BadInput
from linkfix.fileio import read_regular
from linkfix.layout import branch_op_name

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

LINKFIX_FIELDS = ("arch", "backends", "default_backend", "includes")
OP_FIELDS = ("args", "returns", "clobbers", "bodies", "calls")

# C integer types passed by value, with their size in bytes (None: the word size).
# Named typedefs (u64, pteval_t, ...) are not accepted by value because their
# size cannot be checked here; pointers to any type are fine.
_SCALARS: dict[str, int | None] = {
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
_QUALIFIERS = ("const", "volatile")
_C_KEYWORDS = frozenset((
    # C89/C99
    "auto break case char const continue default do double else enum extern float for goto "
    "if inline int long register restrict return short signed sizeof static struct switch "
    "typedef union unsigned void volatile while _Bool _Complex _Imaginary "
    # C11/C17
    "_Alignas _Alignof _Atomic _Generic _Noreturn _Static_assert _Thread_local "
    # C23
    "alignas alignof bool constexpr false nullptr static_assert thread_local true typeof "
    "typeof_unqual _BitInt _Decimal32 _Decimal64 _Decimal128 "
    # GNU C (gcc and clang spellings), and identifiers the compiler predefines
    "asm __asm __asm__ __alignof __alignof__ __attribute __attribute__ __auto_type "
    "__builtin_offsetof __builtin_va_arg __builtin_types_compatible_p __builtin_choose_expr "
    "__builtin_has_attribute __builtin_convertvector __builtin_shufflevector __builtin_tgmath "
    "__builtin_complex __complex __complex__ __const __const__ __extension__ __imag __imag__ "
    "__inline __inline__ __int128 __int128_t __uint128_t __label__ __real __real__ "
    "__restrict __restrict__ __signed __signed__ __thread __typeof __typeof__ "
    "__typeof_unqual __typeof_unqual__ __volatile __volatile__ __float80 __float128 __ibm128 "
    "__fp16 __bf16 _Float16 _Float32 _Float32x _Float64 _Float64x _Float128 _Float128x "
    "_Decimal64x _Sat _Fract _Accum __seg_fs __seg_gs __func__ __FUNCTION__ "
    "__PRETTY_FUNCTION__ __has_include __has_include_next __has_attribute "
    "__has_c_attribute __has_builtin __has_feature __has_extension __VA_ARGS__ __VA_OPT__"
).split())
# Type keywords a spec's C types may use.
_TYPE_KEYWORDS = frozenset("void char short int long float double signed unsigned _Bool "
                           "const volatile struct union enum".split())
# Macros gcc and clang predefine for x86 (`gcc -dM -E`) that are not spelled __UPPER__:
# linkfix_thunks.S and linkfix_asm.h go through cpp and linkfix.h is C, so a name
# spelled like one would become `1` (`call linux` assembles as `call 1`).
_PREDEFINED_MACROS = frozenset(
    "linux unix i386 __linux __linux__ __gnu_linux__ __unix __unix__ __i386 __i386__ "
    "__i686 __i686__ __pentiumpro __pentiumpro__ __tune_i686__ __tune_pentiumpro__ "
    "__amd64 __amd64__ __x86_64 __x86_64__ __k8 __k8__ __tune_k8__ __code_model_small__ "
    "__code_model_32__ __pic__ __pie__ __clang__ __llvm__ __clang_major__ __clang_minor__ "
    "__clang_patchlevel__ __clang_version__ __clang_literal_encoding__ "
    "__clang_wide_literal_encoding__".split())
_PREDEFINED_UPPER = re.compile(r"__[A-Z][A-Za-z0-9_]*__\Z")  # __GNUC__, __FILE__, __INT8_FMTd__
# Prefixes of what linkfix generates: linkfix_* and LINKFIX* (API, macros), __lf_*
# (thunks, bodies, temporaries), __linkfix* (header and linker-script symbols).
_OWN_PREFIXES = ("linkfix_", "LINKFIX", "__lf_", "__linkfix")
# C macros linkfix.h and linkfix_ops.c define, without the LINKFIX_ prefix (besides
# LINKFIX_BACKEND_<name> and LINKFIX_BACKEND_<NAME> per backend).
_OWN_MACROS = ("H", "ASM_H", "SPEC_HASH", "N_OPS", "N_BACKENDS", "DEFAULT_BACKEND", "CALLEE",
               "BACKEND_GENERIC")
_GAS_HELPER = "_need"  # linkfix_asm.h's `.macro LINKFIX__need`
NAMES_MAX = 0xFFFF  # names_size in the image header is a u16


@dataclass(frozen=True)
class Arg:
    ctype: str  # as written, normalised spacing: "unsigned long", "pte_t *"
    name: str


@dataclass(frozen=True)
class Op:
    name: str
    index: int
    args: tuple[Arg, ...]
    returns: str | None  # C type, None for void
    clobbers: tuple[str, ...]  # declared extra registers, full-width names, spec order
    bodies: dict[str, str] = field(hash=False)  # backend -> body text as written
    # functions its inline bodies call, declared in the spec: name -> (returns, args)
    calls: dict[str, tuple[str | None, tuple[Arg, ...]]] = field(default_factory=dict,
                                                                 hash=False)

    def signature_key(self) -> tuple[str | None, tuple[str, ...]]:
        return self.returns, tuple(a.ctype for a in self.args)


@dataclass(frozen=True)
class Spec:
    path: str
    arch: Arch
    backends: tuple[str, ...]
    default_backend: str
    includes: tuple[str, ...]
    ops: tuple[Op, ...]

    def backend_index(self, name: str) -> int:
        """1-based index of a backend (0 is the generic alternative)."""
        return self.backends.index(name) + 1

    def canonical(self) -> dict[str, Any]:
        return {
            "arch": self.arch.name,
            "backends": list(self.backends),
            "default_backend": self.default_backend,
            "includes": list(self.includes),
            "ops": [
                {
                    "name": op.name,
                    "args": [f"{a.ctype} {a.name}" for a in op.args],
                    "returns": op.returns,
                    "clobbers": list(op.clobbers),
                    "bodies": {b: op.bodies[b] for b in self.backends if b in op.bodies},
                    **({"calls": {fn: [ret, [f"{a.ctype} {a.name}" for a in args]]
                                  for fn, (ret, args) in op.calls.items()}}
                       if op.calls else {}),
                }
                for op in self.ops
            ],
        }

    def spec_hash(self) -> int:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return zlib.crc32(text.encode())


class _Checker:
    """Raises BadInput for the spec at `path`, with op/field context."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, message: str, op: str | None = None, fld: str | None = None) -> BadInput:
        parts = []
        if op is not None:
            parts.append(f"op '{op}'")
        if fld is not None:
            parts.append(f"field '{fld}'")
        parts.append(message)
        return BadInput(self.path, ": ".join(parts))


def _predefined(name: str) -> bool:
    return name in _PREDEFINED_MACROS or bool(_PREDEFINED_UPPER.match(name))


def _own(name: str) -> bool:
    return name.startswith(_OWN_PREFIXES)


_OWN_NAMES = ("reserved for linkfix's generated code (names starting with linkfix_, LINKFIX, "
              "__lf_ or __linkfix)")


def _c_name_problem(name: str, macros: bool = True) -> str | None:
    """Why `name` cannot be an op, argument or backend name ("is ..."), or None.

    `macros`: also refuse predefined macro names (for names that appear as tokens
    of their own, not only pasted into longer ones)."""
    if not IDENT.match(name):
        return "is not a C identifier"
    if name in _C_KEYWORDS:
        return "is a C keyword (C11 to C23 or GNU C)"
    if _own(name):
        return f"is {_OWN_NAMES}"
    if name.startswith("__") or re.match(r"_[A-Z]", name):
        return ("is a reserved identifier (names starting with __, or with _ and a capital "
                "letter, belong to the compiler and the C library)")
    if macros and _predefined(name):
        return "is a macro gcc and clang predefine (the C preprocessor would replace it)"
    return None


def _callee_problem(name: str) -> str | None:
    """Why `name` cannot be the function of a `call` ("is ..."), or None.

    Callees are link symbols, so `__`-prefixed kernel functions are fine; refused
    are what the compiler or preprocessor owns and what linkfix generates (calling
    `__lf_dispatch_<op>` from a body would recurse forever).
    """
    if name.startswith("."):
        return "is a local label or section name (it starts with '.'), not a function"
    if name in _C_KEYWORDS:
        return "is a C keyword (C11 to C23 or GNU C)"
    if name.startswith("__builtin_"):
        return "is a compiler builtin, not a link symbol"
    if _own(name):
        return f"is {_OWN_NAMES}"
    if _predefined(name):
        return ("is a macro gcc and clang predefine (linkfix_thunks.S goes through the C "
                "preprocessor, which would replace it)")
    return None


_BODY_WORD = re.compile(r"(?<![%\w.$])[A-Za-z_][A-Za-z0-9_]*")


def _body_text_problem(text: str) -> str | None:
    """Why a body's text cannot be pasted into every generated file, or None.

    The same statements go into a C string (linkfix.h), a GAS macro (linkfix_asm.h,
    through cpp) and plain assembly (linkfix_thunks.S, through cpp); anything one of
    them would read differently from GNU as is refused. `#` comments are dropped
    before rendering, so only control characters are refused inside them.
    """
    for c in text:
        if c not in "\t\n" and not c.isprintable():
            return (f"body contains the character U+{ord(c):04X}: only printable "
                    f"characters, tab and newline may appear in a body")
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    for seq in ("/*", "*/", "//"):
        if seq in code:
            return (f"body contains '{seq}', C comment syntax: linkfix_thunks.S and "
                    f"linkfix_asm.h go through the C preprocessor; use '#' comments")
    if "\\" in code:
        return ("body contains a backslash: in linkfix_asm.h the body is inside a GAS "
                ".macro, where '\\' starts a macro argument")
    for c in "{}":
        if c in code:
            return (f"body contains '{c}': gcc and clang read braces in an asm template as "
                    f"assembler-dialect alternatives")
    for word in _BODY_WORD.findall(code):
        if _predefined(word):
            return (f"body uses '{word}', a macro gcc and clang predefine: "
                    f"linkfix_thunks.S and linkfix_asm.h go through the C preprocessor, "
                    f"which would replace it")
        if word.startswith("LINKFIX"):
            return (f"body uses '{word}': LINKFIX* names are linkfix's macros (in "
                    f"linkfix_asm.h, LINKFIX_<op> is another op's site)")
    return None


def load(path: str) -> Spec:
    """Read and validate the spec at `path`."""
    try:
        raw = read_regular(path)
    except FileNotFoundError:
        raise BadInput(path, "spec file not found") from None
    except IsADirectoryError:
        raise BadInput(path, "spec is a directory, not a file") from None
    except OSError as exc:
        raise BadInput(path, f"cannot read spec: {exc.strerror}") from None
    return loads(raw, path)


def loads(raw: bytes | str, path: str) -> Spec:
    """Validate spec text; `path` names it in errors."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(path, f"spec is not UTF-8 (byte {exc.start})") from None
    else:
        text = raw
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(path, str(exc)) from None
    return validate(data, path)


_DUP_TABLE = re.compile(r"Cannot declare \(([^)]*)\) twice \(at line (\d+)")


def _toml_error(path: str, message: str) -> BadInput:
    """Turn tomllib's message into one a spec author recognises."""
    dup = _DUP_TABLE.match(message)
    if dup:
        keys = [k.strip().strip("'\"") for k in dup.group(1).split(",") if k.strip()]
        line = dup.group(2)
        if len(keys) >= 2 and keys[0] == "ops":
            where = f"op '{keys[1]}': "
            if len(keys) > 2:
                where += f"field '{'.'.join(keys[2:])}': "
            return BadInput(path, f"{where}declared twice (second [{'.'.join(keys)}] "
                                  f"table at line {line})")
        return BadInput(path, f"table [{'.'.join(keys)}] declared twice (line {line})")
    if message.startswith("Cannot overwrite a value"):
        return BadInput(path, f"TOML syntax error: a key is given twice "
                              f"({message.split('(', 1)[-1].rstrip(')')})")
    return BadInput(path, f"TOML syntax error: {message}")


def validate(data: dict[str, Any], path: str) -> Spec:
    ck = _Checker(path)
    for key in data:
        if key not in ("linkfix", "ops"):
            raise ck.fail(f"unknown top-level table or key '{key}' (expected [linkfix] and "
                          f"[ops.<name>])")
    head = data.get("linkfix")
    if not isinstance(head, dict):
        raise ck.fail("missing [linkfix] table (arch, backends)")
    for key in head:
        if key not in LINKFIX_FIELDS:
            raise ck.fail(f"unknown field (expected one of: {', '.join(LINKFIX_FIELDS)})",
                          fld=f"linkfix.{key}")

    arch_name = head.get("arch")
    if arch_name is None:
        raise ck.fail("missing (x86_64 or i386)", fld="linkfix.arch")
    if not isinstance(arch_name, str) or arch_name not in ARCHES:
        raise ck.fail(f"unknown arch {arch_name!r} (expected one of: {', '.join(ARCHES)})",
                      fld="linkfix.arch")
    arch = ARCHES[arch_name]

    backends = _backends(ck, head.get("backends"))
    names_size = _backend_names_size(ck, backends)
    default = head.get("default_backend", backends[0])
    if not isinstance(default, str) or default not in backends:
        raise ck.fail(f"{default!r} is not one of the backends ({', '.join(backends)})",
                      fld="linkfix.default_backend")
    includes = head.get("includes", [])
    if not isinstance(includes, list) or not all(
        isinstance(i, str) and i and '"' not in i and i.isprintable() for i in includes
    ):
        raise ck.fail("must be a list of header names", fld="linkfix.includes")

    ops_table = data.get("ops")
    if ops_table is None or not isinstance(ops_table, dict) or not ops_table:
        raise ck.fail("no ops: add at least one [ops.<name>] table")
    if len(ops_table) + len(backends) > 0xFFFF:
        raise ck.fail("too many ops for the 16-bit op index")
    ops = tuple(
        _op(ck, arch, backends, name, body, index)
        for index, (name, body) in enumerate(ops_table.items())
    )
    _check_call_targets(ck, ops, backends)
    _check_declared_calls(ck, ops)
    _check_generated_names(ck, arch, ops, backends)
    _check_names_size(ck, ops, names_size)
    return Spec(path=path, arch=arch, backends=backends, default_backend=default,
                includes=tuple(includes), ops=ops)


def _backends(ck: _Checker, value: Any) -> tuple[str, ...]:
    fld = "linkfix.backends"
    if value is None:
        raise ck.fail("missing (a list of backend names)", fld=fld)
    if not isinstance(value, list) or not value:
        raise ck.fail("must be a non-empty list of backend names", fld=fld)
    if len(value) > 254:
        raise ck.fail("more than 254 backends", fld=fld)
    seen: set[str] = set()
    for b in value:
        if not isinstance(b, str) or not IDENT.match(b):
            raise ck.fail(f"backend name {b!r} is not a C identifier", fld=fld)
        # Backends reach C only pasted into longer names, but a C name is what they
        # look like (linkfix_backend_is(xen)): the same rules as for ops.
        problem = _c_name_problem(b, macros=False)
        if problem:
            raise ck.fail(f"backend '{b}' {problem}", fld=fld)
        if b.lower() == "generic":
            raise ck.fail("'generic' is reserved for the dispatch alternative", fld=fld)
        if b.lower() in seen:
            raise ck.fail(f"backend '{b}' listed twice (names are compared ignoring case)",
                          fld=fld)
        seen.add(b.lower())
    return tuple(value)


def _op(ck: _Checker, arch: Arch, backends: tuple[str, ...], name: str, table: Any,
        index: int) -> Op:
    problem = _c_name_problem(name)
    if problem:
        raise ck.fail(f"the op name {problem}", op=name)
    if not isinstance(table, dict):
        raise ck.fail("must be a table ([ops.<name>])", op=name)
    for key in table:
        if key not in OP_FIELDS:
            raise ck.fail(f"unknown field (expected one of: {', '.join(OP_FIELDS)})",
                          op=name, fld=key)

    args = _args(ck, arch, name, table.get("args", []))
    returns = table.get("returns")
    if returns is not None:
        if not isinstance(returns, str):
            raise ck.fail("must be a C type string", op=name, fld="returns")
        returns = _ctype(ck, arch, name, "returns", returns)
        if returns == "void":
            returns = None

    clobbers = _clobbers(ck, arch, name, table.get("clobbers", []))

    bodies = table.get("bodies")
    if bodies is None:
        raise ck.fail("missing: give at least one backend's body", op=name, fld="bodies")
    if not isinstance(bodies, dict):
        raise ck.fail("must be a table of backend = \"body\"", op=name, fld="bodies")
    for b, text in bodies.items():
        if b not in backends:
            raise ck.fail(f"unknown backend '{b}' (backends: {', '.join(backends)})",
                          op=name, fld=f"bodies.{b}")
        if not isinstance(text, str):
            raise ck.fail("body must be a string of AT&T assembly", op=name,
                          fld=f"bodies.{b}")
        problem = _body_text_problem(text)
        if problem:
            raise ck.fail(problem, op=name, fld=f"bodies.{b}")
    if not bodies:
        raise ck.fail("no body for any backend", op=name, fld="bodies")
    ordered = {b: bodies[b] for b in backends if b in bodies}
    calls = _calls(ck, arch, name, table.get("calls", {}), ordered)
    return Op(name=name, index=index, args=args, returns=returns, clobbers=clobbers,
              bodies=ordered, calls=calls)


def _calls(ck: _Checker, arch: Arch, op: str, value: Any, bodies: dict[str, str]
           ) -> dict[str, tuple[str | None, tuple[Arg, ...]]]:
    """`[ops.<op>.calls]`: `fn = "<return type> (<parameters>)"` for a function an
    inline body calls, so that linkfix.h can declare it (its arguments are what the
    body leaves in the argument registers: only its author knows them)."""
    if not isinstance(value, dict):
        raise ck.fail("must be a table of function = \"<return type> (<parameters>)\"",
                      op=op, fld="calls")
    called = {fn for text in bodies.values() for fn in _body_calls(text)[1]}
    out: dict[str, tuple[str | None, tuple[Arg, ...]]] = {}
    for fn, decl in value.items():
        where = f"calls.{fn}"
        if fn not in called:
            raise ck.fail("not a function an inline body of this op calls", op=op, fld=where)
        if not isinstance(decl, str):
            raise ck.fail("must be a string \"<return type> (<parameters>)\"", op=op,
                          fld=where)
        m = re.fullmatch(r"\s*([^()]*?)\s*\(([^()]*)\)\s*", decl)
        if not m or not m.group(1):
            raise ck.fail(f"'{decl}' is not \"<return type> (<parameters>)\"", op=op,
                          fld=where)
        ret = _ctype(ck, arch, op, where, m.group(1), whole=decl)
        params = m.group(2).strip()
        decls = [] if params in ("", "void") else [p.strip() for p in params.split(",")]
        out[fn] = (None if ret == "void" else ret, _args(ck, arch, op, decls, fld=where))
    return out


def _args(ck: _Checker, arch: Arch, op: str, value: Any, fld: str = "args"
          ) -> tuple[Arg, ...]:
    if not isinstance(value, list):
        raise ck.fail("must be a list of \"<C type> <name>\" strings", op=op, fld=fld)
    if len(value) > len(arch.arg_regs):
        raise ck.fail(f"too many arguments: {len(value)} given, {arch.name} passes at most "
                      f"{len(arch.arg_regs)} in registers ({', '.join(arch.arg_regs)})",
                      op=op, fld=fld)
    out: list[Arg] = []
    for decl in value:
        if not isinstance(decl, str):
            raise ck.fail(f"{decl!r} is not a \"<C type> <name>\" string", op=op, fld=fld)
        m = re.fullmatch(r"\s*(.*?[\s*])\s*([A-Za-z_][A-Za-z0-9_]*)\s*", decl)
        if not m or not m.group(1).strip():
            raise ck.fail(f"'{decl}' is not \"<C type> <name>\"", op=op, fld=fld)
        pname = m.group(2)
        problem = _c_name_problem(pname)
        if problem:
            raise ck.fail(f"'{decl}': parameter name '{pname}' {problem}", op=op,
                          fld=fld)
        if any(a.name == pname for a in out):
            raise ck.fail(f"parameter '{pname}' given twice", op=op, fld=fld)
        ctype = _ctype(ck, arch, op, fld, m.group(1), whole=decl)
        if ctype == "void":
            raise ck.fail(f"'{decl}': a parameter cannot be void", op=op, fld=fld)
        out.append(Arg(ctype=ctype, name=pname))
    return tuple(out)


def _ctype(ck: _Checker, arch: Arch, op: str, fld: str, text: str,
           whole: str | None = None) -> str:
    """Parse a C type and check that it travels in one general-purpose register.

    The result is rebuilt from checked tokens (identifiers, type keywords, `*`),
    so nothing unparsed reaches the generated C. For `fld` "returns", a qualifier
    on the value itself is refused too (`const int f(void)`: gcc -Wextra warns).
    """
    shown = whole if whole is not None else text

    def bad(message: str) -> BadInput:
        return ck.fail(f"'{shown}': {message}", op=op, fld=fld)

    spaced = re.sub(r"\s*\*\s*", " * ", text).split()
    if not spaced:
        raise bad("missing type")
    _check_type_tokens(bad, spaced)
    if "*" in spaced:
        first = spaced.index("*")
        base = [t for t in spaced[:first] if t not in _QUALIFIERS]
        if not base:
            raise bad("pointer to nothing")
        if any(t != "*" and t not in _QUALIFIERS for t in spaced[first:]):
            raise bad("not a plain pointer type")
        if base[0] in ("struct", "union", "enum"):
            if len(base) != 2:
                raise bad(f"malformed {base[0]} type")
        elif len(base) > 1 and " ".join(base) not in _SCALARS:
            raise bad(f"unknown type '{' '.join(base)}'")
        if fld == "returns" and spaced[-1] != "*":
            raise bad(f"'{spaced[-1]}' qualifies the returned pointer itself, which has no "
                      f"effect (gcc -Wextra warns); drop it")
        return _join_type(spaced)
    plain = [t for t in spaced if t not in _QUALIFIERS]
    name = " ".join(plain)
    if name == "void":
        return "void"
    if name not in _SCALARS:
        raise bad(f"type '{name}' cannot be passed in a register (integer types "
                  f"such as 'unsigned long' or pointers only; typedef names only behind '*')")
    size = _SCALARS[name] or arch.word
    if size > arch.word:
        raise bad(f"type '{name}' is wider than a {arch.name} register")
    if fld == "returns" and len(plain) != len(spaced):
        raise bad("a qualifier on a returned value has no effect (gcc -Wextra warns); "
                  "drop it")
    return _join_type(spaced)


def _check_type_tokens(bad: Callable[[str], BadInput], tokens: list[str]) -> None:
    """Each token of a type is `*`, a type keyword or a name the C output can use."""
    for i, tok in enumerate(tokens):
        if tok == "*":
            continue
        if not IDENT.match(tok):
            raise bad(f"'{tok}' is not part of a C type")
        if tok in _C_KEYWORDS and tok not in _TYPE_KEYWORDS:
            raise bad(f"'{tok}' is a C keyword that a spec type cannot use")
        if tok not in _C_KEYWORDS and (_own(tok) or _predefined(tok)):
            raise bad(f"'{tok}' cannot name a type: "
                      + ("it is a macro gcc and clang predefine" if _predefined(tok) else
                         "the name belongs to linkfix's generated code"))
        if tok in ("struct", "union", "enum"):
            tag = tokens[i + 1] if i + 1 < len(tokens) else "*"
            if tag == "*" or tag in _C_KEYWORDS:
                raise bad(f"malformed {tok} type ('{tok}' must be followed by a tag)")
    # One qualifier twice in one group (`const const int`): clang warns by default.
    group: list[str] = []
    for tok in [*tokens, "*"]:
        if tok == "*":
            group = []
        elif tok in _QUALIFIERS:
            if tok in group:
                raise bad(f"'{tok}' given twice")
            group.append(tok)


def _type_names(ctype: str) -> list[str]:
    """The typedef names a normalised type uses (`pte_t` in `const pte_t *`)."""
    tokens = ctype.replace("*", " ").split()
    return [t for i, t in enumerate(tokens) if t not in _C_KEYWORDS
            and not (i and tokens[i - 1] in ("struct", "union", "enum"))]


def _join_type(tokens: list[str]) -> str:
    out = ""
    for tok in tokens:
        if tok == "*":
            out = out.rstrip() + (" *" if not out.endswith("*") else "*")
        else:
            out += ("" if not out or out.endswith(" ") else " ") + tok
    return out.strip()


def _clobbers(ck: _Checker, arch: Arch, op: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ck.fail("must be a list of register names", op=op, fld="clobbers")
    stack_regs = (arch.gprs[6], arch.gprs[7])  # rbp/rsp, ebp/esp
    out: list[str] = []
    for reg in value:
        if not isinstance(reg, str):
            raise ck.fail(f"{reg!r} is not a register name", op=op, fld="clobbers")
        r = reg.removeprefix("%").lower()  # %rcx, rcx and RCX name one register
        if r in stack_regs:
            raise ck.fail(f"'{reg}': the stack and frame pointers cannot be clobbered",
                          op=op, fld="clobbers")
        if r not in arch.gprs:
            raise ck.fail(f"'{reg}' is not a {arch.name} general-purpose register "
                          f"({', '.join(g for g in arch.gprs if g not in stack_regs)})",
                          op=op, fld="clobbers")
        if r in out:
            raise ck.fail(f"'{reg}' listed twice", op=op, fld="clobbers")
        out.append(r)
    return tuple(out)


_CALL_BODY = re.compile(r"\s*call[lq]?\s+([A-Za-z_.][A-Za-z0-9_.$]*)\s*;?\s*\Z")


def whole_call_target(text: str) -> str | None:
    """The function of a body that is exactly one direct call, else None."""
    m = _CALL_BODY.match(text)
    return m.group(1) if m else None


def _body_calls(text: str) -> tuple[str | None, list[str]]:
    """(the function of a whole-call body or None, the functions an inline body calls)."""
    from linkfix.body import split_statements  # here: linkfix.body imports this module

    whole = whole_call_target(text)
    if whole is not None:
        return whole, []
    return None, [fn for st in split_statements(text) if (fn := whole_call_target(st))]


def _op_type_names(op: Op) -> set[str]:
    return {t for ctype in (op.returns or "", *(a.ctype for a in op.args))
            for t in _type_names(ctype)}


def _check_call_targets(ck: _Checker, ops: tuple[Op, ...], backends: tuple[str, ...]) -> None:
    """Every callee must be a usable link symbol; a C function named by whole-call
    bodies gets one prototype, so their signatures must agree."""
    seen: dict[str, Op] = {}
    op_names = {op.name for op in ops}
    type_names = {t for op in ops for t in _op_type_names(op)}
    for op in ops:
        for b, text in op.bodies.items():
            whole, inner = _body_calls(text)
            for fn in [whole] if whole else inner:
                problem = _callee_problem(fn)
                if problem is None and fn in op_names:
                    problem = "is an op (a site, not a function)"
                if problem is None and fn in type_names:
                    problem = "is a type name in the spec"
                if problem:
                    raise ck.fail(f"body calls '{fn}', which {problem}", op=op.name,
                                  fld=f"bodies.{b}")
            if whole is None:
                continue
            first = seen.setdefault(whole, op)
            if first.signature_key() != op.signature_key():
                raise ck.fail(
                    f"'{whole}' is also the body of op '{first.name}' with a different "
                    f"signature (its prototype would conflict)", op=op.name, fld=f"bodies.{b}")


def _check_declared_calls(ck: _Checker, ops: tuple[Op, ...]) -> None:
    """A function gets one prototype: a declared inner call must agree with every other
    declaration of it and with its whole-call ops' signature."""
    sig: dict[str, tuple[tuple[str | None, tuple[str, ...]], str]] = {}
    for op in ops:
        for text in op.bodies.values():
            fn = whole_call_target(text)
            if fn is not None:
                sig.setdefault(fn, (op.signature_key(), f"the body of op '{op.name}'"))
    for op in ops:
        for fn, (ret, args) in op.calls.items():
            mine = (ret, tuple(a.ctype for a in args))
            first = sig.setdefault(fn, (mine, f"op '{op.name}'"))
            if first[0] != mine:
                raise ck.fail(f"'{fn}' is declared with another signature by {first[1]} (its "
                              "prototype would conflict)", op=op.name, fld=f"calls.{fn}")


def _check_generated_names(ck: _Checker, arch: Arch, ops: tuple[Op, ...],
                           backends: tuple[str, ...]) -> None:
    """Names linkfix builds from spec names must not meet: C names against the spec's
    type names, GAS macros (case-insensitive) against each other and linkfix's
    macros, and the thunk and body symbols, which join names with '_'."""
    type_names = {t for op in ops for t in _op_type_names(op)}
    own_macros = {*_OWN_MACROS, *(f"BACKEND_{b}" for b in backends),
                  *(f"BACKEND_{b.upper()}" for b in backends)}
    macro_of: dict[str, str] = {_GAS_HELPER: "LINKFIX__need, linkfix_asm.h's helper"}
    for op in ops:
        if op.name in type_names:
            raise ck.fail("the op name is also a type name in the spec (the op's C function "
                          "would redeclare it)", op=op.name)
        if op.name in own_macros:
            raise ck.fail(f"its GAS macro LINKFIX_{op.name} would be spelled like one of "
                          f"linkfix's C macros", op=op.name)
        branch = {f"BACKEND_IS_{b.upper()}" for b in backends}
        if op.name.upper() in branch:
            raise ck.fail(f"its constant LINKFIX_OP_{op.name.upper()} would be spelled like "
                          "that of a branch pseudo-op backend_is(<backend>)", op=op.name)
        mine = f"LINKFIX_{op.name}, the GAS macro of op '{op.name}'"
        first = macro_of.setdefault(op.name.lower(), mine)
        if first != mine:
            raise ck.fail(f"its GAS macro LINKFIX_{op.name} is the same as {first} (GAS "
                          f"macro names ignore case)", op=op.name)
        for arg in op.args:
            if arg.name in _op_type_names(op):
                raise ck.fail(f"parameter '{arg.name}' is also a type name in this op's "
                              f"signature (C would read the type as the parameter)",
                              op=op.name, fld="args")
    _check_symbols(ck, arch, ops)


def _check_symbols(ck: _Checker, arch: Arch, ops: tuple[Op, ...]) -> None:
    """The thunk and body symbols the whole spec generates must be distinct: op `f`
    with backend `b_c` and op `f_b` with backend `c` both give `__lf_body_f_b_c`."""
    from linkfix.body import saved_regs  # here: linkfix.body imports this module

    # symbol -> (what it is, where it comes from); one thunk may serve several
    # bodies of one op that call the same function.
    owners: dict[str, tuple[tuple[str, ...], str]] = {}
    for op in ops:
        made: list[tuple[str, tuple[str, ...], str | None, str]] = [
            (f"__lf_dispatch_{op.name}", ("dispatch", op.name), None,
             f"op '{op.name}' (its dispatch thunk)")]
        thunks = bool(saved_regs(arch, op))  # no registers to save: direct calls, no thunks
        for b, text in op.bodies.items():
            whole, inner = _body_calls(text)
            where = f"op '{op.name}', backend '{b}'"
            if whole is not None:
                if thunks:
                    made.append((f"__lf_thunk_{op.name}_{b}", ("thunk", op.name, whole), b,
                                 where))
                continue
            made.append((f"__lf_body_{op.name}_{b}", ("body", op.name, b), b, where))
            if thunks:
                made += [(f"__lf_thunk_{op.name}_{fn}", ("thunk", op.name, fn), b,
                          f"{where} (its call to '{fn}')") for fn in inner]
        for sym, what, b, where in made:
            first = owners.setdefault(sym, (what, where))
            if first[0] != what:
                raise ck.fail(f"generated symbol '{sym}' is also generated for {first[1]} "
                              f"(linkfix joins op, backend and function names with '_'); "
                              f"rename one", op=op.name,
                              fld=f"bodies.{b}" if b is not None else None)


def _backend_names_size(ck: _Checker, backends: tuple[str, ...]) -> int:
    """Bytes the backends take in the image header's name table: each name and its
    `backend_is(<b>)` pseudo-op, NUL-terminated. The table's size field is a u16."""
    size = sum(len(b.encode()) + len(branch_op_name(b).encode()) + 2 for b in backends)
    if size > NAMES_MAX:
        raise ck.fail(f"backend names take {size} bytes in the image header's name table, "
                      f"more than its 16-bit size allows ({NAMES_MAX})", fld="linkfix.backends")
    return size


def _check_names_size(ck: _Checker, ops: tuple[Op, ...], size: int) -> None:
    """The op names join the backends' in the name table (`size` bytes so far)."""
    for op in ops:
        size += len(op.name.encode()) + 1
        if size > NAMES_MAX:
            raise ck.fail(f"with this op the names of backends and ops take {size} bytes in "
                          f"the image header's name table, more than its 16-bit size allows "
                          f"({NAMES_MAX})", op=op.name)
