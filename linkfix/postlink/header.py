"""Parse and check the image header, `.linkfix.meta` (docs/FORMAT.md): counts, names,
the state record, the table bounds and the digest of every alternative's body.
"""

from __future__ import annotations

import re
import struct
from typing import TYPE_CHECKING

from linkfix import layout
from linkfix.errors import BadInput
from linkfix.postlink.image import Image

if TYPE_CHECKING:  # types only: linkfix.tables imports this module
    from linkfix.postlink.tables import Region

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_meta(img: Image, region: Region) -> layout.Meta:
    data = img.data[region.offset:region.offset + region.size]
    path = img.path
    if len(data) < layout.META_FIXED.size:
        raise BadInput(path, f"{layout.META_SECTION}: {len(data)} bytes, too short for a header")
    (magic, version, machine, n_ops, n_backends, rec_size, names_size, spec_hash,
     target, patched, check) = layout.META_FIXED.unpack_from(data)
    if magic != layout.MAGIC:
        raise BadInput(path, f"{layout.META_SECTION}: bad magic {magic!r}")
    if version != layout.VERSION:
        raise BadInput(path, f"{layout.META_SECTION}: table version {version}, this linkfix "
                             f"reads version {layout.VERSION}")
    if machine != img.machine:
        raise BadInput(path, f"{layout.META_SECTION}: tables generated for e_machine {machine}, "
                             f"image is e_machine {img.machine}")
    if n_backends < 1 or n_ops < n_backends:
        raise BadInput(path, f"{layout.META_SECTION}: n_ops {n_ops} / n_backends {n_backends} "
                             "inconsistent")
    if rec_size != layout.SITE_REC_SIZE:
        raise BadInput(path, f"{layout.META_SECTION}: site_rec_size {rec_size}, expected "
                             f"{layout.SITE_REC_SIZE}")
    names_at = layout.META_STATE_OFFSET + n_ops
    if names_at + names_size > len(data):
        raise BadInput(path, f"{layout.META_SECTION}: name table runs past the header")
    blob = data[names_at:names_at + names_size]
    if not blob.endswith(b"\0"):
        raise BadInput(path, f"{layout.META_SECTION}: name table not NUL-terminated")
    try:
        names = [n.decode() for n in blob[:-1].split(b"\0")]
    except UnicodeDecodeError:
        raise BadInput(path, f"{layout.META_SECTION}: name table is not UTF-8") from None
    if len(names) != n_backends + n_ops:
        raise BadInput(path, f"{layout.META_SECTION}: {len(names)} names, expected "
                             f"{n_backends + n_ops}")
    backends, ops = tuple(names[:n_backends]), tuple(names[n_backends:])
    # Backends and real ops are C identifiers (docs/SPEC.md); anything else is corruption.
    bad = next((n for n in (*backends, *ops[:n_ops - n_backends]) if not _IDENT.fullmatch(n)),
               None)
    if bad is not None:
        raise BadInput(path, f"{layout.META_SECTION}: name {bad!r} is not a C identifier")
    if len(set(backends)) != n_backends or "generic" in backends or "" in backends:
        raise BadInput(path, f"{layout.META_SECTION}: bad backend names {list(backends)}")
    if len(set(ops)) != n_ops or "" in ops:
        raise BadInput(path, f"{layout.META_SECTION}: duplicate or empty op names")
    branch = tuple(layout.branch_op_name(b) for b in backends)
    if ops[n_ops - n_backends:] != branch:
        raise BadInput(path, f"{layout.META_SECTION}: the last {n_backends} ops must be "
                             f"{', '.join(branch)}")
    head = names_at + names_size
    head += -head % 4
    bounds, alts, end = _parse_tail(path, region, data, head, n_ops, n_backends + 1)
    if len(data) >= end + 8:
        raise BadInput(path, f"{layout.META_SECTION}: {len(data)} bytes where one header takes "
                             f"{end}: more than one linkfix header linked into the image?")
    op_state = tuple(data[layout.META_STATE_OFFSET:names_at])
    if check != layout.names_check(blob):
        raise BadInput(path, f"{layout.META_SECTION}: the name table does not match its check "
                             f"({check:#06x}): names changed after gen-stubs?")
    if target > n_backends or patched > 1 or any(s > n_backends for s in op_state):
        raise BadInput(path, f"{layout.META_SECTION}: corrupt state record "
                             f"(target {target}, patched {patched}, op_state {list(op_state)})")
    return layout.Meta(machine=machine, backends=backends, ops=ops, spec_hash=spec_hash,
                       target=target, patched=patched, op_state=op_state, alts=alts,
                       bounds=bounds)


def region_machine(data: bytes) -> int:
    """The e_machine the header was generated for (validated by the caller)."""
    return struct.unpack_from("<H", data, 10)[0]


def _parse_tail(path: str, region: Region, data: bytes, at: int, n_ops: int, n_alts: int
                ) -> tuple[tuple[int, ...], tuple[tuple[layout.AltEntry, ...], ...], int]:
    """The table bounds and the body table after the names; returns them and the end."""
    sec = layout.META_SECTION
    table_at = at + layout.BOUNDS.size
    fields_at = table_at + layout.BODY.size * n_ops * n_alts
    if fields_at > len(data):
        raise BadInput(path, f"{sec}: {len(data)} bytes, too short for the bounds and body "
                             f"table of {n_ops} ops")
    rel = layout.BOUNDS.unpack_from(data, at)
    bounds = tuple(region.vaddr + at + 4 * j + v for j, v in enumerate(rel))
    entries = list(layout.BODY.iter_unpack(data[table_at:fields_at]))
    n_fields = max((first + n for _b, _c, _l, _f, n, _r, first, _r2 in entries if n),
                   default=0)
    end = fields_at + 2 * n_fields
    if end > len(data):
        raise BadInput(path, f"{sec}: body field lists run past the header")
    pairs = data[fields_at:end]
    end += -end % 4
    # The recorded targets follow, one self-relative word per recorded field.
    recorded = [j for j in range(n_fields) if not pairs[2 * j + 1] & layout.FIELD_UNRECORDED]
    word = 8 if region_machine(data) == 62 else 4
    if end + word * len(recorded) > len(data):
        raise BadInput(path, f"{sec}: recorded field targets run past the header")
    fmt = "<q" if word == 8 else "<i"
    mask = (1 << (8 * word)) - 1
    targets: dict[int, int] = {}
    for n, j in enumerate(recorded):
        where = end + word * n
        (value,) = struct.unpack_from(fmt, data, where)
        targets[j] = (region.vaddr + where + value) & mask
    end += word * len(recorded)
    rows = []
    for op in range(n_ops):
        row = []
        for k in range(n_alts):
            j0 = op * n_alts + k
            body, crc, length, flags, n, body_len, first, r2 = entries[j0]
            where = f"{sec}: op {op} alternative {k}"
            if flags & ~layout.FLAGS_KNOWN or r2:
                raise BadInput(path, f"{where}: bad flags {flags:#x} or reserved bytes set")
            if body_len > length:
                raise BadInput(path, f"{where}: a {body_len}-byte body in a {length}-byte copy")
            if not flags & layout.FLAG_PRESENT and (flags or length or n or body or crc):
                raise BadInput(path, f"{where}: absent, but its entry is not empty")
            fields, links = [], []
            for j in range(first, first + n):
                pos, size_flags = pairs[2 * j], pairs[2 * j + 1]
                size = size_flags & 0x3F
                if size not in (1, 2, 4, 8) or pos + size > length or size_flags & 0x30:
                    raise BadInput(path, f"{where}: a relocated field outside its body")
                fields.append((pos, size))
                links.append(layout.Link(bool(size_flags & layout.FIELD_PCREL),
                                         target=targets.get(j)))
            addr = None
            if body:
                addr = (region.vaddr + table_at + layout.BODY.size * j0 + body) & mask
            row.append(layout.AltEntry(flags, layout.BodyDigest(crc, length, tuple(fields),
                                                                tuple(links)), addr=addr,
                                       body_len=body_len))
        rows.append(tuple(row))
    return bounds, tuple(rows), end
