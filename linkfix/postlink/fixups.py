"""Which fields of a stored copy are PC-relative, from its decoded machine code.

A copy is decoded with capstone once (cached by its bytes). A PC-relative field
is a rel8/rel16/rel32 branch displacement (CALL, JMP, Jcc, LOOP, JrCXZ, XBEGIN)
or a RIP-relative memory displacement. Fields whose target lies inside the copy
(or at its end) move with it and keep their value; the others point somewhere
fixed, and copies.py requires them to be exactly the relocated fields the
header records.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_FMT = {1: "<b", 2: "<h", 4: "<i"}
_LIMITS = {1: (-0x80, 0x7F), 2: (-0x8000, 0x7FFF), 4: (-0x80000000, 0x7FFFFFFF)}


class FixupError(ValueError):
    """A body that cannot be placed at a site; the message names no site (the caller does)."""


@dataclass(frozen=True)
class Field:
    pos: int  # byte offset in the body
    size: int  # 1, 2 or 4 bytes
    internal: bool  # target inside [0, body_len]: moves with the body


@dataclass(frozen=True)
class Insn:
    off: int
    size: int
    raw: bytes
    field: Field | None
    text: str


@dataclass(frozen=True)
class Code:
    body: bytes
    insns: tuple[Insn, ...]
    external: tuple[Field, ...]
    skeleton: bytes  # body with external fields zeroed

    def ext_positions(self) -> tuple[int, ...]:
        return tuple(f.pos for f in self.external)


_CS: dict[int, object] = {}
_CACHE: dict[tuple[int, bytes], Code] = {}


def disassembler(bits: int):  # noqa: ANN202 - capstone's type, imported lazily
    cs = _CS.get(bits)
    if cs is None:
        import capstone

        mode = capstone.CS_MODE_64 if bits == 64 else capstone.CS_MODE_32
        cs = capstone.Cs(capstone.CS_ARCH_X86, mode)
        cs.detail = True
        _CS[bits] = cs
    return cs


def analyze(body: bytes, bits: int) -> Code:
    """Decode `body` (cached by its bytes); raises FixupError when it does not decode."""
    key = (bits, body)
    got = _CACHE.get(key)
    if got is None:
        got = _CACHE[key] = _analyze(body, bits)
    return got


def _analyze(body: bytes, bits: int) -> Code:
    from capstone import CS_GRP_BRANCH_RELATIVE
    from capstone.x86 import X86_OP_MEM, X86_REG_RIP

    cs = disassembler(bits)
    insns = []
    pos = 0
    for ins in cs.disasm(body, 0):  # type: ignore[attr-defined]
        if ins.address != pos:
            break
        end = pos + ins.size
        field = None
        if CS_GRP_BRANCH_RELATIVE in ins.groups and ins.imm_size:
            fpos, fsize = pos + ins.imm_offset, ins.imm_size
            field = (fpos, fsize)
        elif bits == 64 and any(op.type == X86_OP_MEM and op.mem.base == X86_REG_RIP
                                for op in ins.operands):
            field = (pos + ins.disp_offset, ins.disp_size)
        fld = None
        if field is not None:
            fpos, fsize = field
            if fsize not in _FMT:
                raise FixupError(f"unsupported {fsize}-byte displacement in "
                                 f"'{ins.mnemonic} {ins.op_str}'")
            (disp,) = struct.unpack_from(_FMT[fsize], body, fpos)
            target = end + disp
            fld = Field(fpos, fsize, 0 <= target <= len(body))
        raw = bytes(body[pos:end])
        insns.append(Insn(pos, ins.size, raw, fld, f"{ins.mnemonic} {ins.op_str}".strip()))
        pos = end
    if pos != len(body):
        raise FixupError(f"body does not decode at +{pos:#x} ({body[pos:pos + 4].hex()})")
    external = tuple(i.field for i in insns if i.field is not None and not i.field.internal)
    skel = bytearray(body)
    for f in external:
        skel[f.pos:f.pos + f.size] = bytes(f.size)
    return Code(body, tuple(insns), external, bytes(skel))


def disassemble(body: bytes, bits: int, address: int) -> list[str]:
    """Human-readable listing of `body` at `address` (for inspect)."""
    cs = disassembler(bits)
    out = []
    pos = 0
    for ins in cs.disasm(body, address):  # type: ignore[attr-defined]
        out.append(f"{ins.mnemonic} {ins.op_str}".strip())
        pos = ins.address + ins.size - address
    if pos != len(body):
        out.append(f"(bad) {body[pos:].hex()}")
    return out
