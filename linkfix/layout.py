"""The binary layout of linkfix's tables (docs/FORMAT.md), for writers and readers."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"LINKFIX\0"
VERSION = 4

META_SECTION = ".linkfix.meta"
SITES_SECTION = ".linkfix.sites"
BRANCHES_SECTION = ".linkfix.branches"
REPL_SECTION = ".linkfix.repl"

KIND_OP = 0
KIND_BRANCH = 1

FLAG_PRESENT = 0x1
FLAG_CALL = 0x2  # the body is one direct `call` (a C function or its callee-save thunk)
FLAG_JMP = 0x4  # a branch site's jump to one of its own labels (no stored copy)
FLAG_OOL = 0x8  # a `call` to the out-of-line copy of a body too long for the site
FLAGS_KNOWN = 0xF

GENERIC = 0  # alternative index of the dispatch call

# magic, version, machine, n_ops, n_backends, site_rec_size, names_size, spec_hash,
# target, patched, names_check
META_FIXED = struct.Struct("<8sHHHHHHIBBH")
META_STATE_OFFSET = META_FIXED.size  # 28
assert META_STATE_OFFSET == 28

SITE = struct.Struct("<iHBB")  # op site: site, op, site_len, check (op_check(op))
SITE_REC_SIZE = SITE.size  # 8
# site, generic target, "true" target, op, the backend it tests (1-based), kind, then
# the generic and "true" targets again. A label has no other description in the
# image (the C code behind it tests a variable, it does not jump there), so each
# is written twice, as two link-time words: one moved without the other is refused.
BRANCH = struct.Struct("<iiiHBBii")
BRANCH_REC_SIZE = BRANCH.size  # 24
# copy, crc, len, flags, n_fields, body_len (before the padding), first field, 0
BODY = struct.Struct("<iIBBBBHH")


def op_check(op: int) -> int:
    """The last byte of an op site record: the op's low byte inverted. It repeats
    the op, so a record whose op alone changed is refused, not followed."""
    return ~op & 0xFF


def site_rec_size(n_backends: int = 0) -> int:
    """Bytes of an op site record (fixed since format 3; the argument is ignored)."""
    return SITE_REC_SIZE


def branch_op_name(backend: str) -> str:
    return f"backend_is({backend})"


# The table bounds the header records by link-time relocation (self-relative
# s32 each), and the names the linker script gives them. A section header or
# symbol that disagrees is corruption.
BOUND_SYMBOLS = ("__linkfix_sites_start", "__linkfix_sites_end",
                 "__linkfix_branches_start", "__linkfix_branches_end",
                 "__linkfix_repl_start", "__linkfix_repl_end")
BOUNDS = struct.Struct("<6i")


FIELD_PCREL = 0x80  # in a field's size byte: the relocation is PC-relative
FIELD_UNRECORDED = 0x40  # no target recorded (a branch site's own label)


@dataclass(frozen=True)
class Link:
    """Where the link points one relocated field of a body.

    gen-stubs writes `expr` (the relocation's symbol and addend) into the header
    as a link-time difference; a parsed header (or a test writing one) holds the
    resolved `target`, S + A: an absolute field must hold it, a PC-relative one
    hold it minus its own address. Neither: nothing recorded.
    """

    pcrel: bool
    expr: str | None = None
    target: int | None = None

    @property
    def recorded(self) -> bool:
        return self.expr is not None or self.target is not None


@dataclass(frozen=True)
class BodyDigest:
    """What gen-stubs assembled for one alternative of one op.

    `crc` is the CRC32 of the body with every relocated field (`fields`, as
    (position, size)) zeroed: the bytes the link cannot change; `links` says,
    per field, where the link points it.
    """

    crc: int
    length: int
    fields: tuple[tuple[int, int], ...]
    links: tuple[Link, ...] = ()


ABSENT = BodyDigest(0, 0, ())


def masked(code: bytes, fields: tuple[tuple[int, int], ...]) -> bytes:
    out = bytearray(code)
    for pos, size in fields:
        out[pos:pos + size] = bytes(size)
    return bytes(out)


def body_digest(code: bytes, fields: tuple[tuple[int, int], ...],
                links: tuple[Link, ...] = ()) -> BodyDigest:
    """`links`, one per field (in `fields` order); default: PC-relative, unrecorded."""
    links = links or tuple(Link(True) for _ in fields)
    order = sorted(range(len(fields)), key=lambda j: fields[j])
    return BodyDigest(zlib.crc32(masked(code, fields)), len(code),
                      tuple(fields[j] for j in order), tuple(links[j] for j in order))


def digest_matches(d: BodyDigest, code: bytes) -> bool:
    """Does `code` (a linked copy) hold what gen-stubs assembled, up to its relocated fields?"""
    if len(code) != d.length:
        return False
    if any(pos + size > len(code) for pos, size in d.fields):
        return False
    return zlib.crc32(masked(code, d.fields)) == d.crc


def wrong_field(d: BodyDigest, code: bytes, address: int) -> int | None:
    """The position of the first relocated field of `code` (a copy at `address`) that
    does not point where the link pointed it, or None."""
    for (pos, size), link in zip(d.fields, d.links, strict=True):
        if link.target is None:
            continue
        mask = (1 << (8 * size)) - 1
        value = int.from_bytes(code[pos:pos + size], "little")
        if link.pcrel:
            value += address + pos
        if (value - link.target) & mask:
            return pos
    return None


@dataclass(frozen=True)
class AltEntry:
    """Alternative k of one op, as the header's body table records it.

    `digest` describes the stored copy (every present op alternative stores
    exactly its site's bytes, padding included; a branch op's jumps store
    nothing). gen-stubs names the copy by `label`; a parsed header (or a test
    writing one) holds its address in `addr`.
    """

    flags: int
    digest: BodyDigest = ABSENT
    label: str | None = None
    addr: int | None = None
    body_len: int = 0  # bytes of body (its prefixes included) before the padding

    @property
    def present(self) -> bool:
        return bool(self.flags & FLAG_PRESENT)

    @property
    def stored(self) -> bool:
        return self.label is not None or self.addr is not None


ABSENT_ALT = AltEntry(0)


@dataclass(frozen=True)
class Meta:
    machine: int
    backends: tuple[str, ...]  # backend 1..n; index 0 (generic) is implicit
    ops: tuple[str, ...]  # real ops then one branch pseudo-op per backend
    spec_hash: int
    target: int = 0
    patched: int = 0
    op_state: tuple[int, ...] = ()
    # alts[op][k]: alternative k of op (k = 0 generic); ABSENT_ALT where there is none
    alts: tuple[tuple[AltEntry, ...], ...] = ()
    # sites, branches, repl start/end as absolute addresses (parsed images only)
    bounds: tuple[int, int, int, int, int, int] | None = None

    @property
    def n_real_ops(self) -> int:
        return len(self.ops) - len(self.backends)

    @property
    def n_alts(self) -> int:
        return len(self.backends) + 1

    def alt(self, op: int, k: int) -> AltEntry:
        row = self.alts[op] if op < len(self.alts) else ()
        return row[k] if k < len(row) else ABSENT_ALT

    def names_blob(self) -> bytes:
        return b"".join(n.encode() + b"\0" for n in (*self.backends, *self.ops))

    def names_check(self) -> int:
        return names_check(self.names_blob())

    def head(self) -> bytes:
        """Fixed header, state record and names, padded to 4: the bytes before the bounds."""
        names = self.names_blob()
        state = self.op_state or (0,) * len(self.ops)
        head = META_FIXED.pack(
            MAGIC, VERSION, self.machine, len(self.ops), len(self.backends),
            SITE_REC_SIZE, len(names), self.spec_hash, self.target, self.patched,
            names_check(names),
        )
        out = head + bytes(state) + names
        return out + b"\0" * (-len(out) % 4)

    @property
    def word(self) -> int:
        return 8 if self.machine == 62 else 4

    def _entries(self) -> list[tuple[AltEntry, bytes]]:
        """Per (op, k) in order: the entry and its 12 bytes after the copy's address."""
        out = []
        n_fields = 0
        for op in range(len(self.ops)):
            for k in range(self.n_alts):
                e = self.alt(op, k)
                d = e.digest
                first = n_fields if d.fields else 0
                if first > 0xFFFF:
                    raise ValueError("more than 65535 relocated fields in the bodies")
                n_fields += len(d.fields)
                out.append((e, BODY.pack(0, d.crc, d.length, e.flags, len(d.fields), e.body_len,
                                         first, 0)[4:]))
        return out

    def _fields(self) -> tuple[bytes, list[Link]]:
        """The field list after the body table, padded to 4, and the links to record."""
        fields = bytearray()
        links: list[Link] = []
        for op in range(len(self.ops)):
            for k in range(self.n_alts):
                d = self.alt(op, k).digest
                for (pos, size), link in zip(d.fields, d.links, strict=True):
                    flags = (FIELD_PCREL if link.pcrel else 0) | \
                        (0 if link.recorded else FIELD_UNRECORDED)
                    fields += bytes((pos, size | flags))
                    if link.recorded:
                        links.append(link)
        return bytes(fields) + b"\0" * (-len(fields) % 4), links

    def table_offset(self) -> int:
        """Where the body table starts, from the header's start."""
        return len(self.head()) + BOUNDS.size

    def encode(self, at: int = 0, bounds: tuple[int, ...] = (0,) * 6) -> bytes:
        """The whole header placed at address `at`, every address resolved (tests)."""
        head = self.head()
        base = at + len(head)
        out = bytearray(head)
        out += BOUNDS.pack(*(b - (base + 4 * j) if b else 0 for j, b in enumerate(bounds)))
        for e, rest in self._entries():
            here = at + len(out)
            out += struct.pack("<i", e.addr - here if e.addr is not None else 0) + rest
        fields, links = self._fields()
        out += fields
        fmt = "<q" if self.word == 8 else "<i"
        mask = (1 << (8 * self.word)) - 1
        for link in links:
            value = ((link.target or 0) - (at + len(out))) & mask
            if value >> (8 * self.word - 1):
                value -= 1 << (8 * self.word)
            out += struct.pack(fmt, value)
        return bytes(out)

    def size(self) -> int:
        fields, links = self._fields()
        return self.table_offset() + BODY.size * len(self.ops) * self.n_alts + len(fields) + \
            self.word * len(links)


def names_check(blob: bytes) -> int:
    """The 16-bit check of the name table the header carries (low half of its CRC32):
    names swapped or edited in the image no longer match it."""
    return zlib.crc32(blob) & 0xFFFF


def encode_state(target: int, patched: int, op_state: list[int] | tuple[int, ...],
                 check: int) -> bytes:
    """The bytes from META offset 24 on: the state record, the name check kept."""
    return bytes((target, patched)) + struct.pack("<H", check) + bytes(op_state)


STATE_OFFSET = 24


def meta_asm_lines(meta: Meta, symbols: tuple[str, ...] = BOUND_SYMBOLS) -> list[str]:
    """The header as assembler lines: bytes, with the bounds, the copies' addresses and
    the fields' targets as link-time differences."""
    def rows(data: bytes) -> list[str]:
        return [".byte " + ",".join(f"0x{b:02x}" for b in data[i:i + 12])
                for i in range(0, len(data), 12)]

    lines = [*rows(meta.head()), *(f".long {sym} - ." for sym in symbols)]
    for e, rest in meta._entries():
        lines.append(f".long {e.label} - ." if e.label else ".long 0")
        lines += rows(rest)
    fields, links = meta._fields()
    word = ".quad" if meta.word == 8 else ".long"
    return [*lines, *rows(fields), *(f"{word} ({link.expr}) - ." for link in links)]
