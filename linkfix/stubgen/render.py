"""Render the generated files from a validated, measured spec.

All decisions (site length, padding bytes, registers to save, which symbol
each ops-table entry names, the exact site assembly) are made in Python: each
op's model in opmodel.py, a site's assembler text in sitetext.py. This module
builds the template context; the jinja2 templates in `templates/` only lay the
results out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from linkfix import layout
from linkfix.padding import NOPS
from linkfix.stubgen import written
from linkfix.stubgen.body import KIND_CALL, KIND_INLINE, is_label, rename_labels
from linkfix.stubgen.opmodel import CALL_FIELD, OpModel, body_fn_name, dispatch_name
from linkfix.stubgen.sitecompose import branch_text, site_text
from linkfix.stubgen.sitetext import c_asm_escape, c_string, repl_lines
from linkfix.stubgen.spec import IDENT, Op, Spec

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
LDSCRIPT = Path(__file__).resolve().parents[2] / "ldscripts" / "linkfix.lds"
LDS_HEADER = LDSCRIPT.with_name("linkfix.lds.h")  # the linux profile's cpp fragment
FORMAT_VERSION = layout.VERSION

OUTPUTS = ("linkfix.h", "linkfix_asm.h", "linkfix_thunks.S", "linkfix_ops.c", "linkfix_boot.c",
           "linkfix.lds", "linkfix.json")
LINUX_OUTPUTS = (*OUTPUTS[:6], "linkfix.lds.h", OUTPUTS[6])


# ------------------------------------------------------------------ C functions


@dataclass(frozen=True)
class CFunction:
    """What the C template needs for one op's static inline."""

    name: str
    ret: str  # "void" or the C type
    params: str  # "void" or "unsigned long val, pte_t *ptep"
    temps: tuple[str, ...]  # declarations: "unsigned long __lf_a0 = (unsigned long)(val);"
    outputs: str
    inputs: str
    clobbers: str
    asm: tuple[str, ...]  # C string literals
    result: str | None  # the temporary holding the result


def c_function(spec: Spec, m: OpModel) -> CFunction:
    arch = spec.arch
    op = m.op
    temps: list[str] = []
    outs: list[str] = []
    ins: list[str] = []
    result: str | None = None
    arg_regs = arch.arg_regs[: len(op.args)]
    for i, (arg, reg) in enumerate(zip(op.args, arg_regs, strict=True)):
        var = f"__lf_a{i}"
        temps.append(f"unsigned long {var} = (unsigned long)({arg.name});")
        con = arch.asm_constraints[reg]
        if reg in m.clobbers:
            # GCC refuses a clobber that is also an input: make it an in/out operand.
            outs.append(f'"+{con}" ({var})')
            if op.returns is not None and reg == arch.ret_reg:
                result = var
        else:
            ins.append(f'"{con}" ({var})')
    clobber_regs = [r for r in m.clobbers if r not in arg_regs]
    if op.returns is not None and result is None:
        result = "__lf_ret"
        temps.append("unsigned long __lf_ret;")
        outs.insert(0, f'"=a" ({result})')
        clobber_regs = [r for r in clobber_regs if r != arch.ret_reg]
    clobbers = ", ".join([*(f'"{r}"' for r in clobber_regs), '"memory"', '"cc"'])
    if spec.profile.call_constraint is not None:
        outs.append(spec.profile.call_constraint)  # ASM_CALL_CONSTRAINT: the site calls
    lines = site_text(spec, m, "%=", c_asm_escape)
    return CFunction(
        name=spec.profile.c_name(op.name),
        ret=op.returns or "void",
        params=_params(op),
        temps=tuple(temps),
        outputs=", ".join(outs),
        inputs=", ".join(ins),
        clobbers=clobbers,
        asm=tuple(c_string(line) for line in lines),
        result=result,
    )


def _params(op: Op) -> str:
    if not op.args:
        return "void"
    return ", ".join(_decl(a.ctype, a.name) for a in op.args)


def _decl(ctype: str, name: str) -> str:
    return f"{ctype}{name}" if ctype.endswith("*") else f"{ctype} {name}"


@dataclass(frozen=True)
class Prototype:
    ret: str
    name: str
    params: str


def prototypes(spec: Spec, models: list[OpModel]) -> list[Prototype]:
    """Prototypes of the C functions that whole-call bodies name (C identifiers only),
    then of those inline bodies call that the spec declares (`[ops.<op>.calls]`)."""
    seen: dict[str, Prototype] = {}
    for m in models:
        for body in m.bodies.values():
            if body.kind == KIND_CALL and body.callee and IDENT.match(body.callee):
                seen.setdefault(body.callee,
                                Prototype(m.op.returns or "void", body.callee, _params(m.op)))
    for m in models:
        for fn, (ret, args) in m.op.calls.items():
            params = ", ".join(_decl(a.ctype, a.name) for a in args) or "void"
            seen.setdefault(fn, Prototype(ret or "void", fn, params))
    return list(seen.values())


def inner_callees(models: list[OpModel], declared: set[str]) -> list[tuple[str, str]]:
    """(function, the ops whose inline bodies call it) for calls not declared already.

    No prototype is derived for these: what such a function receives is whatever
    the body leaves in the argument registers (`call xen_irq_enable` inside
    restore_fl takes no argument at all), so only its author can declare it.
    """
    users: dict[str, list[str]] = {}
    for m in models:
        for body in m.bodies.values():
            if body.kind == KIND_INLINE:
                for fn in body.inner_calls:
                    if fn not in declared and m.op.name not in users.setdefault(fn, []):
                        users[fn].append(m.op.name)
    return [(fn, ", ".join(ops)) for fn, ops in users.items()]


# ------------------------------------------------------------------ assembler side


@dataclass(frozen=True)
class AsmFunction:
    name: str
    lines: tuple[str, ...]


def _push_pop(regs: tuple[str, ...], middle: list[str]) -> list[str]:
    return [*(f"\tpush %{r}" for r in regs), *middle,
            *(f"\tpop %{r}" for r in reversed(regs)), "\tret"]


def thunk_functions(spec: Spec, models: list[OpModel]) -> list[AsmFunction]:
    word = spec.arch.word
    rip = "(%rip)" if word == 8 else ""
    out: list[AsmFunction] = []
    for m in models:
        call = f"\tcall *linkfix_ops+{word * m.op.index}{rip}"
        out.append(AsmFunction(dispatch_name(m.op.name), tuple(_push_pop(m.saved, [call]))))
        for t in m.thunks:
            out.append(AsmFunction(t.name, tuple(_push_pop(m.saved, [f"\tcall {t.callee}"]))))
    return out


def body_functions(models: list[OpModel]) -> list[AsmFunction]:
    out: list[AsmFunction] = []
    for m in models:
        for backend, body in m.bodies.items():
            if body.kind == KIND_CALL:
                continue
            fn = body_fn_name(m.op.name, backend)
            code = rename_labels(body.statements, lambda n, fn=fn: f".L{fn}_{n}")
            lines = [st if is_label(st) else f"\t{st}" for st in code]
            out.append(AsmFunction(body_fn_name(m.op.name, backend), (*lines, "\tret")))
    return out


def gas_macro_lines(spec: Spec, m: OpModel) -> list[str]:
    checks = [f"\tLINKFIX__need {r}, {m.op.name}, \\clobbers" for r in m.clobbers]
    if not checks:
        # Nothing to check, but the parameter is used (clang warns about one that is not).
        checks = ["\t.ifnb \\clobbers", "\t.endif"]
    return checks + site_text(spec, m, "\\@", lambda s: s)


# ------------------------------------------------------------------ meta, manifest


NOP5_LABEL = ".Llf_repl_nop5"


def meta(spec: Spec, models: list[OpModel]) -> layout.Meta:
    """The image header: names, and every alternative's stored copy and digest."""
    ops = tuple(op.name for op in spec.ops) + tuple(
        layout.branch_op_name(b) for b in spec.backends)
    alts = [tuple(a.entry(m.repl_label(a.k) if a.present else None) for a in m.alts)
            for m in models]
    jmp = layout.AltEntry(layout.FLAG_PRESENT | layout.FLAG_JMP,
                          layout.body_digest(b"\xe9" + bytes(4), CALL_FIELD), body_len=5)
    nop5 = layout.AltEntry(layout.FLAG_PRESENT, layout.body_digest(NOPS[5], ()),
                           label=NOP5_LABEL)
    for b in range(1, len(spec.backends) + 1):
        alts.append((jmp, *(jmp if k == b else nop5 for k in range(1, len(spec.backends) + 1))))
    state = written.state(spec, models) if spec.profile.written is not None else None
    return layout.Meta(machine=spec.arch.e_machine, backends=spec.backends, ops=ops,
                       spec_hash=spec.spec_hash(), alts=tuple(alts),
                       **({} if state is None else state))


def repl_copies(spec: Spec, models: list[OpModel]) -> list[str]:
    """The stored copy of every op alternative (one per op and backend) for .linkfix.repl."""
    lines: list[str] = []
    for m in models:
        for a in m.alts:
            if a.present:
                lines += repl_lines(m.repl_label(a.k), a.code, a.fields, spec.arch.word)
    return lines + repl_lines(NOP5_LABEL, NOPS[5], (), spec.arch.word)


def manifest(spec: Spec, models: list[OpModel]) -> dict:  # type: ignore[type-arg]
    ops = []
    for m in models:
        bodies = {}
        for backend, body in m.bodies.items():
            meas = m.measured[backend]
            bodies[backend] = {"kind": body.kind, "text": body.text, "source": body.source,
                               "length": meas.length}
            bodies[backend].update(_trade(m, spec.backend_index(backend)))
            if body.callee:
                bodies[backend]["callee"] = body.callee
        ops.append({
            "name": m.op.name,
            "index": m.op.index,
            "args": [{"type": a.ctype, "name": a.name, "reg": r}
                     for a, r in zip(m.op.args, spec.arch.arg_regs, strict=False)],
            "returns": m.op.returns,
            "clobbers": list(m.clobbers),
            "declared_clobbers": list(m.op.clobbers),
            "saved_by_thunks": list(m.saved),
            "site_size": m.site_len,
            "site_budget": m.budget,
            "generic": _trade(m, 0),
            "bodies": bodies,
            "ops_table": m.table,
            **({"c_function": spec.profile.c_name(m.op.name)} if spec.profile.prefix else {}),
            **({"noinstr": True} if m.op.noinstr else {}),
        })
    n = len(spec.ops)
    branches = [{"name": layout.branch_op_name(b), "index": n + k - 1, "backend": b,
                 "site_size": 5, "c_usage": f"linkfix_backend_is({b})"}
                for k, b in enumerate(spec.backends, start=1)]
    return {
        "format_version": FORMAT_VERSION,
        "arch": spec.arch.name,
        "machine": spec.arch.e_machine,
        "backends": list(spec.backends),
        "default_backend": spec.default_backend,
        "spec_hash": f"0x{spec.spec_hash():08x}",
        "site_rec_size": layout.SITE_REC_SIZE,
        "branch_rec_size": layout.BRANCH_REC_SIZE,
        "ops": ops,
        "branch_ops": branches,
        **spec.profile.canonical(),
    }


def _trade(m: OpModel, k: int) -> dict[str, object]:
    """Where alternative k's body runs and what its path executes (the dispatch's own
    cost is not counted for generic)."""
    a = m.alts[k]
    out: dict[str, object] = {"placement": a.how, "executed_insns": a.path_insns,
                              "executed_bytes": a.path_bytes,
                              "padding_insns": a.pad_insns}
    return out


# ------------------------------------------------------------------ rendering


def _env():  # type: ignore[no-untyped-def]
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render_all(spec: Spec, models: list[OpModel]) -> dict[str, bytes]:
    """Every output file's bytes, keyed by file name."""
    env = _env()
    arch = spec.arch
    ctx = {
        "spec": spec,
        "op_constants": [(op.name, op.name.upper(), op.index) for op in spec.ops]
        + [(layout.branch_op_name(b), f"BACKEND_IS_{b.upper()}", len(spec.ops) + k - 1)
           for k, b in enumerate(spec.backends, start=1)],
        "spec_hash": f"0x{spec.spec_hash():08x}",
        "arch": arch,
        "backends": [(k, b, b.upper()) for k, b in enumerate(spec.backends, start=1)],
        "default_index": spec.backend_index(spec.default_backend),
        "site_rec_size": layout.SITE_REC_SIZE,
        "branch_rec_size": layout.BRANCH_REC_SIZE,
        "n_ops": len(spec.ops),
        "models": models,
        "functions": [c_function(spec, m) for m in models],
        "prototypes": prototypes(spec, models),
        "inner_callees": inner_callees(models, {p.name for p in prototypes(spec, models)}),
        "regparm": arch.elf_class == 32,
        "branches": [(k, b, b.upper(), [c_string(x) for x in branch_text(spec, k)])
                     for k, b in enumerate(spec.backends, start=1)],
        "thunks": thunk_functions(spec, models),
        "body_functions": body_functions(models),
        "meta": layout.meta_asm_lines(meta(spec, models)),
        "repl": repl_copies(spec, models),
        "macros": [(m.op.name, gas_macro_lines(spec, m)) for m in models],
        "table_symbols": _table_symbols(spec, models),
    }
    out: dict[str, bytes] = {}
    for name in ("linkfix.h", "linkfix_asm.h", "linkfix_thunks.S", "linkfix_ops.c",
                 "linkfix_boot.c"):
        template = name + ".j2"
        if spec.profile.linux and name == "linkfix_thunks.S":
            template = "linkfix_thunks_linux.S.j2"
            ctx.update(_kernel_thunks(spec, models))
        out[name] = env.get_template(template).render(ctx).encode()
    out["linkfix.lds"] = LDSCRIPT.read_bytes()
    if spec.profile.linux:
        out["linkfix.lds.h"] = LDS_HEADER.read_bytes()
    out["linkfix.json"] = (json.dumps(manifest(spec, models), indent=2) + "\n").encode()
    return out


def _kernel_thunks(spec: Spec, models: list[OpModel]) -> dict[str, object]:
    """The linux profile's linkfix_thunks.S: headers and functions by section."""
    from linkfix.stubgen import kernelthunks

    fns = kernelthunks.functions(spec, models)
    sections = [(name, [f for f in fns if f.noinstr == noinstr])
                for name, noinstr in ((".text", False), ('.noinstr.text, "ax"', True))]
    return {"headers": kernelthunks.HEADERS, "sections": [s for s in sections if s[1]]}


@dataclass(frozen=True)
class TableSymbol:
    c_name: str  # the C identifier ops.c uses
    asm_name: str  # the link-time symbol


def _table_symbols(spec: Spec, models: list[OpModel]) -> dict[str, object]:
    """Symbols the ops tables name, declared in linkfix_ops.c through asm labels (a
    callee may be any assembler symbol, not only a C identifier)."""
    names: dict[str, TableSymbol] = {}
    rows: dict[str, list[str]] = {b: [] for b in spec.backends}
    for m in models:
        for backend in spec.backends:
            sym = m.table[backend]
            ts = names.setdefault(sym, TableSymbol(f"__lf_ref{len(names)}", sym))
            rows[backend].append(ts.c_name)
    return {"symbols": list(names.values()), "rows": rows,
            "default": rows[spec.default_backend]}
