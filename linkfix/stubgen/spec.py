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
from dataclasses import dataclass, field
from typing import Any

from linkfix.arch import ARCHES, Arch
from linkfix.errors import BadInput
from linkfix.fileio import read_regular
from linkfix.stubgen import cnames, crosscheck, ctype, profile
from linkfix.stubgen.cnames import IDENT
from linkfix.stubgen.crosscheck import whole_call_target  # noqa: F401 - part of this module's API
from linkfix.stubgen.profile import Profile

LINKFIX_FIELDS = ("arch", "backends", "default_backend", "includes", "site_budget", "profile",
                  "prefix", "call_constraint")
OP_FIELDS = ("args", "returns", "clobbers", "bodies", "calls", "site_budget", "noinstr")

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
    site_budget: int | None = None  # longest body kept inline (None: the spec's rule)
    noinstr: bool = False  # linux profile: its thunks and bodies go into .noinstr.text

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
    site_budget: int | None = None  # spec-wide default of the ops' site_budget
    profile: Profile = field(default_factory=Profile)

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
                    **({"site_budget": op.site_budget} if op.site_budget is not None else {}),
                    **({"noinstr": True} if op.noinstr else {}),
                }
                for op in self.ops
            ],
            **({"site_budget": self.site_budget} if self.site_budget is not None else {}),
            **self.profile.canonical(),
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
    prof = profile.load(ck, head, arch)

    backends = _backends(ck, head.get("backends"))
    names_size = crosscheck.backend_names_size(ck, backends)
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
        _op(ck, arch, prof, backends, name, body, index)
        for index, (name, body) in enumerate(ops_table.items())
    )
    crosscheck.call_targets(ck, ops, backends, prof)
    crosscheck.declared_calls(ck, ops)
    crosscheck.generated_names(ck, arch, ops, backends, prof)
    crosscheck.names_size(ck, ops, names_size)
    return Spec(path=path, arch=arch, backends=backends, default_backend=default,
                includes=tuple(includes), ops=ops,
                site_budget=_budget(ck, head.get("site_budget"), None, "linkfix.site_budget"),
                profile=prof)


def _budget(ck: _Checker, value: Any, op: str | None, fld: str) -> int | None:
    """A site budget: the longest body, in bytes, a site keeps inline (5 to 255)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 5 <= value <= 255:
        raise ck.fail("must be a whole number of bytes from 5 to 255", op=op, fld=fld)
    return value


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
        problem = cnames.c_name_problem(b, macros=False)
        if problem:
            raise ck.fail(f"backend '{b}' {problem}", fld=fld)
        if b.lower() == "generic":
            raise ck.fail("'generic' is reserved for the dispatch alternative", fld=fld)
        if b.lower() in seen:
            raise ck.fail(f"backend '{b}' listed twice (names are compared ignoring case)",
                          fld=fld)
        seen.add(b.lower())
    return tuple(value)


def _op(ck: _Checker, arch: Arch, prof: Profile, backends: tuple[str, ...], name: str,
        table: Any, index: int) -> Op:
    problem = cnames.c_name_problem(name)
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
        problem = cnames.body_text_problem(text)
        if problem:
            raise ck.fail(problem, op=name, fld=f"bodies.{b}")
    if not bodies:
        raise ck.fail("no body for any backend", op=name, fld="bodies")
    ordered = {b: bodies[b] for b in backends if b in bodies}
    calls = _calls(ck, arch, name, table.get("calls", {}), ordered)
    return Op(name=name, index=index, args=args, returns=returns, clobbers=clobbers,
              bodies=ordered, calls=calls,
              site_budget=_budget(ck, table.get("site_budget"), name, "site_budget"),
              noinstr=profile.op_noinstr(ck, prof, name, table.get("noinstr")))


def _calls(ck: _Checker, arch: Arch, op: str, value: Any, bodies: dict[str, str]
           ) -> dict[str, tuple[str | None, tuple[Arg, ...]]]:
    """`[ops.<op>.calls]`: `fn = "<return type> (<parameters>)"` for a function an
    inline body calls, so that linkfix.h can declare it (its arguments are what the
    body leaves in the argument registers: only its author knows them)."""
    if not isinstance(value, dict):
        raise ck.fail("must be a table of function = \"<return type> (<parameters>)\"",
                      op=op, fld="calls")
    called = {fn for text in bodies.values() for fn in crosscheck.body_calls(text)[1]}
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
        problem = cnames.c_name_problem(pname)
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
    """A C type that travels in one register (ctype.py), or a refusal naming op and field."""
    shown = whole if whole is not None else text

    def bad(message: str) -> BadInput:
        return ck.fail(f"'{shown}': {message}", op=op, fld=fld)

    return ctype.parse(bad, arch, text, returned=fld == "returns")


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
