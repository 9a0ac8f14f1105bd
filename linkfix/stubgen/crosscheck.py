"""Checks across a whole spec, once every op is parsed.

Names linkfix builds by joining spec names (thunks, bodies, GAS macros, the
LINKFIX_OP_* constants) must not meet; a function named by bodies gets one
prototype, so every signature given for it must agree; and the image header's
name table has a 16-bit size.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from linkfix.layout import branch_op_name
from linkfix.stubgen import cnames

if TYPE_CHECKING:  # types only: linkfix.spec imports this module
    from linkfix.arch import Arch
    from linkfix.stubgen.profile import Profile
    from linkfix.stubgen.spec import Op

NAMES_MAX = 0xFFFF  # names_size in the image header is a u16

_CALL_BODY = re.compile(r"\s*call[lq]?\s+([A-Za-z_.][A-Za-z0-9_.$]*)\s*;?\s*\Z")


def whole_call_target(text: str) -> str | None:
    """The function of a body that is exactly one direct call, else None."""
    m = _CALL_BODY.match(text)
    return m.group(1) if m else None


def body_calls(text: str) -> tuple[str | None, list[str]]:
    """(the function of a whole-call body or None, the functions an inline body calls)."""
    from linkfix.stubgen.body import split_statements  # here: linkfix.body imports this module

    whole = whole_call_target(text)
    if whole is not None:
        return whole, []
    return None, [fn for st in split_statements(text) if (fn := whole_call_target(st))]


def _op_type_names(op: Op) -> set[str]:
    return {t for ctype in (op.returns or "", *(a.ctype for a in op.args))
            for t in cnames.type_names(ctype)}


def call_targets(ck, ops: tuple[Op, ...], backends: tuple[str, ...], prof: Profile) -> None:
    """Every callee must be a usable link symbol; a C function named by whole-call
    bodies gets one prototype, so their signatures must agree. An op's C function is
    its name after the spec's prefix."""
    seen: dict[str, Op] = {}
    op_names = {prof.c_name(op.name) for op in ops}
    type_names = {t for op in ops for t in _op_type_names(op)}
    for op in ops:
        for b, text in op.bodies.items():
            whole, inner = body_calls(text)
            for fn in [whole] if whole else inner:
                problem = cnames.callee_problem(fn)
                if problem is None and fn in op_names:
                    problem = ("is an op (a site, not a function)" if not prof.prefix else
                               f"is the C function of an op (prefix '{prof.prefix}')")
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


def declared_calls(ck, ops: tuple[Op, ...]) -> None:
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


def generated_names(ck, arch: Arch, ops: tuple[Op, ...], backends: tuple[str, ...],
                    prof: Profile) -> None:
    """Names linkfix builds from spec names must not meet: C names (after the prefix)
    against the C rules and the spec's type names, GAS macros (case-insensitive)
    against each other and linkfix's macros, and the thunk and body symbols, which
    join names with '_'."""
    type_names = {t for op in ops for t in _op_type_names(op)}
    own_macros = {*cnames.OWN_MACROS, *(f"BACKEND_{b}" for b in backends),
                  *(f"BACKEND_{b.upper()}" for b in backends)}
    macro_of: dict[str, str] = {cnames.GAS_HELPER: "LINKFIX__need, linkfix_asm.h's helper"}
    for op in ops:
        c_name = prof.c_name(op.name)
        if prof.prefix:
            problem = cnames.c_name_problem(c_name)
            if problem:
                raise ck.fail(f"its C function '{c_name}' (prefix '{prof.prefix}') {problem}",
                              op=op.name)
        if c_name in type_names:
            what = "the op name" if not prof.prefix else f"its C function '{c_name}'"
            raise ck.fail(f"{what} is also a type name in the spec (the op's C function "
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
    _symbols(ck, arch, ops, prof.linux)


def _symbols(ck, arch: Arch, ops: tuple[Op, ...], always_thunks: bool) -> None:
    """The thunk and body symbols the whole spec generates must be distinct: op `f`
    with backend `b_c` and op `f_b` with backend `c` both give `__lf_body_f_b_c`."""
    from linkfix.stubgen.body import saved_regs  # here: linkfix.body imports this module

    # symbol -> (what it is, where it comes from); one thunk may serve several
    # bodies of one op that call the same function.
    owners: dict[str, tuple[tuple[str, ...], str]] = {}
    for op in ops:
        made: list[tuple[str, tuple[str, ...], str | None, str]] = [
            (f"__lf_dispatch_{op.name}", ("dispatch", op.name), None,
             f"op '{op.name}' (its dispatch thunk)")]
        # No registers to save: direct calls, no thunks (but the linux profile always
        # calls through a thunk: kernelthunks.py).
        thunks = always_thunks or bool(saved_regs(arch, op))
        for b, text in op.bodies.items():
            whole, inner = body_calls(text)
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


def backend_names_size(ck, backends: tuple[str, ...]) -> int:
    """Bytes the backends take in the image header's name table: each name and its
    `backend_is(<b>)` pseudo-op, NUL-terminated. The table's size field is a u16."""
    size = sum(len(b.encode()) + len(branch_op_name(b).encode()) + 2 for b in backends)
    if size > NAMES_MAX:
        raise ck.fail(f"backend names take {size} bytes in the image header's name table, "
                      f"more than its 16-bit size allows ({NAMES_MAX})", fld="linkfix.backends")
    return size


def names_size(ck, ops: tuple[Op, ...], size: int) -> None:
    """The op names join the backends' in the name table (`size` bytes so far)."""
    for op in ops:
        size += len(op.name.encode()) + 1
        if size > NAMES_MAX:
            raise ck.fail(f"with this op the names of backends and ops take {size} bytes in "
                          f"the image header's name table, more than its 16-bit size allows "
                          f"({NAMES_MAX})", op=op.name)
