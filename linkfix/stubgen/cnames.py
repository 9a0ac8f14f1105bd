"""Which names and body texts linkfix can paste into the C and assembly it generates.

Spec names become C functions, parameters, macros and link symbols; body text goes
into C strings, GAS macros and preprocessed assembly. These are the rules each of
them must pass: C keywords, reserved and predefined names, linkfix's own names,
and characters one of the consumers would read differently from GNU as.
"""

from __future__ import annotations

import re

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

C_KEYWORDS = frozenset((
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
TYPE_KEYWORDS = frozenset("void char short int long float double signed unsigned _Bool "
                           "const volatile struct union enum".split())
# Macros gcc and clang predefine for x86 (`gcc -dM -E`) that are not spelled __UPPER__:
# linkfix_thunks.S and linkfix_asm.h go through cpp and linkfix.h is C, so a name
# spelled like one would become `1` (`call linux` assembles as `call 1`).
PREDEFINED_MACROS = frozenset(
    "linux unix i386 __linux __linux__ __gnu_linux__ __unix __unix__ __i386 __i386__ "
    "__i686 __i686__ __pentiumpro __pentiumpro__ __tune_i686__ __tune_pentiumpro__ "
    "__amd64 __amd64__ __x86_64 __x86_64__ __k8 __k8__ __tune_k8__ __code_model_small__ "
    "__code_model_32__ __pic__ __pie__ __clang__ __llvm__ __clang_major__ __clang_minor__ "
    "__clang_patchlevel__ __clang_version__ __clang_literal_encoding__ "
    "__clang_wide_literal_encoding__".split())
PREDEFINED_UPPER = re.compile(r"__[A-Z][A-Za-z0-9_]*__\Z")  # __GNUC__, __FILE__, __INT8_FMTd__
# Prefixes of what linkfix generates: linkfix_* and LINKFIX* (API, macros), __lf_*
# (thunks, bodies, temporaries), __linkfix* (header and linker-script symbols).
OWN_PREFIXES = ("linkfix_", "LINKFIX", "__lf_", "__linkfix")
# C macros linkfix.h and linkfix_ops.c define, without the LINKFIX_ prefix (besides
# LINKFIX_BACKEND_<name> and LINKFIX_BACKEND_<NAME> per backend).
OWN_MACROS = ("H", "ASM_H", "SPEC_HASH", "N_OPS", "N_BACKENDS", "DEFAULT_BACKEND", "CALLEE",
               "BACKEND_GENERIC")
GAS_HELPER = "_need"  # linkfix_asm.h's `.macro LINKFIX__need`
def predefined(name: str) -> bool:
    return name in PREDEFINED_MACROS or bool(PREDEFINED_UPPER.match(name))


def own(name: str) -> bool:
    return name.startswith(OWN_PREFIXES)


OWN_NAMES = ("reserved for linkfix's generated code (names starting with linkfix_, LINKFIX, "
              "__lf_ or __linkfix)")


def c_name_problem(name: str, macros: bool = True) -> str | None:
    """Why `name` cannot be an op, argument or backend name ("is ..."), or None.

    `macros`: also refuse predefined macro names (for names that appear as tokens
    of their own, not only pasted into longer ones)."""
    if not IDENT.match(name):
        return "is not a C identifier"
    if name in C_KEYWORDS:
        return "is a C keyword (C11 to C23 or GNU C)"
    if own(name):
        return f"is {OWN_NAMES}"
    if name.startswith("__") or re.match(r"_[A-Z]", name):
        return ("is a reserved identifier (names starting with __, or with _ and a capital "
                "letter, belong to the compiler and the C library)")
    if macros and predefined(name):
        return "is a macro gcc and clang predefine (the C preprocessor would replace it)"
    return None


def callee_problem(name: str) -> str | None:
    """Why `name` cannot be the function of a `call` ("is ..."), or None.

    Callees are link symbols, so `__`-prefixed kernel functions are fine; refused
    are what the compiler or preprocessor owns and what linkfix generates (calling
    `__lf_dispatch_<op>` from a body would recurse forever).
    """
    if name.startswith("."):
        return "is a local label or section name (it starts with '.'), not a function"
    if name in C_KEYWORDS:
        return "is a C keyword (C11 to C23 or GNU C)"
    if name.startswith("__builtin_"):
        return "is a compiler builtin, not a link symbol"
    if own(name):
        return f"is {OWN_NAMES}"
    if predefined(name):
        return ("is a macro gcc and clang predefine (linkfix_thunks.S goes through the C "
                "preprocessor, which would replace it)")
    return None


BODY_WORD = re.compile(r"(?<![%\w.$])[A-Za-z_][A-Za-z0-9_]*")


def body_text_problem(text: str) -> str | None:
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
    for word in BODY_WORD.findall(code):
        if predefined(word):
            return (f"body uses '{word}', a macro gcc and clang predefine: "
                    f"linkfix_thunks.S and linkfix_asm.h go through the C preprocessor, "
                    f"which would replace it")
        if word.startswith("LINKFIX"):
            return (f"body uses '{word}': LINKFIX* names are linkfix's macros (in "
                    f"linkfix_asm.h, LINKFIX_<op> is another op's site)")
    return None


def type_names(ctype: str) -> list[str]:
    """The typedef names a normalised type uses (`pte_t` in `const pte_t *`)."""
    tokens = ctype.replace("*", " ").split()
    return [t for i, t in enumerate(tokens) if t not in C_KEYWORDS
            and not (i and tokens[i - 1] in ("struct", "union", "enum"))]
