"""Each op's model: what the generated files say about one validated, measured op.

The decisions are made here (site length, padding bytes, registers the thunks
save, which symbol each ops-table entry names, what each alternative assembled
to); sitetext.py and render.py only write the results out.
"""

from __future__ import annotations

from dataclasses import dataclass

from linkfix import layout
from linkfix.errors import BadInput
from linkfix.stubgen import sitefill
from linkfix.stubgen.body import (
    KIND_CALL,
    KIND_EMPTY,
    KIND_INLINE,
    Body,
    saved_regs,
    site_clobbers,
)
from linkfix.stubgen.bodycheck import Checked
from linkfix.stubgen.insn import decode
from linkfix.stubgen.measure import Measured
from linkfix.stubgen.spec import Op, Spec


@dataclass(frozen=True)
class Alt:
    """Alternative k of an op: what its sites hold when patched to it.

    `code` is the whole site (padding included) as stored once in
    `.linkfix.repl`; `fields` are the bytes the link fills in, each with the
    symbol + addend it names. `how` says how the body reached the site:
    generic (the dispatch call), inline, call (a whole-call body), ool (a call to
    the body's out-of-line copy: the body is longer than the site budget),
    empty, or none (the op has no body for that backend).
    """

    k: int  # 0 generic, b = backend b
    name: str  # "generic" or the backend
    how: str
    flags: int
    code: bytes = b""
    fields: tuple[tuple[int, int, layout.Link], ...] = ()
    body_len: int = 0  # bytes of body before the padding (the call, for ool)
    pad_insns: int = 0  # padding instructions executed after the body
    body_insns: int = 0  # instructions of the body itself (ool: of the called copy)
    ool_len: int = 0  # bytes of the called copy, its `ret` included (ool only)

    @property
    def path_insns(self) -> int:
        """Instructions a site patched to this alternative executes (ool: call, body, ret)."""
        if self.how in ("generic", "call"):
            return 1 + self.pad_insns
        if self.how == "ool":
            return 1 + self.pad_insns + self.body_insns + 1
        return self.body_insns + self.pad_insns

    @property
    def path_bytes(self) -> int:
        """Instruction bytes that path fetches and runs (a jump's INT3s are not run)."""
        pad_run = sitefill.executed_bytes(self.code[self.body_len:])
        return self.body_len + pad_run + self.ool_len

    @property
    def present(self) -> bool:
        return bool(self.flags & layout.FLAG_PRESENT)

    def entry(self, label: str | None) -> layout.AltEntry:
        if not self.present:
            return layout.ABSENT_ALT
        fields = tuple((p, n) for p, n, _l in self.fields)
        links = tuple(link for _p, _n, link in self.fields)
        return layout.AltEntry(self.flags, layout.body_digest(self.code, fields, links),
                               label=label, body_len=self.body_len)


@dataclass(frozen=True)
class Thunk:
    name: str
    callee: str


@dataclass(frozen=True)
class OpModel:
    op: Op
    site_len: int
    budget: int
    pad: bytes  # after the linked call
    clobbers: tuple[str, ...]  # every register the site may change
    saved: tuple[str, ...]  # caller-saved registers the thunks preserve
    alts: tuple[Alt, ...]
    bodies: dict[str, Body]
    measured: dict[str, Measured]
    thunks: tuple[Thunk, ...]
    table: dict[str, str]  # backend -> symbol in the ops table
    stack_alt: int = 0  # the inline alternative whose stack depth changes inside the site

    def repl_label(self, k: int) -> str:
        return f"__lf_repl_{self.op.name}_{k}"


def dispatch_name(op: str) -> str:
    return f"__lf_dispatch_{op}"


def body_fn_name(op: str, backend: str) -> str:
    return f"__lf_body_{op}_{backend}"


CALL_FIELD = ((1, 4),)  # the rel32 of a 5-byte call or jmp


def site_budget(spec: Spec, op: Op, measured: dict[str, Measured]) -> int:
    """The longest body that stays inline: the op's or the spec's `site_budget`, else
    what the default backend needs, or 5 bytes (a call), whichever is larger."""
    if op.site_budget is not None:
        return op.site_budget
    if spec.site_budget is not None:
        return spec.site_budget
    own = measured.get(spec.default_backend)
    return max(5, own.length if own is not None else 0)


def build_op(spec: Spec, op: Op, bodies: dict[str, Body], measured: dict[str, Measured],
             checked: dict[str, Checked]) -> OpModel:
    """`checked`: per backend, its body's relocated fields and where the link points them."""
    budget = site_budget(spec, op, measured)
    # The linux profile keeps inline only what objtool accepts in an alternative.
    forced = _forced_ool(spec, bodies, measured, checked, budget)
    inline_lens = [measured[b].length for b in bodies
                   if measured[b].length <= budget and b not in forced]
    site_len = max(5, *inline_lens) if inline_lens else 5
    call_at = (1, 4, layout.Link(True, expr=f"{dispatch_name(op.name)}-4"))
    generic_pad = sitefill.nop_fill(site_len - 5)
    alts = [Alt(0, "generic", "generic", layout.FLAG_PRESENT | layout.FLAG_CALL,
                b"\xe8" + bytes(4) + generic_pad, (call_at,), 5,
                sitefill.count_insns(generic_pad), 1)]
    thunks: dict[str, Thunk] = {}
    saved = saved_regs(spec.arch, op)
    thunked = bool(saved) or spec.profile.linux  # body.parse made the calls go to thunks
    for k, backend in enumerate(spec.backends, start=1):
        body = bodies.get(backend)
        if body is None:
            alts.append(Alt(k, backend, "none", 0))
            continue
        if body.kind == KIND_CALL and thunked:
            assert body.callee is not None
            name = body.statements[0].split()[1]
            thunks.setdefault(name, Thunk(name, body.callee))
        if body.kind == KIND_INLINE and thunked:
            for sym in body.inner_calls:
                name = f"__lf_thunk_{op.name}_{sym}"
                thunks.setdefault(name, Thunk(name, sym))
        alts.append(_alternative(spec, op, k, backend, body, measured[backend],
                                 checked[backend], site_len, backend in forced))

    table: dict[str, str] = {}
    for backend in spec.backends:
        src = backend if backend in bodies else _fallback(spec, bodies)
        b = bodies[src]
        table[backend] = b.callee if b.kind == KIND_CALL and b.callee else \
            body_fn_name(op.name, src)
    stack_alt = next((a.k for a in alts if a.how == "inline" and checked[a.name].pushes), 0)
    return OpModel(op=op, site_len=site_len, budget=budget, pad=generic_pad,
                   clobbers=site_clobbers(spec.arch, op), saved=saved, alts=tuple(alts),
                   bodies=bodies, measured=measured, thunks=tuple(thunks.values()),
                   table=table, stack_alt=stack_alt)


def _forced_ool(spec: Spec, bodies: dict[str, Body], measured: dict[str, Measured],
                checked: dict[str, Checked], budget: int) -> set[str]:
    """Backends whose body the linux profile runs out of line whatever its length: a
    relocated field objtool refuses in an alternative (kernelsite.alt_problem), or a
    second body that moves the stack pointer inside the site. objtool 6.1 keeps the
    unwind data inside a site of one alternative only, the last (kernelsite.py): the
    default backend's body keeps the site if it is one of them, else the first."""
    if not spec.profile.linux:
        return set()
    from linkfix.stubgen import kernelsite  # only for the linux profile

    forced = {b for b in bodies if measured[b].length and kernelsite.alt_problem(
        measured[b].code, tuple(checked[b].masked)) is not None}
    order = [spec.default_backend, *(b for b in spec.backends if b != spec.default_backend)]
    moving = [b for b in order if b in bodies and b not in forced
              and 0 < measured[b].length <= budget and checked[b].pushes]
    return forced | set(moving[1:])


def _alternative(spec: Spec, op: Op, k: int, backend: str, body: Body, meas: Measured,
                 chk: Checked, site_len: int, forced: bool = False) -> Alt:
    """Backend k's body finished to the site: inline with padding, or out of line
    (longer than the site, or `forced` by the linux profile)."""
    fields = tuple(zip((p for p, _n in chk.masked), (n for _p, n in chk.masked), chk.links,
                       strict=True))
    if body.kind == KIND_EMPTY or meas.length == 0:
        fill = sitefill.nop_fill(site_len)
        return Alt(k, backend, "empty", layout.FLAG_PRESENT, fill, (), 0,
                   sitefill.count_insns(fill))
    flags = layout.FLAG_PRESENT | (layout.FLAG_CALL if body.kind == KIND_CALL else 0)
    n_insns = len(decode(spec.arch, meas.code))
    if meas.length <= site_len and not forced:
        code, fields, body_len, pad_insns = sitefill.finish(spec.arch, meas.code, fields,
                                                            site_len)
        return Alt(k, backend, "call" if body.kind == KIND_CALL else "inline", flags, code,
                   fields, body_len, pad_insns, n_insns)
    problem = sitefill.ool_problem(spec.arch, meas.code)
    if problem is not None and forced:
        from linkfix.stubgen import kernelsite

        why = kernelsite.alt_problem(meas.code, tuple(chk.masked))
        raise BadInput(spec.path, f"op '{op.name}': backend '{backend}': profile linux: "
                                  f"{why}, so the body must run out of line, and it cannot "
                                  f"({problem})")
    if problem is not None:
        raise BadInput(spec.path, f"op '{op.name}': backend '{backend}': its {meas.length}-"
                                  f"byte body is longer than the {site_len}-byte site and "
                                  f"cannot run out of line ({problem}); raise site_budget")
    fill = sitefill.nop_fill(site_len - 5)
    target = (1, 4, layout.Link(True, expr=f"{body_fn_name(op.name, backend)}-4"))
    return Alt(k, backend, "ool", layout.FLAG_PRESENT | layout.FLAG_OOL,
               b"\xe8" + bytes(4) + fill, (target,), 5, sitefill.count_insns(fill), n_insns,
               meas.length + 1)


def _fallback(spec: Spec, bodies: dict[str, Body]) -> str:
    """The body an ops table uses for a backend without one: the default backend's, else
    the first backend (spec order) that has one."""
    if spec.default_backend in bodies:
        return spec.default_backend
    return next(b for b in spec.backends if b in bodies)
