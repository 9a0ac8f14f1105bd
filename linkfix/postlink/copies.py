"""The stored alternatives: one copy per op and backend in `.linkfix.repl`, checked.

Every site of an op gets the same bytes from the same copy, so each copy is
checked once, before anything is written, against everything the image says
about it:

* where it lies: inside `.linkfix.repl`, in file-backed PT_LOAD bytes;
* its digest: the CRC32 gen-stubs computed with the relocated fields masked;
* its fields: each relocated field holds what the link put there (the header's
  record of symbol + addend), and the fields are exactly what the decoded
  machine code says they are: PC-relative fields are the 32-bit displacements
  of branches and RIP-relative operands that leave the copy, absolute ones an
  immediate or displacement operand. A copy with an outgoing rel8 branch, or
  a field that is not an operand, is refused;
* its shape: as long as the op's site, a generic `call` (or a branch op's
  `jmp`) where the format says so.
"""

from __future__ import annotations

from linkfix import layout
from linkfix.errors import BadInput
from linkfix.postlink import fixups
from linkfix.postlink.image import Image


class Copy:
    """What a site of op `op` holds when patched to alternative `k`.

    `code` is the site's bytes with every PC-relative field as stored; at a site
    at address s the field at `pos` holds `target - s - pos` (`pcrel`), and the
    absolute fields hold what the copy holds. A branch op's jumps have no copy:
    `per_site` says the field's target comes from the site's record. (A plain
    class, read-only by convention: a dataclass costs a millisecond at every start.)
    """

    __slots__ = ("op", "k", "addr", "code", "pcrel", "per_site")

    def __init__(self, op: int, k: int, addr: int | None, code: bytes,
                 pcrel: tuple[tuple[int, int], ...], per_site: bool = False) -> None:
        self.op, self.k, self.addr, self.code = op, k, addr, code
        self.pcrel = pcrel  # (pos, target) of every 32-bit PC-relative field
        self.per_site = per_site  # a branch site's jump: e9 + the record's target

    def __repr__(self) -> str:
        return f"Copy(op={self.op}, k={self.k}, addr={self.addr}, code={self.code!r}, " \
               f"pcrel={self.pcrel}, per_site={self.per_site})"

    @property
    def length(self) -> int:
        return len(self.code)


def _fail(img: Image, meta: layout.Meta, op: int, k: int, msg: str) -> BadInput:
    alt = "generic" if k == 0 else meta.backends[k - 1]
    return BadInput(img.path, f"{layout.META_SECTION}: op {meta.ops[op]} alternative {alt}: "
                              f"{msg}")


def check_all(img: Image, meta: layout.Meta, repl: tuple[int, int] | None
              ) -> dict[tuple[int, int], Copy]:
    """Every present alternative of every op, checked; keyed by (op, k)."""
    out: dict[tuple[int, int], Copy] = {}
    n_real = meta.n_real_ops
    for op in range(len(meta.ops)):
        generic = meta.alt(op, 0)
        if not generic.present:
            raise _fail(img, meta, op, 0, "absent: every op has its generic alternative")
        for k in range(meta.n_alts):
            e = meta.alt(op, k)
            if not e.present:
                continue
            if op < n_real:
                out[(op, k)] = _op_copy(img, meta, op, k, e, generic.digest.length, repl)
            else:
                out[(op, k)] = _branch_alt(img, meta, op, k, e, repl)
    return out


def _branch_alt(img: Image, meta: layout.Meta, op: int, k: int, e: layout.AltEntry,
                repl: tuple[int, int] | None) -> Copy:
    b = op - meta.n_real_ops + 1  # the backend this branch op tests
    jump = k in (0, b)
    if jump:
        d = e.digest
        if e.flags != layout.FLAG_PRESENT | layout.FLAG_JMP or e.stored or d.length != 5 \
                or d.fields != ((1, 4),) or d.links[0].target is not None \
                or not layout.digest_matches(d, b"\xe9" + bytes(4)):
            raise _fail(img, meta, op, k, "not the 5-byte jmp to a label of its site")
        return Copy(op, k, None, b"\xe9" + bytes(4), (), per_site=True)
    copy = _op_copy(img, meta, op, k, e, 5, repl)
    if copy.pcrel or e.flags != layout.FLAG_PRESENT:
        raise _fail(img, meta, op, k, "a branch's false alternative must be 5 bytes with no "
                                      "relocated field")
    return copy


def _op_copy(img: Image, meta: layout.Meta, op: int, k: int, e: layout.AltEntry,
             site_len: int, repl: tuple[int, int] | None) -> Copy:
    d = e.digest
    if e.flags & layout.FLAG_JMP:
        raise _fail(img, meta, op, k, "an op's alternative flagged as a branch jmp")
    if e.flags & layout.FLAG_CALL and e.flags & layout.FLAG_OOL:
        raise _fail(img, meta, op, k, "flagged both as a call body and an out-of-line call")
    if e.addr is None:
        raise _fail(img, meta, op, k, "present but has no stored copy")
    if d.length != site_len or d.length == 0:
        raise _fail(img, meta, op, k, f"a {d.length}-byte copy for a {site_len}-byte site")
    if repl is None or not (repl[0] <= e.addr and e.addr + d.length <= repl[1]):
        raise _fail(img, meta, op, k, f"copy at {e.addr:#x} ({d.length} bytes) lies outside "
                                      f"{layout.REPL_SECTION}")
    code = img.read(e.addr, d.length)
    if code is None or len(code) != d.length:
        raise _fail(img, meta, op, k, f"copy at {e.addr:#x} is not in the file bytes of a "
                                      "PT_LOAD")
    code = bytes(code)
    if not layout.digest_matches(d, code):
        raise _fail(img, meta, op, k, f"copy {code.hex()} does not match the digest gen-stubs "
                                      f"recorded (crc {d.crc:#010x})")
    pos = layout.wrong_field(d, code, e.addr)
    if pos is not None:
        raise _fail(img, meta, op, k, f"the relocated field at +{pos} of copy {code.hex()} "
                                      "does not point where the link pointed it")
    end = 0
    for p, n in d.fields:
        if p < end:
            raise _fail(img, meta, op, k, "relocated fields overlap or are out of order")
        end = p + n
    if (e.flags & (layout.FLAG_CALL | layout.FLAG_OOL) or k == 0) and \
            (code[0] != 0xE8 or d.fields[:1] != ((1, 4),) or not d.links[0].pcrel):
        raise _fail(img, meta, op, k, f"flagged as a call but holds {code.hex()}")
    if k == 0 and not e.flags & layout.FLAG_CALL:
        raise _fail(img, meta, op, k, "the generic alternative must be the dispatch call")
    return Copy(op, k, e.addr, code, _fields_by_decoding(img, meta, op, k, code, d))


def _fields_by_decoding(img: Image, meta: layout.Meta, op: int, k: int, code: bytes,
                        d: layout.BodyDigest) -> tuple[tuple[int, int], ...]:
    """The PC-relative fields as (pos, target); the header's fields must be exactly the
    operand fields capstone finds."""
    bits = img.bits
    try:
        decoded = fixups.analyze(code, bits)
    except fixups.FixupError as exc:
        raise _fail(img, meta, op, k, f"copy {code.hex()}: {exc}") from None
    external = {(f.pos, f.size) for f in decoded.external}
    declared_pc = {(p, n) for (p, n), link in zip(d.fields, d.links, strict=True) if link.pcrel}
    if external != declared_pc:
        raise _fail(img, meta, op, k, f"copy {code.hex()}: its PC-relative fields "
                                      f"{sorted(external)} are not the relocated fields the "
                                      f"header records {sorted(declared_pc)}")
    if any(n != 4 for _p, n in external):
        raise _fail(img, meta, op, k, f"copy {code.hex()}: a branch or displacement leaving "
                                      "the copy is not 32 bits (gen-stubs never stores one)")
    operands = _operand_fields(code, bits)
    for (p, n), link in zip(d.fields, d.links, strict=True):
        if not link.pcrel and (p, n) not in operands:
            raise _fail(img, meta, op, k, f"copy {code.hex()}: the absolute field at +{p} is "
                                          "not an immediate or displacement operand")
        if link.target is None:
            raise _fail(img, meta, op, k, f"the field at +{p} has no recorded target")
    return tuple((p, link.target) for (p, _n), link in zip(d.fields, d.links, strict=True)
                 if link.pcrel and link.target is not None)


_OPERANDS: dict[tuple[int, bytes], frozenset[tuple[int, int]]] = {}


def _operand_fields(code: bytes, bits: int) -> frozenset[tuple[int, int]]:
    """(pos, size) of every immediate and displacement field of the decoded copy
    (decoded once per distinct copy: ops often share a body)."""
    got = _OPERANDS.get((bits, code))
    if got is not None:
        return got
    cs = fixups.disassembler(bits)
    out: set[tuple[int, int]] = set()
    for ins in cs.disasm(code, 0):  # type: ignore[attr-defined]
        if ins.imm_size:
            out.add((ins.address + ins.imm_offset, ins.imm_size))
        if ins.disp_size:
            out.add((ins.address + ins.disp_offset, ins.disp_size))
    got = _OPERANDS[(bits, code)] = frozenset(out)
    return got
