"""linkfix_thunks.S in the linux profile: the generated functions in kernel style.

Every function (dispatcher, callee-save thunk, out-of-line body) is written the way
arch/x86 assembly is in Linux 6.1, so that objtool (`--ibt --orc --retpoline
--rethunk --noinstr`, or `--stackval` with frame pointers) finds nothing to report:

* `SYM_FUNC_START_NOALIGN`/`SYM_FUNC_END` (<linux/linkage.h>): the symbol, its
  type and size, and an ENDBR first (x86's SYM_FUNC_START* emit it), since the ops
  tables store these addresses and IBT needs an ENDBR wherever an indirect call
  lands;
* `RET` (the return thunk under CONFIG_RETHUNK), never a bare `ret`;
* `FRAME_BEGIN`/`FRAME_END` (<asm/frame.h>, empty without CONFIG_FRAME_POINTER)
  around every function that calls;
* a dispatcher calls through linkfix_ops with `CALL_NOSPEC rax`
  (<asm/nospec-branch.h>: `call __x86_indirect_thunk_rax` under CONFIG_RETPOLINE);
* an op marked `noinstr` has its functions in `.noinstr.text`, and its dispatcher
  makes no indirect call at all (objtool refuses one in noinstr code, a retpoline
  thunk included): it compares linkfix_current_backend with each backend and calls
  that backend's ops-table function directly, so objtool also checks that every
  function it may reach is noinstr;
* `EXPORT_SYMBOL` (<asm/export.h>) for each: a module's sites and alternatives
  call them;
* the 4 bytes before each function are a NOP marked ANNOTATE_NOENDBR. A stored
  copy of a `call f` (in .linkfix.repl) and the header's recorded target of that
  call are data relocations to `f - 4` (R_X86_64_PLT32/PC64 with addend -4, which
  objtool does not adjust in a data section); `f - 4` must therefore be an
  instruction objtool accepts as a target, and that NOP is one. Making
  .linkfix.repl executable would not be enough: the header (.linkfix.meta) is
  data and names the same targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from linkfix.stubgen.body import KIND_CALL, is_label, rename_labels
from linkfix.stubgen.opmodel import body_fn_name, dispatch_name

if TYPE_CHECKING:
    from linkfix.stubgen.opmodel import OpModel
    from linkfix.stubgen.spec import Spec

HEADERS = ("linux/linkage.h", "linux/objtool.h", "asm/export.h", "asm/frame.h",
           "asm/nospec-branch.h")


@dataclass(frozen=True)
class KernelFunction:
    name: str
    noinstr: bool  # in .noinstr.text
    lines: tuple[str, ...]  # the body, between SYM_FUNC_START_NOALIGN and SYM_FUNC_END


def _framed(regs: tuple[str, ...], middle: list[str]) -> list[str]:
    """Frame, saved registers, `middle`, restored registers, frame, RET."""
    return ["\tFRAME_BEGIN", *(f"\tpush %{r}" for r in regs), *middle,
            *(f"\tpop %{r}" for r in reversed(regs)), "\tFRAME_END", "\tRET"]


def _dispatch(spec: Spec, m: OpModel) -> list[str]:
    if not m.op.noinstr:
        # %rax: never an argument register; saved, or free (a clobber or the result)
        return _framed(m.saved, [f"\tmovq linkfix_ops+{spec.arch.word * m.op.index}(%rip), "
                                 f"%rax", "\tCALL_NOSPEC rax"])
    default = m.table[spec.default_backend]
    done = f".Llf_d_{m.op.name}_done"
    tests: list[str] = []
    calls: list[str] = []
    labels: dict[str, str] = {}  # target -> its call's label (backends may share one)
    for k, backend in enumerate(spec.backends, start=1):
        target = m.table[backend]
        if target == default:
            continue
        if target not in labels:
            labels[target] = f".Llf_d_{m.op.name}_{k}"
            calls += [f"\tjmp {done}", f"{labels[target]}:", f"\tcall {target}"]
        tests += [f"\tcmpb ${k}, linkfix_current_backend(%rip)", f"\tje {labels[target]}"]
    middle = [*tests, f"\tcall {default}", *calls]
    if calls:
        middle.append(f"{done}:")
    return _framed(m.saved, middle)


def functions(spec: Spec, models: list[OpModel]) -> list[KernelFunction]:
    """Dispatchers and thunks, then out-of-line bodies, in op order."""
    out: list[KernelFunction] = []
    for m in models:
        noinstr = m.op.noinstr
        out.append(KernelFunction(dispatch_name(m.op.name), noinstr,
                                  tuple(_dispatch(spec, m))))
        for t in m.thunks:
            out.append(KernelFunction(t.name, noinstr,
                                      tuple(_framed(m.saved, [f"\tcall {t.callee}"]))))
    for m in models:
        for backend, body in m.bodies.items():
            if body.kind == KIND_CALL:
                continue
            fn = body_fn_name(m.op.name, backend)
            code = rename_labels(body.statements, lambda n, fn=fn: f".L{fn}_{n}")
            lines = [st if is_label(st) else f"\t{st}" for st in code]
            if any(st.startswith("call ") for st in code):
                lines = ["\tFRAME_BEGIN", *lines, "\tFRAME_END"]
            out.append(KernelFunction(fn, m.op.noinstr, (*lines, "\tRET")))
    return out
