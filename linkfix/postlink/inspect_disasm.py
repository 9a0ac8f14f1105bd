"""Disassembly of site bytes for `linkfix inspect`, decoded once per layout.

The bytes an alternative puts at a site differ from site to site only in their
PC-relative fields (a call's rel32, a RIP-relative displacement, a jump's
target), and an instruction's length never depends on those fields. So the
bytes with the fields cut out (the *key*) name a `Layout`: the listing decoded
once by capstone, with every field instruction's text split around the one
value it shows (a branch's absolute target, a RIP displacement). Rendering a
site is then a dictionary look-up and a few hex formats.

Exactness: when a layout is made, each instruction is decoded again at other
addresses (and with other field values) and must give the same text, the
value excepted, formatted as this module formats it; an instruction that does
not is decoded by capstone at every site (`SLOW`). The layout must also render
the site it was made from exactly as capstone lists it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

BRANCH, RIPREL, SLOW, ADDRESS = range(4)  # ADDRESS: no field, but the text moves
_UNPACK = {1: struct.Struct("<b").unpack_from, 2: struct.Struct("<h").unpack_from,
           4: struct.Struct("<i").unpack_from}
# Targets a branch is decoded at to find its text around the value: above 2**31
# (a 32-bit displacement cannot make the probe address negative), and in 64-bit
# mode a kernel-style address above 2**63 and one above 2**32.
_BRANCH_PROBES = {32: (0xDA5A5A5A, 0x9C3C3C30, 0x1A5A5A50),
                  64: (0xDA5A5A5A, 0x9C3C3C30, 0xFFFFFFFF81A5A5A0, 0x7FFE5A5A5A58)}
_DISP_PROBES = (0x5A5A5A5A, -0x3C3C3C3C, 0x7FFFFFFF, -0x80000000, 10, -10)
_ADDR_PROBE = 0x1A5A5A50  # added to a site address to check an instruction ignores it


def jstr(text: str) -> str:
    """`text` as the inside of a JSON string (the escaping of a concatenation is the
    concatenation of the escapings)."""
    return json.dumps(text)[1:-1]


class Decoder:
    """capstone for one mode, with the per-instruction questions a layout asks."""

    def __init__(self, bits: int) -> None:
        import capstone

        self.bits = bits
        self.mask = (1 << bits) - 1
        self.cs = capstone.Cs(capstone.CS_ARCH_X86,
                              capstone.CS_MODE_64 if bits == 64 else capstone.CS_MODE_32)
        self.cs.detail = True

    def listing(self, code: bytes, address: int) -> list[str]:
        """What fixups.disassemble prints for `code` at `address`."""
        out = []
        pos = 0
        for ins in self.cs.disasm(code, address):
            out.append(f"{ins.mnemonic} {ins.op_str}".strip())
            pos = ins.address + ins.size - address
        if pos != len(code):
            out.append(f"(bad) {code[pos:].hex()}")
        return out

    def one(self, raw: bytes, address: int) -> str | None:
        """The text of the one instruction `raw` at `address`, or None."""
        for ins in self.cs.disasm(raw, address & self.mask, 1):
            if ins.size == len(raw):
                return f"{ins.mnemonic} {ins.op_str}".strip()
        return None

    def insns(self, code: bytes, address: int) -> list:  # type: ignore[type-arg]
        return list(self.cs.disasm(code, address))


@dataclass
class Piece:
    """One instruction of a layout whose text changes from site to site."""

    kind: int
    off: int  # instruction offset in the site bytes
    end: int  # its end
    pos: int = 0  # the field's offset in the site bytes
    size: int = 0  # the field's size (0: none)
    prefix: str = ""
    suffix: str = ""
    mask: int = 0
    dec: Decoder | None = None
    unpack: Callable[[bytes, int], tuple[int]] | None = None
    j_prefix: str = field(default="", init=False)
    j_suffix: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.j_prefix, self.j_suffix = jstr(self.prefix), jstr(self.suffix)
        if self.size:
            self.unpack = _UNPACK[self.size]

    def value(self, want: bytes, s: int) -> str | None:
        """The value's text, or None when capstone must decode this site's copy."""
        if self.kind == BRANCH:
            v = (s + self.end + self.unpack(want, self.pos)[0]) & self.mask  # type: ignore[misc]
            return f"{v:#x}" if v > 9 else None
        if self.kind == RIPREL:
            v = self.unpack(want, self.pos)[0]  # type: ignore[misc]
            if v > 9:
                return f"+ {v:#x}"
            return f"- {-v:#x}" if v < -9 else None
        return None

    def slow(self, want: bytes, s: int) -> str:
        assert self.dec is not None
        raw = bytes(want[self.off:self.end])
        got = self.dec.one(raw, s + self.off)
        return got if got is not None else f"(bad) {raw.hex()}"

    def text(self, want: bytes, s: int) -> str:
        v = self.value(want, s)
        return self.slow(want, s) if v is None else self.prefix + v + self.suffix

    def json(self, want: bytes, s: int) -> str:
        v = self.value(want, s)
        return jstr(self.slow(want, s)) if v is None else self.j_prefix + v + self.j_suffix


Part = str | Piece


Render = Callable[[bytes, int], str]


@dataclass
class Layout:
    """A decoded site listing: constant text, with pieces where sites differ.

    `text(want, s)` is the listing of site bytes `want` at `s` ("insn; insn");
    `json(want, s)` the same as the inside of a JSON array ('"insn", "insn"').
    """

    body_len: int  # bytes of body (the rest is padding)
    fields: tuple[tuple[int, int], ...]  # (pos, size) of the bytes cut out of the key
    text_parts: tuple[Part, ...]
    json_parts: tuple[Part, ...]
    text: Render = field(init=False, repr=False)
    json: Render = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.text = _renderer(self.text_parts, False)
        self.json = _renderer(self.json_parts, True)


def _renderer(parts: tuple[Part, ...], js: bool) -> Render:
    """A function rendering `parts`; the usual layouts (nothing moves, or one branch
    target or displacement between constant text) get a closure of their own."""
    pieces = [p for p in parts if isinstance(p, Piece)]
    if not pieces:
        const = "".join(parts)  # type: ignore[arg-type]
        return lambda _want, _s: const
    if len(pieces) == 1 and len(parts) <= 3:
        (pc,) = pieces
        at = parts.index(pc)
        head = "".join(parts[:at])  # type: ignore[arg-type]
        tail = "".join(parts[at + 1:])  # type: ignore[arg-type]
        pre = head + (pc.j_prefix if js else pc.prefix)
        suf = (pc.j_suffix if js else pc.suffix) + tail
        slow = pc.json if js else pc.text
        unpack, pos, end, mask = pc.unpack, pc.pos, pc.end, pc.mask
        if pc.kind == BRANCH:
            def branch(want: bytes, s: int) -> str:
                v = (s + end + unpack(want, pos)[0]) & mask  # type: ignore[misc]
                return f"{pre}{v:#x}{suf}" if v > 9 else head + slow(want, s) + tail
            return branch
        if pc.kind == RIPREL:
            def riprel(want: bytes, s: int) -> str:
                v = unpack(want, pos)[0]  # type: ignore[misc]
                if v > 9:
                    return f"{pre}+ {v:#x}{suf}"
                return f"{pre}- {-v:#x}{suf}" if v < -9 else head + slow(want, s) + tail
            return riprel
    funcs = [p if isinstance(p, str) else p.json if js else p.text for p in parts]

    def general(want: bytes, s: int) -> str:
        return "".join([f if f.__class__ is str else f(want, s)  # type: ignore[operator]
                        for f in funcs])
    return general


def key_function(fields: tuple[tuple[int, int], ...]) -> Callable[[bytes], bytes]:
    """The key of a site's bytes under a layout's fields: the bytes between them."""
    if not fields:
        return bytes
    if len(fields) == 1:
        (p, n), = fields
        e = p + n
        return lambda want: want[:p] + want[e:]
    cuts = []
    at = 0
    for p, n in fields:
        cuts.append(slice(at, p))
        at = p + n
    cuts.append(slice(at, None))
    return lambda want: b"".join([want[c] for c in cuts])


def _field_of(ins, bits: int) -> tuple[int, int, int] | None:  # noqa: ANN001 - capstone insn
    """(kind, offset in the instruction, size) of its PC-relative field, if any."""
    from capstone import CS_GRP_BRANCH_RELATIVE
    from capstone.x86 import X86_OP_MEM, X86_REG_RIP

    if CS_GRP_BRANCH_RELATIVE in ins.groups and ins.imm_size:
        return BRANCH, ins.imm_offset, ins.imm_size
    if bits == 64 and any(op.type == X86_OP_MEM and op.mem.base == X86_REG_RIP
                          for op in ins.operands):
        return RIPREL, ins.disp_offset, ins.disp_size
    return None


def _split(text: str, token: str) -> tuple[str, str] | None:
    if text.count(token) != 1:
        return None
    a, b = text.split(token)
    return a, b


def _branch_piece(dec: Decoder, raw: bytes, off: int, fpos: int, fsize: int) -> Piece | None:
    """The text of a relative branch around its target, checked at several targets
    reached with several field values (capstone reads a rel16 as unsigned, say)."""
    bits = 8 * fsize
    own = _UNPACK[fsize](raw, fpos)[0]
    around = None
    for disp in (own, 0, -1, 1 - (1 << (bits - 1)), (1 << (bits - 1)) - 1):
        code = raw[:fpos] + disp.to_bytes(fsize, "little", signed=True) + raw[fpos + fsize:]
        for probe in _BRANCH_PROBES[dec.bits]:
            got = dec.one(code, (probe - len(raw) - disp) & dec.mask)
            if got is None:
                return None
            if around is None:
                around = _split(got, f"{probe:#x}")
                if around is None:
                    return None
            elif got != f"{around[0]}{probe:#x}{around[1]}":
                return None
    assert around is not None
    return Piece(BRANCH, off, off + len(raw), off + fpos, fsize, around[0], around[1],
                 dec.mask, dec)


def _riprel_piece(dec: Decoder, raw: bytes, off: int, fpos: int, fsize: int,
                  s: int) -> Piece | None:
    """The text of a RIP-relative access around its signed displacement."""
    if fsize != 4:
        return None
    around = None
    for n, probe in enumerate(_DISP_PROBES):
        code = raw[:fpos] + struct.pack("<i", probe) + raw[fpos + 4:]
        got = dec.one(code, s + off + n * _ADDR_PROBE)  # the address must not matter
        if got is None:
            return None
        token = f"+ {probe:#x}" if probe > 0 else f"- {-probe:#x}"
        if around is None:
            around = _split(got, token)
            if around is None:
                return None
        elif got != f"{around[0]}{token}{around[1]}":
            return None
    assert around is not None
    return Piece(RIPREL, off, off + len(raw), off + fpos, fsize, around[0], around[1],
                 dec.mask, dec)


def make_layout(dec: Decoder, want: bytes, s: int, body_len: int) -> Layout:
    """Decode `want` (a site's bytes at `s`) into a layout that renders every site
    with the same key exactly as capstone would."""
    texts: list[Part] = []
    slow: list[Part] = []  # the same, every instruction decoded at every site
    fields: list[tuple[int, int]] = []
    pos = 0
    for ins in dec.insns(want, s):
        off = ins.address - s
        raw = bytes(want[off:off + ins.size])
        text = f"{ins.mnemonic} {ins.op_str}".strip()
        fld = _field_of(ins, dec.bits)
        piece: Piece | None
        if fld is None:
            piece = None if dec.one(raw, s + off + _ADDR_PROBE) == text else \
                Piece(ADDRESS, off, off + ins.size, dec=dec)
            slow.append(Piece(ADDRESS, off, off + ins.size, dec=dec))
        else:
            kind, fpos, fsize = fld
            fields.append((off + fpos, fsize))
            piece = (_branch_piece(dec, raw, off, fpos, fsize) if kind == BRANCH else
                     _riprel_piece(dec, raw, off, fpos, fsize, s))
            if piece is None:
                piece = Piece(SLOW, off, off + ins.size, off + fpos, fsize, dec=dec)
            slow.append(Piece(SLOW, off, off + ins.size, off + fpos, fsize, dec=dec))
        texts.append(text if piece is None else piece)
        pos = off + ins.size
    if pos != len(want):
        bad = f"(bad) {bytes(want[pos:]).hex()}"
        texts.append(bad)
        slow.append(bad)
    lay = _assemble(texts, tuple(fields), body_len)
    if lay.text(want, s) != "; ".join(dec.listing(want, s)):
        lay = _assemble(slow, tuple(fields), body_len)  # not what capstone says here
    return lay


def _assemble(texts: list[Part], fields: tuple[tuple[int, int], ...], body_len: int) -> Layout:
    text_parts: list[Part] = []
    json_parts: list[Part] = []
    for n, p in enumerate(texts):
        sep_t, sep_j = ("", '"') if n == 0 else ("; ", '", "')
        if isinstance(p, str):
            _add(text_parts, sep_t + p)
            _add(json_parts, sep_j + jstr(p))
        else:
            _add(text_parts, sep_t)
            _add(json_parts, sep_j)
            text_parts.append(p)
            json_parts.append(p)
    _add(json_parts, '"' if texts else "")
    return Layout(body_len, fields, tuple(x for x in text_parts if x != ""),
                  tuple(x for x in json_parts if x != ""))


def _add(parts: list[Part], text: str) -> None:
    if parts and isinstance(parts[-1], str):
        parts[-1] += text
    else:
        parts.append(text)


Entry = tuple[tuple[tuple[int, int], ...], Callable[[bytes], bytes], dict[bytes, int]]


@dataclass
class LayoutCache:
    """Layouts by (record shape, alternative) and key; each gets a small id.

    Per (shape, alternative) there is one table per set of field positions
    (usually one: a rel8 jump widened at some sites only makes two).
    """

    dec: Decoder
    layouts: list[Layout] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # the record shape of each layout
    _tables: dict[tuple[int, int], list[Entry]] = field(default_factory=dict)

    def entries(self, shape: int, k: int) -> list[Entry]:
        got = self._tables.get((shape, k))
        if got is None:
            got = self._tables[(shape, k)] = []
        return got

    @staticmethod
    def find(entries: list[Entry], want: bytes) -> int:
        for _f, keyf, table in entries:
            got = table.get(keyf(want))
            if got is not None:
                return got
        return -1

    def add(self, shape: int, k: int, want: bytes, s: int, body_len: int) -> int:
        """A new layout for `want` (site bytes at `s` that `find` did not know)."""
        entries = self.entries(shape, k)
        lay = make_layout(self.dec, want, s, body_len)
        n = len(self.layouts)
        self.layouts.append(lay)
        self.owners.append(shape)
        for fields, keyf, table in entries:
            if fields == lay.fields:
                table[keyf(want)] = n
                return n
        keyf = key_function(lay.fields)
        entries.append((lay.fields, keyf, {keyf(want): n}))
        return n
