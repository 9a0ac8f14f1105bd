"""Each op's model: what the generated files say about one validated, measured op.

The decisions are made here (site length, padding bytes, registers the thunks
save, which symbol each ops-table entry names, what each alternative assembled
to); sitetext.py and render.py only write the results out.
"""

from __future__ import annotations

from dataclasses import dataclass

from linkfix import layout
from linkfix.body import (
    KIND_CALL,
    KIND_EMPTY,
    KIND_INLINE,
    Body,
    saved_regs,
    site_clobbers,
)
from linkfix.bodycheck import Checked
from linkfix.measure import Measured
from linkfix.padding import pad
from linkfix.spec import Op, Spec


@dataclass(frozen=True)
class Alt:
    """Alternative k of a site record."""

    k: int  # 0 generic, b = backend b
    name: str  # "generic" or the backend
    kind: str  # generic | inline | call | empty | jmp | none
    statements: tuple[str, ...]  # its code in .linkfix.repl
    flags: int
    guard: str  # "if" (constant length), "org" (contains relaxable branches) or ""

    @property
    def present(self) -> bool:
        return bool(self.flags & layout.FLAG_PRESENT)


@dataclass(frozen=True)
class Thunk:
    name: str
    callee: str


@dataclass(frozen=True)
class OpModel:
    op: Op
    site_len: int
    pad: bytes
    clobbers: tuple[str, ...]  # every register the site may change
    saved: tuple[str, ...]  # caller-saved registers the thunks preserve
    alts: tuple[Alt, ...]
    bodies: dict[str, Body]
    measured: dict[str, Measured]
    thunks: tuple[Thunk, ...]
    table: dict[str, str]  # backend -> symbol in the ops table
    digests: tuple[layout.BodyDigest, ...]  # per alternative k, for the image header


def dispatch_name(op: str) -> str:
    return f"__lf_dispatch_{op}"


def body_fn_name(op: str, backend: str) -> str:
    return f"__lf_body_{op}_{backend}"


CALL_FIELD = ((1, 4),)  # the rel32 of a 5-byte call or jmp


def build_op(spec: Spec, op: Op, bodies: dict[str, Body], measured: dict[str, Measured],
             checked: dict[str, Checked]) -> OpModel:
    """`checked`: per backend, its body's relocated fields and where the link points them."""
    lengths = [measured[b].length for b in bodies]
    site_len = max(5, *lengths) if lengths else 5
    alts = [Alt(0, "generic", "generic", (f"call {dispatch_name(op.name)}",),
                layout.FLAG_PRESENT | layout.FLAG_CALL, "")]
    thunks: dict[str, Thunk] = {}
    saved = saved_regs(spec.arch, op)
    for k, backend in enumerate(spec.backends, start=1):
        body = bodies.get(backend)
        if body is None:
            alts.append(Alt(k, backend, "none", (), 0, ""))
            continue
        flags = layout.FLAG_PRESENT
        if body.kind == KIND_CALL:
            flags |= layout.FLAG_CALL
            if saved:
                assert body.callee is not None
                name = body.statements[0].split()[1]
                thunks.setdefault(name, Thunk(name, body.callee))
        if body.kind == KIND_INLINE and saved:
            for sym in body.inner_calls:
                name = f"__lf_thunk_{op.name}_{sym}"
                thunks.setdefault(name, Thunk(name, sym))
        guard = ""
        if body.kind != KIND_EMPTY and measured[backend].length > 0:
            guard = "org" if body.has_branches else "if"
        alts.append(Alt(k, backend, body.kind, body.statements, flags, guard))

    table: dict[str, str] = {}
    for backend in spec.backends:
        src = backend if backend in bodies else _fallback(spec, bodies)
        body = bodies[src]
        table[backend] = body.callee if body.kind == KIND_CALL and body.callee else \
            body_fn_name(op.name, src)
    digests = [layout.body_digest(b"\xe8" + bytes(4), CALL_FIELD,
                                  (layout.Link(True, expr=f"{dispatch_name(op.name)}-4"),))]
    for backend in spec.backends:
        if backend not in bodies:
            digests.append(layout.ABSENT)
        else:
            c = checked[backend]
            digests.append(layout.body_digest(measured[backend].code, c.masked, c.links))
    return OpModel(op=op, site_len=site_len, pad=pad(site_len - 5),
                   clobbers=site_clobbers(spec.arch, op), saved=saved, alts=tuple(alts),
                   bodies=bodies, measured=measured, thunks=tuple(thunks.values()), table=table,
                   digests=tuple(digests))


def _fallback(spec: Spec, bodies: dict[str, Body]) -> str:
    """The body an ops table uses for a backend without one: the default backend's, else
    the first backend (spec order) that has one."""
    if spec.default_backend in bodies:
        return spec.default_backend
    return next(b for b in spec.backends if b in bodies)
