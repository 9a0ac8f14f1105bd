"""The assembler text of a site: its call, its alternatives and its record.

One text serves every consumer: C inline asm (`%=` labels, `%` escaped), a GAS
macro (`\\@` labels) and the tests' plain assembly (any unique label suffix).
"""

from __future__ import annotations

from collections.abc import Callable

from linkfix import layout
from linkfix.stubgen.opmodel import OpModel, dispatch_name
from linkfix.stubgen.spec import Spec


def _byte_list(data: bytes) -> str:
    return ",".join(f"0x{b:02x}" for b in data)


def op_site_lines(m: OpModel, uid: str, esc: Callable[[str], str],
                  held: list[str] | None = None) -> list[str]:
    """The site (the dispatch call and its padding) and its record, as assembler lines.

    `uid` makes labels unique per use (`%=` in C asm, `\\@` in a GAS macro);
    `esc` escapes text for the consumer (`%` -> `%%` in C asm). The bodies are
    not here: linkfix_thunks.S stores one copy of each for every site.
    `held`: the site's own lines when it is written holding a backend's bytes
    (written.py; they start with the site's label), instead of the call.

    The length guard is an `.org` assertion, which GNU as and clang's integrated
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
    wrong_size = f"({e} - {s}) != {m.site_len}"
    if held is not None:
        # The stored copy's bytes, which gen-stubs measured: the `.org` guard alone
        # (no readable `.error`) leaves room for their extra lines (written.py).
        lines = list(held)  # bytes, symbols and the uid's own label: nothing to escape
        guard = []
    else:
        lines = [f"{s}:", f"\tcall {dispatch_name(op)}"]
        if m.pad:
            lines.append(f"\t.byte {_byte_list(m.pad)}")
        guard = gas_error(wrong_size, f"linkfix: site of op {op} is not {m.site_len} bytes")
    lines += [f"{e}:",
              *guard,
              org_assert(e, wrong_size),
              '\t.pushsection .linkfix.sites,"a"',
              "\t.balign 4",
              f"\t.long {s} - .",
              f"\t.short {m.op.index}",
              f"\t.byte {m.site_len}, {layout.op_check(m.op.index)}",  # the op, repeated
              "\t.popsection"]
    del esc  # no body text in a site any more: nothing to escape
    return lines


def branch_site_lines(spec: Spec, b: int, nop: str | None = None,
                      written: bool = False) -> list[str]:
    """A `linkfix_backend_is(<backend b>)` site for C asm goto (labels yes / generic).
    `written` (written.py): the site holds the jump to the true label, or, given
    `nop`, those bytes."""
    uid = "%="
    s, e = f".Llf_s_{uid}", f".Llf_e_{uid}"
    op_index = len(spec.ops) + b - 1
    if not written:
        site = ["\t.byte 0xe9", f"\t.long %l[__lf_generic] - {e}"]
    elif nop is None:
        site = ["\t.byte 0xe9", f"\t.long %l[__lf_yes] - {e}"]
    else:
        site = [f"\t.byte {nop}"]
    return [
        f"{s}:",
        # Force rel32: GAS would relax a `jmp` to a near label to 2 bytes.
        *site,
        f"{e}:",
        '\t.pushsection .linkfix.branches,"a"',
        "\t.balign 4",
        f"\t.long {s} - .",
        "\t.long %l[__lf_generic] - .",
        "\t.long %l[__lf_yes] - .",
        f"\t.short {op_index}",
        f"\t.byte {b}, {layout.KIND_BRANCH}",  # the backend tested, repeated
        "\t.long %l[__lf_generic] - .",  # both labels again (docs/FORMAT.md)
        "\t.long %l[__lf_yes] - .",
        "\t.popsection",
    ]


def repl_lines(label: str, code: bytes, fields: tuple, word: int) -> list[str]:
    """One stored copy in .linkfix.repl: its bytes, each relocated field as the
    link-time expression it names (`.long sym+A - .` for a PC-relative one)."""
    lines = [f"{label}:"]
    at = 0
    for pos, size, link in sorted(fields, key=lambda f: f[0]):
        call = link.pcrel and size == 4 and pos > at and code[pos - 1] == 0xE8 and \
            link.expr is not None and link.expr.endswith("-4")
        if call:
            # A call as the assembler writes it (R_X86_64_PLT32 where a `.long` would
            # give PC32): an --emit-relocs image then gets back the relocations of
            # its linked sites when it is patched to generic.
            if pos - 1 > at:
                lines.append(f"\t.byte {_byte_list(code[at:pos - 1])}")
            assert link.expr is not None
            lines.append(f"\tcall {link.expr[:-2]}")
            at = pos + size
            continue
        if pos > at:
            lines.append(f"\t.byte {_byte_list(code[at:pos])}")
        directive = {4: ".long", 8: ".quad"}.get(size)
        if directive is None or link.expr is None or (link.pcrel and size != 4):
            raise ValueError(f"{label}: cannot store a {size}-byte field at +{pos}")
        lines.append(f"\t{directive} ({link.expr}) - ." if link.pcrel
                     else f"\t{directive} {link.expr}")
        at = pos + size
    if at < len(code):
        lines.append(f"\t.byte {_byte_list(code[at:])}")
    return lines


def c_asm_escape(text: str) -> str:
    return text.replace("%", "%%")


def c_string(line: str) -> str:
    """One assembler line as a C string literal, newline included."""
    body = line.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t")
    return f'"{body}\\n"'
