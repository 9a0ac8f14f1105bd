"""`gen-stubs --written BACKEND`: sites that hold one backend's bytes as linked.

A reference build. Every op site is assembled holding exactly the bytes
`linkfix patch --target BACKEND` would write there (the backend's stored copy, its
relocated fields as link-time expressions), and every branch site the jump or NOP
that target gets; nothing else changes. The site's record, the tables and the
thunks are those of an ordinary build, so the image is still a linkfix image, and
patching it for BACKEND leaves every site as it is.

What it is for: objtool sees such a site as instructions written by hand, with no
alternatives, and so computes the unwind data a developer would have got by
writing the native instruction there. A kernel built this way and one built
ordinarily and then patched have the same layout, so their text and their ORC
tables can be compared address by address (integrations/linux/orc.py).

The layout is the same only if the compiler treats both asm statements alike. GCC
estimates an asm statement's size from its number of lines (inlining depends on
it), so a written site's text is padded with empty lines to the ordinary text's
line count (the written site drops the readable `.error` of the length guard, keeping
its `.org`, to make room for a copy's extra lines; a site whose copy still takes more
lines than the ordinary site is refused); its operands and clobbers are untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from linkfix.errors import BadInput
from linkfix.padding import NOPS

if TYPE_CHECKING:
    from linkfix.stubgen.opmodel import Alt, OpModel
    from linkfix.stubgen.spec import Spec


def check_backend(spec: Spec, backend: str) -> None:
    if backend not in spec.backends:
        raise BadInput(spec.path, f"--written {backend}: the spec has no backend "
                                  f"'{backend}' (it has: {', '.join(spec.backends)})")


def held(spec: Spec, m: OpModel) -> Alt | None:
    """The alternative a written site of m holds; None when it stays the generic call
    (the op has no body for the backend, as `linkfix patch` then leaves it)."""
    name = spec.profile.written
    assert name is not None
    alt = m.alts[spec.backend_index(name)]
    return alt if alt.present else None


def branch_bytes(spec: Spec, b: int) -> str | None:
    """What a written branch site testing backend b holds: None for the jump to the
    true label, else the byte list of the 5-byte NOP."""
    name = spec.profile.written
    assert name is not None
    if spec.backend_index(name) == b:
        return None
    return ",".join(f"0x{x:02x}" for x in NOPS[5])


def state(spec: Spec, models: list[OpModel]) -> dict[str, object]:
    """The header's state record of a written image, as `linkfix patch --target
    BACKEND` would leave it: patched for the backend, each op in the alternative its
    sites hold (generic where the op has no body for it), every branch pseudo-op at
    the backend."""
    name = spec.profile.written
    assert name is not None
    b = spec.backend_index(name)
    ops = tuple(b if m.alts[b].present else 0 for m in models)
    return {"target": b, "patched": 1, "op_state": ops + (b,) * len(spec.backends)}


def pad_lines(spec: Spec, lines: list[str], count: int, what: str) -> list[str]:
    """lines, then empty lines up to count (the ordinary site text's line count)."""
    if len(lines) > count:
        # The compiler would size the two asm statements differently (and could inline
        # differently): no reference build then.
        raise BadInput(spec.path, f"--written {spec.profile.written}: {what}: the site's "
                                  f"bytes take {len(lines)} assembler lines, more than the "
                                  f"{count} of its ordinary site, so the compiler would "
                                  f"not see the same statement")
    return lines + [""] * (count - len(lines))
