"""Compile-time models of patched sites, generated from gen-stubs' linkfix.json.

A model site holds exactly the bytes `linkfix patch --target native` writes
(the native body + linkfix.padding), but its asm statement declares whatever
clobbers the caller asks for: the op's own (linkfix), only %rax (2007) or every
caller-saved register (a C call). That isolates what the compiler does around a
site from what the site executes.
"""

from __future__ import annotations

from collections.abc import Callable

from linkfix.arch import ARCHES
from linkfix.padding import pad


def site_text(body_text: str, body_len: int, site_len: int) -> str:
    """The asm template of a site: body, then the one-instruction padding."""
    text = body_text.replace("%", "%%").replace(";", "\\n\\t")
    padding = pad(site_len - body_len)
    if padding:
        text += "\\n\\t.byte " + ",".join(f"0x{b:02x}" for b in padding)
    return text


def header(arch_name: str, manifest: dict, name: Callable[[str], str],
           clobbers: Callable[[dict], list[str]],
           body: Callable[[dict], tuple[str, int]] | None = None) -> str:
    """C macros, one per op, `name(op)(args...)`: the op's patched native site.

    `clobbers(op)` lists the registers the site declares clobbered; `body(op)`
    may replace the native body (text, length) of an op.
    """
    arch = ARCHES[arch_name]
    out = []
    for op in manifest["ops"]:
        if body is not None:
            text, length = body(op)
        else:
            text, length = op["bodies"]["native"]["text"], op["bodies"]["native"]["length"]
        tmpl = site_text(text, length, op["site_size"])
        clob = [r for r in clobbers(op)]
        outputs, inputs, decls = [], [], []
        params = [f"__x{i}" for i in range(len(op["args"]))]
        for i, _arg in enumerate(op["args"]):
            reg = arch.arg_regs[i]
            con = arch.asm_constraints[reg]
            decls.append(f"unsigned long __a{i} = (unsigned long)(__x{i});")
            if reg in clob:  # an input the site may clobber: an in/out operand
                outputs.append(f'"+{con}"(__a{i})')
                clob.remove(reg)
            else:
                inputs.append(f'"{con}"(__a{i})')
        if op["returns"]:
            outputs.insert(0, '"=a"(__r)')
            decls.insert(0, "unsigned long __r;")
            if arch.ret_reg in clob:
                clob.remove(arch.ret_reg)
        elif arch.ret_reg in clob:
            decls.insert(0, "unsigned long __r;")
            outputs.insert(0, '"=a"(__r)')
            clob.remove(arch.ret_reg)
        clob_s = ", ".join([f'"{r}"' for r in clob] + ['"memory"', '"cc"'])
        stmt = (f'__asm__ __volatile__("{tmpl}" : {", ".join(outputs)} : '
                f'{", ".join(inputs)} : {clob_s});')
        tail = " __r;" if op["returns"] else " (void)0;"
        if not op["returns"] and "__r" in " ".join(decls):
            stmt += " (void)__r;"
        out.append(f"#define {name(op['name'])}({', '.join(params)}) "
                   f"({{ {' '.join(decls)} {stmt}{tail} }})")
    return "\n".join(out) + "\n"
