"""Which bytes of a body must change when the body moves from .linkfix.repl to a site.

A body is decoded with capstone once per distinct byte string (bodies of one op
and backend differ between sites only in the values of their PC-relative
fields, and the hot loop recognises them by their `skeleton`, the bytes with
those fields zeroed). A PC-relative field is a rel8/rel16/rel32 branch
displacement (CALL, JMP, Jcc, LOOP, JrCXZ, XBEGIN) or a RIP-relative memory
displacement. Fields whose target lies inside the body (or at its end, i.e.
"continue after the site") move with the body and keep their value; the others
point somewhere fixed and get `old + (body_addr - site_addr)`.
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
    widen_opcode: bytes | None  # rel32 form's opcode when this is a widenable rel8 jump
    text: str


@dataclass(frozen=True)
class Code:
    body: bytes
    insns: tuple[Insn, ...]
    external: tuple[Field, ...]
    skeleton: bytes  # body with external fields zeroed

    @property
    def simple(self) -> bool:
        """Every moved field is 32-bit: relocation is `old + delta` in place, no widening."""
        return all(f.size == 4 for f in self.external)

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
        widen = None
        if ins.size == 2 and raw[0] == 0xEB:
            widen = b"\xe9"
        elif ins.size == 2 and 0x70 <= raw[0] <= 0x7F:
            widen = bytes((0x0F, 0x80 + raw[0] - 0x70))
        insns.append(Insn(pos, ins.size, raw, fld, widen, f"{ins.mnemonic} {ins.op_str}".strip()))
        pos = end
    if pos != len(body):
        raise FixupError(f"body does not decode at +{pos:#x} ({body[pos:pos + 4].hex()})")
    external = tuple(i.field for i in insns if i.field is not None and not i.field.internal)
    skel = bytearray(body)
    for f in external:
        skel[f.pos:f.pos + f.size] = bytes(f.size)
    return Code(body, tuple(insns), external, bytes(skel))


def _widenable(code: Code) -> set[int]:
    return {i for i, ins in enumerate(code.insns)
            if ins.widen_opcode is not None and ins.field is not None and not ins.field.internal}


def _layout(code: Code, widen: set[int]) -> tuple[list[int], int]:
    new_off = []
    pos = 0
    for i, ins in enumerate(code.insns):
        new_off.append(pos)
        pos += len(ins.widen_opcode or b"") + 4 if i in widen else ins.size
    return new_off, pos


def wrap32(value: int) -> int:
    """A 32-bit displacement modulo 2**32: i386 address arithmetic wraps around."""
    return (value + 0x80000000) % 0x100000000 - 0x80000000


def relocate(code: Code, body: bytes, delta: int, room: int, widen_all: bool = False,
             bits: int = 64) -> bytes:
    """The body's bytes for execution at `body_addr - delta`, widening rel8 jumps if needed.

    `body` is this site's copy (same skeleton as `code.body`, its own field values);
    `room` is the site length. A rel8 jump out of the body is widened to its rel32
    form only when its displacement does not fit (or always, with `widen_all`).
    Raises FixupError when a field does not fit.
    """
    widen: set[int] = _widenable(code) if widen_all else set()
    while True:
        new_off, total = _layout(code, widen)
        boundary = {ins.off: new_off[i] for i, ins in enumerate(code.insns)}
        boundary[len(code.body)] = total
        if total > room:
            raise FixupError(f"widening rel8 jumps needs {total} bytes, the site has {room}")
        out = bytearray()
        retry = False
        for i, ins in enumerate(code.insns):
            f = ins.field
            if i in widen:
                assert ins.widen_opcode is not None
                out += ins.widen_opcode + bytes(4)
                fpos, fsize = new_off[i] + len(ins.widen_opcode), 4
                end_new = fpos + 4
            else:
                out += body[ins.off:ins.off + ins.size]
                if f is None:
                    continue
                fpos, fsize = new_off[i] + f.pos - ins.off, f.size
                end_new = new_off[i] + ins.size
            assert f is not None
            (disp,) = struct.unpack_from(_FMT[f.size], body, f.pos)
            target = ins.off + ins.size + disp  # body-relative
            if f.internal:
                if target not in boundary:
                    raise FixupError(f"'{ins.text}' jumps into the middle of an instruction")
                value = boundary[target] - end_new
            else:
                value = target + delta - end_new
            if fsize == 4 and bits == 32:
                value = wrap32(value)
            lo, hi = _LIMITS[fsize]
            if not lo <= value <= hi:
                if ins.widen_opcode is not None and i not in widen:
                    widen.add(i)
                    retry = True
                    break
                raise FixupError(f"'{ins.text}': displacement {value:#x} does not fit in "
                                 f"{fsize * 8} bits at the site")
            struct.pack_into(_FMT[fsize], out, fpos, value)
        if not retry:
            return bytes(out)


# A site farther than this from its body overflows every rel8 jump out of the body
# (|disp| <= 127 + 255 + 128), so all of them are widened, whatever the layout.
FAR = 512


@dataclass(frozen=True)
class FieldPlan:
    """How to relocate a body without decoding: new bytes = template + fields.

    Each field: (new_pos, old_pos, old_size, new_size, const); its value at a
    site is `old_value + delta + const`. `min_delta` is the smallest |delta| for
    which the plan is the one `relocate` would choose (0: any).
    """

    length: int
    fields: tuple[tuple[int, int, int, int, int], ...]
    min_delta: int


def field_plan(code: Code) -> FieldPlan | None:
    """The decode-free relocation of a body, or None when it needs the general path."""
    widen = _widenable(code)
    for i, ins in enumerate(code.insns):
        f = ins.field
        if f is not None and not f.internal and f.size != 4 and i not in widen:
            return None  # a rel16 or unwidenable rel8 field out of the body
    new_off, total = _layout(code, widen)
    fields = []
    for i, ins in enumerate(code.insns):
        f = ins.field
        if f is None or f.internal:
            continue
        if i in widen:
            assert ins.widen_opcode is not None
            new_pos, new_size = new_off[i] + len(ins.widen_opcode), 4
            new_end = new_pos + 4
        else:
            new_pos, new_size = new_off[i] + f.pos - ins.off, f.size
            new_end = new_off[i] + ins.size
        fields.append((new_pos, f.pos, f.size, new_size, ins.off + ins.size - new_end))
    return FieldPlan(total, tuple(fields), FAR if widen else 0)


def size_format(size: int) -> str:
    return _FMT[size]


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
