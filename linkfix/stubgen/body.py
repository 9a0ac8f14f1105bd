"""Parse and classify op bodies: statements, local labels, calls into C.

A body is AT&T assembly; ';' or a newline separates statements. The text is
turned into a list of statements once, here, so that measuring, register
checking and rendering all see the same code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from linkfix.arch import Arch
from linkfix.stubgen.spec import Op, whole_call_target

KIND_INLINE = "inline"
KIND_CALL = "call"
KIND_EMPTY = "empty"

_SYM = r"[A-Za-z_.][A-Za-z0-9_.$]*"
_NUM_LABEL_DEF = re.compile(r"(\d+):\s*(.*)\Z")
_NAMED_LABEL_DEF = re.compile(rf"({_SYM}):\s*(.*)\Z")
_CALL = re.compile(rf"call[lq]?\s+({_SYM})\Z")
_INDIRECT_CALL = re.compile(r"call[lq]?\s+\*")
_RETURNS = frozenset({"ret", "retq", "retl", "lret", "lretq", "iret", "iretq", "iretl",
                      "sysret", "sysretq", "sysexit"})
_DATA_DIRECTIVES = (".byte", ".short", ".word", ".long", ".quad")


class BodyError(ValueError):
    """A body that cannot be used; the message names no op (the caller adds it)."""


@dataclass(frozen=True)
class Body:
    backend: str
    kind: str  # inline | call | empty
    source: str  # the body as written in the spec
    statements: tuple[str, ...]  # what goes into .linkfix.repl and __lf_body_* (calls rewritten)
    callee: str | None  # C function of a whole-call body
    inner_calls: tuple[str, ...]  # functions called from inside an inline body, in order
    has_branches: bool  # contains jmp/jcc/loop (GAS may relax it: length known only at the end)

    @property
    def text(self) -> str:
        return "; ".join(self.statements)


def saved_regs(arch: Arch, op: Op) -> tuple[str, ...]:
    """Caller-saved registers a thunk must preserve so the site clobbers only what `op` says."""
    free = set(op.clobbers)
    if op.returns is not None:
        free.add(arch.ret_reg)
    return tuple(r for r in arch.caller_saved if r not in free)


def site_clobbers(arch: Arch, op: Op) -> tuple[str, ...]:
    """Registers a site of `op` may change: declared clobbers plus the return register."""
    regs = list(op.clobbers)
    if op.returns is not None and arch.ret_reg not in regs:
        regs.append(arch.ret_reg)
    return tuple(r for r in arch.gprs if r in regs)


def thunk_name(op: str, suffix: str) -> str:
    return f"__lf_thunk_{op}_{suffix}"


def split_statements(text: str) -> list[str]:
    """Statements of a body: split on newlines and ';', '#' comments dropped."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for part in line.split(";"):
            part = " ".join(part.split())
            if not part:
                continue
            # "1: nop" is two statements for us: the label and the instruction.
            m = _NUM_LABEL_DEF.match(part)
            if m:
                out.append(f"{m.group(1)}:")
                if m.group(2):
                    out.append(m.group(2))
                continue
            out.append(part)
    return out


_LOCAL_REF = re.compile(r"\b(\d+)([fb])\b")


def rename_labels(statements: tuple[str, ...] | list[str],
                  name: Callable[[int], str]) -> list[str]:
    """Give each numeric local label definition the name `name(n)` (n = its ordinal) and
    point every `Nf`/`Nb` reference at the definition it means.

    A body's `1:` must not capture a `1f` of the code around the site (numeric
    labels are file-wide in GAS, across sections), and keystone has no numeric
    labels at all. Raises BodyError for a reference with no definition.
    """
    import bisect  # here: this function is the module's only user

    names: dict[int, str] = {}
    # Positions of each label's definitions, in order: a reference bisects its own
    # list instead of scanning every definition (8k labels took seconds).
    by_num: dict[str, list[int]] = {}
    for i, st in enumerate(statements):
        if _NUM_LABEL_DEF.fullmatch(st):
            names[i] = name(len(names))
            by_num.setdefault(st[:-1], []).append(i)

    def resolve(pos: int, num: str, direction: str) -> str:
        at = by_num.get(num, [])
        if direction == "f":
            j = bisect.bisect_right(at, pos)
            found = j < len(at)
        else:
            j = bisect.bisect_left(at, pos) - 1
            found = j >= 0
        if not found:
            raise BodyError(f"local label '{num}{direction}' has no '{num}:' "
                            f"{'after' if direction == 'f' else 'before'} it in the body")
        return names[at[j]]

    out: list[str] = []
    for pos, st in enumerate(statements):
        if pos in names:
            out.append(f"{names[pos]}:")
            continue
        parts = st.split(None, 1)
        if len(parts) == 1 or st.startswith("."):
            out.append(st)
            continue
        operands = _LOCAL_REF.sub(lambda m, pos=pos: resolve(pos, m.group(1), m.group(2)),
                                  parts[1])
        out.append(f"{parts[0]} {operands}")
    return out


def is_label(statement: str) -> bool:
    return statement.endswith(":") and " " not in statement


def is_branch(statement: str) -> bool:
    mnemonic = statement.split(None, 1)[0].lower()
    return mnemonic.startswith(("j", "loop")) or mnemonic == "xbegin"


def parse(arch: Arch, op: Op, backend: str, always_thunks: bool = False) -> Body:
    """Classify and rewrite one body of `op`. A call goes through a callee-save thunk,
    or straight to the function when there is nothing to save and not `always_thunks`."""
    source = op.bodies[backend]
    statements = split_statements(source)
    if not statements:
        return Body(backend, KIND_EMPTY, source, (), None, (), False)
    callee = whole_call_target(source)
    direct = not saved_regs(arch, op) and not always_thunks
    if callee is not None:
        target = callee if direct else thunk_name(op.name, backend)
        return Body(backend, KIND_CALL, source, (f"call {target}",), callee, (), False)
    rewritten: list[str] = []
    inner: list[str] = []
    for st in statements:
        if _NUM_LABEL_DEF.match(st):
            rewritten.append(st)
            continue
        named = _NAMED_LABEL_DEF.match(st)
        if named and not st.startswith("."):
            raise BodyError(f"named label '{named.group(1)}:' would be defined once per site; "
                            f"use numeric local labels (1: ... jz 1b/1f)")
        if st.startswith("."):
            directive = st.split(None, 1)[0]
            if directive.endswith(":"):
                raise BodyError(f"label '{directive}' would be defined once per site; "
                                f"use numeric local labels")
            if directive not in _DATA_DIRECTIVES:
                raise BodyError(f"directive '{directive}' is not allowed in a body "
                                f"(only {', '.join(_DATA_DIRECTIVES)})")
            rewritten.append(st)
            continue
        if _INDIRECT_CALL.match(st):
            raise BodyError(f"'{st}': an indirect call may clobber any register; "
                            f"call a named function instead")
        call = _CALL.match(st)
        if call:
            sym = call.group(1)
            inner.append(sym)
            rewritten.append(f"call {sym if direct else thunk_name(op.name, sym)}")
            continue
        mnemonic = st.split(None, 1)[0].lower()
        if mnemonic.startswith("call"):
            raise BodyError(f"'{st}': only 'call <function>' is supported in a body")
        if mnemonic in _RETURNS:
            raise BodyError(f"'{st}': a body runs inside its caller; it cannot return")
        if is_branch(st) and not re.fullmatch(r"\S+\s+\d+[fb]", st):
            raise BodyError(f"'{st}': a jump may only target a local label of the body "
                            f"(jz 1f); control must reach the end of the body")
        rewritten.append(st)
    rename_labels(rewritten, lambda n: f"L{n}")  # every local reference resolves
    clash = [s for s in inner
             if s in op.bodies and whole_call_target(op.bodies[s]) not in (None, s)]
    if clash:
        raise BodyError(f"calls '{clash[0]}', a backend name: its thunk would be "
                        f"{thunk_name(op.name, clash[0])}, the name of that backend's thunk")
    return Body(backend, KIND_INLINE, source, tuple(rewritten), None, tuple(dict.fromkeys(inner)),
                any(is_branch(s) for s in rewritten))
