"""The assembler text of a site: its call, its alternatives and its record.

One text serves every consumer: C inline asm (`%=` labels, `%` escaped), a GAS
macro (`\\@` labels) and the tests' plain assembly (any unique label suffix).
"""

from __future__ import annotations

from collections.abc import Callable

from linkfix import layout
from linkfix.body import is_label, rename_labels
from linkfix.opmodel import Alt, OpModel, dispatch_name
from linkfix.spec import Spec


def _byte_list(data: bytes) -> str:
    return ",".join(f"0x{b:02x}" for b in data)


def op_site_lines(m: OpModel, uid: str, esc: Callable[[str], str]) -> list[str]:
    """The site, its alternatives and its record, as assembler lines.

    `uid` makes labels unique per use (`%=` in C asm, `\\@` in a GAS macro);
    `esc` escapes body text for the consumer (`%` -> `%%` in C asm).

    Length guards are `.org` assertions, which GNU as and clang's integrated
    assembler both check after layout (clang cannot evaluate a label difference
    in an inline-asm `.if`); GNU as also gets a readable `.error`.
    """

    def org_assert(here: str, cond: str) -> str:
        # `.org here` is the current location (no bytes) while `cond` is false; one
        # byte back (an error in both assemblers) when it is true. A true comparison
        # is -1 in GNU as and LLVM alike; squared, the step is -1 whatever its sign,
        # so a wrong length can never become a byte of padding.
        return f"\t.org {here} - (({cond}) * ({cond}))"

    def gas_error(cond: str, message: str) -> list[str]:
        # `.gasversion.` is GNU as's predefined symbol: clang skips the block (a
        # skipped `.if` is not evaluated) and relies on the `.org` next to it.
        return ["\t.ifdef .gasversion.", f"\t.if {cond}", f'\t.error "{message}"',
                "\t.endif", "\t.endif"]

    op = m.op.name
    s, e = f".Llf_s_{uid}", f".Llf_e_{uid}"
    lines = [f"{s}:", f"\tcall {dispatch_name(op)}"]
    if m.pad:
        lines.append(f"\t.byte {_byte_list(m.pad)}")
    wrong_size = f"({e} - {s}) != {m.site_len}"
    lines += [f"{e}:",
              *gas_error(wrong_size, f"linkfix: site of op {op} is not {m.site_len} bytes"),
              org_assert(e, wrong_size),
              '\t.pushsection .linkfix.repl,"a"']
    for alt in m.alts:
        if not alt.present:
            continue
        r, q = f".Llf_r{alt.k}_{uid}", f".Llf_q{alt.k}_{uid}"
        lines.append(f"{r}:")
        # Escape the body first: the label names carry `uid` (`%=`), which must not be.
        code = rename_labels([esc(st) for st in alt.statements],
                             lambda n, k=alt.k: f".Llf_l{k}_{n}_{uid}")
        lines += [st if is_label(st) else f"\t{st}" for st in code]
        lines.append(f"{q}:")
        too_long = f"({q} - {r}) > {m.site_len}"
        if alt.guard == "if":
            lines += gas_error(too_long,
                               f"linkfix: op {op} backend {alt.name} body longer than its site")
        if alt.guard:
            # A body with branches ("org") has no length GNU as knows at `.if` time:
            # only the `.org`, checked once the branches are relaxed, covers it.
            lines.append(org_assert(q, too_long))
    lines.append("\t.popsection")
    lines += _record_lines(uid, m.op.index, m.site_len, layout.KIND_OP, m.alts)
    return lines


def branch_site_lines(spec: Spec, b: int) -> list[str]:
    """A `linkfix_backend_is(<backend b>)` site for C asm goto (labels yes / generic)."""
    uid = "%="
    s, e = f".Llf_s_{uid}", f".Llf_e_{uid}"
    alts = [Alt(0, "generic", "jmp", (), layout.FLAG_PRESENT | layout.FLAG_JMP, "")]
    for k, name in enumerate(spec.backends, start=1):
        flags = layout.FLAG_PRESENT | (layout.FLAG_JMP if k == b else 0)
        alts.append(Alt(k, name, "jmp" if k == b else "empty", (), flags, ""))
    lines = [
        f"{s}:",
        # Force rel32: GAS would relax a `jmp` to a near label to 2 bytes.
        "\t.byte 0xe9",
        f"\t.long %l[__lf_generic] - {e}",
        f"{e}:",
        '\t.pushsection .linkfix.repl,"a"',
    ]
    for alt in alts:
        r, q = f".Llf_r{alt.k}_{uid}", f".Llf_q{alt.k}_{uid}"
        lines.append(f"{r}:")
        if alt.kind == "jmp":
            target = "__lf_generic" if alt.k == 0 else "__lf_yes"
            lines += ["\t.byte 0xe9", f"\t.long %l[{target}] - {q}"]
        lines.append(f"{q}:")
    lines.append("\t.popsection")
    op_index = len(spec.ops) + b - 1
    lines += _record_lines(uid, op_index, 5, layout.KIND_BRANCH, tuple(alts))
    return lines


def _record_lines(uid: str, op_index: int, site_len: int, kind: int,
                  alts: tuple[Alt, ...] | list[Alt]) -> list[str]:
    lines = [
        '\t.pushsection .linkfix.sites,"a"',
        "\t.balign 4",
        f"\t.long .Llf_s_{uid} - .",
        f"\t.short {op_index}",
        f"\t.byte {site_len}, {kind}",
    ]
    for alt in alts:
        if alt.present:
            r, q = f".Llf_r{alt.k}_{uid}", f".Llf_q{alt.k}_{uid}"
            lines += [f"\t.long {r} - .", f"\t.byte {q} - {r}, {alt.flags}", "\t.short 0"]
        else:
            lines += ["\t.long 0", "\t.byte 0, 0", "\t.short 0"]
    lines.append("\t.popsection")
    return lines


def c_asm_escape(text: str) -> str:
    return text.replace("%", "%%")


def c_string(line: str) -> str:
    """One assembler line as a C string literal, newline included."""
    body = line.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t")
    return f'"{body}\\n"'
