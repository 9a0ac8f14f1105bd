"""Every refusal of `linkfix patch`: one line on stderr, exit 2, no output written."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import synthimage as si

from linkfix import layout
from linkfix.postlink import image, tables

OPS = (si.SynthOp("irq_disable", {"native": "cli", "xen": "gs_movb", "lguest": "rip_movl"}),
       si.SynthOp("irq_enable", {"native": "sti", "xen": "call"}),
       si.SynthOp("save_fl", {"native": "pushf_pop", "xen": "call"}))


def patch(src: Path, out: Path, target: str = "xen") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linkfix", "patch", str(src), "-o", str(out),
                           "--target", target], capture_output=True, text=True)


def refused(r: subprocess.CompletedProcess[str], out: Path, pattern: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert lines[0].startswith("linkfix: ")
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".linkfix-")]


class Image:
    """A writable copy of a synthetic image with helpers to corrupt its records.

    Sites are numbered as in `site_ops`, which lists op sites before branch sites,
    so that op record i is site i and branch record j is site n_op + j.
    """

    def __init__(self, tmp: Path, bits: int = 64, ops: tuple = OPS, n: int = 12,
                 site_ops: list[int] | None = None) -> None:
        self.path = tmp / "vmlinux"
        site_ops = site_ops or [i % len(ops) for i in range(n)]
        assert site_ops == sorted(site_ops, key=lambda o: o >= len(ops))
        self.synth = si.build_fast(str(self.path), n, bits, ops=ops, site_ops=site_ops)
        img = image.load(str(self.path))
        self.t = tables.load(img)
        self.img = img
        self.data = bytearray(img.data)

    def rec(self, i: int) -> int:
        return self.t.sites_region.offset + i * layout.SITE_REC_SIZE

    def rec_vaddr(self, i: int) -> int:
        return self.t.sites_region.vaddr + i * layout.SITE_REC_SIZE

    def brec(self, j: int) -> int:
        return self.t.branches_region.offset + j * layout.BRANCH_REC_SIZE

    def brec_vaddr(self, j: int) -> int:
        return self.t.branches_region.vaddr + j * layout.BRANCH_REC_SIZE

    def put(self, off: int, fmt: str, value: int) -> None:
        struct.pack_into(fmt, self.data, off, value)

    def aim(self, j: int, field: int, target: int) -> None:
        """Aim branch record j's generic (field 4) or "true" (8) target at `target`, in
        both words that name it, as a consistent corruption would."""
        for f in (field, field + 12):
            self.put(self.brec(j) + f, "<i", target - (self.brec_vaddr(j) + f))

    def site_at(self, i: int, vaddr: int) -> None:
        self.put(self.rec(i), "<i", vaddr - self.rec_vaddr(i))

    def meta_vaddr(self, off: int) -> int:
        """The address of file offset `off` inside .linkfix.meta."""
        return self.t.meta_region.vaddr + off - self.t.meta_region.offset

    def entry(self, op: int, k: int) -> int:
        """File offset of the body table entry `<iIBBBBHH` of alternative k of op."""
        return self.t.meta_region.offset + self.t.meta.table_offset() + \
            layout.BODY.size * (op * self.t.n_alts + k)

    def field_pair(self, op: int, k: int, j: int = 0) -> int:
        """File offset of the (pos, size | flags) pair of field j of (op, k)."""
        first = struct.unpack_from("<H", self.data, self.entry(op, k) + 12)[0]
        meta = self.t.meta
        return self.t.meta_region.offset + meta.table_offset() + \
            layout.BODY.size * len(meta.ops) * meta.n_alts + 2 * (first + j)

    def recorded_target(self, op: int, k: int, j: int = 0) -> int:
        """File offset of the recorded target (self-relative word) of field j of (op, k)."""
        meta = self.t.meta
        fields, _links = meta._fields()
        at = meta.table_offset() + layout.BODY.size * len(meta.ops) * meta.n_alts + len(fields)
        for o in range(len(meta.ops)):
            for a in range(meta.n_alts):
                for jj, link in enumerate(meta.alt(o, a).digest.links):
                    if (o, a, jj) == (op, k, j):
                        return self.t.meta_region.offset + at
                    at += meta.word * link.recorded
        raise AssertionError((op, k, j))

    def set_target(self, op: int, k: int, target: int, j: int = 0) -> None:
        at = self.recorded_target(op, k, j)
        word = self.t.meta.word
        value = target - self.meta_vaddr(at)
        self.put(at, "<q" if word == 8 else "<i", value)

    def copy_addr(self, op: int, k: int) -> int:
        addr = self.t.meta.alt(op, k).addr
        assert addr is not None
        return addr

    def copy(self, op: int, k: int) -> bytes:
        off = self.img.offset_of(self.copy_addr(op, k))
        assert off is not None
        return bytes(self.data[off:off + self.t.meta.alt(op, k).digest.length])

    def put_copy(self, op: int, k: int, code: bytes, fix_crc: bool = False,
                 fields: tuple[tuple[int, int], ...] | None = None) -> bytes:
        """Overwrite the start of a stored copy; with `fix_crc`, make the header's digest
        agree (masking `fields`, by default the recorded ones). Returns the whole copy."""
        off = self.img.offset_of(self.copy_addr(op, k))
        assert off is not None
        self.data[off:off + len(code)] = code
        whole = self.copy(op, k)
        if fix_crc:
            if fields is None:
                fields = self.t.meta.alt(op, k).digest.fields
            self.put(self.entry(op, k) + 4, "<I", zlib.crc32(layout.masked(whole, fields)))
        return whole

    def write(self) -> Path:
        self.path.write_bytes(self.data)
        return self.path


def site_re(im: Image, i: int, op: str) -> str:
    return re.escape(f"site {im.synth.sites[i].addr:#x} ({op}): ")


def test_site_in_data_segment(tmp_path: Path) -> None:
    im = Image(tmp_path)
    im.site_at(3, im.synth.data[0])
    out = tmp_path / "out"
    refused(patch(im.write(), out), out,
            rf"site {im.synth.data[0]:#x} \(irq_disable\): in a non-executable PT_LOAD")


def test_site_in_bss(tmp_path: Path) -> None:
    im = Image(tmp_path)
    im.site_at(1, im.synth.data[1] - 16)  # .bss: memory-only part of the data segment
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, r"\(irq_enable\): not in the file bytes .*\.bss")


def test_site_outside_every_segment(tmp_path: Path) -> None:
    im = Image(tmp_path)
    im.site_at(0, 0x100)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, r"site 0x100 \(irq_disable\): outside every PT_LOAD")


def test_overlapping_sites(tmp_path: Path) -> None:
    im = Image(tmp_path)
    im.site_at(5, im.synth.sites[4].addr + 2)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out,
            rf"\(save_fl\): overlaps the site at {im.synth.sites[4].addr:#x}")


def test_overlap_found_in_unsorted_records(tmp_path: Path) -> None:
    im = Image(tmp_path)
    # Record 9 points into record 2's site: records are no longer in address order.
    im.site_at(9, im.synth.sites[2].addr + 1)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, r"overlaps the site at")


@pytest.mark.parametrize("site_len", [4, 11, 0, 255])
def test_bad_site_len(tmp_path: Path, site_len: int) -> None:
    # Format 3: an op's sites are as long as its copies (10 bytes for irq_disable).
    im = Image(tmp_path)
    im.put(im.rec(0) + 6, "<B", site_len)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, site_re(im, 0, "irq_disable")
            + re.escape(f"site_len {site_len} where the op's copies are 10 bytes"))


def test_site_len_differs_from_the_ops_copies(tmp_path: Path) -> None:
    # Site 2 claims 6 bytes; every copy of op a (and so every site) is 5 bytes long.
    ops = (si.SynthOp("a", {"native": "cli"}), si.SynthOp("b", {"native": "pushf_pop"}))
    im = Image(tmp_path, ops=ops, n=6)
    im.put(im.rec(2) + 6, "<B", 6)
    out = tmp_path / "out"
    refused(patch(im.write(), out, "native"), out,
            site_re(im, 2, "a") + re.escape("site_len 6 where the op's copies are 5 bytes"))
    # A copy whose length differs from its op's generic alternative.
    im = Image(tmp_path, ops=ops, n=6)
    im.put(im.entry(0, 1) + 8, "<B", 6)
    refused(patch(im.write(), out, "native"), out,
            re.escape(".linkfix.meta: op a alternative native: a 6-byte copy for a 5-byte site"))


def test_copy_outside_every_segment(tmp_path: Path) -> None:
    im = Image(tmp_path)
    entry = im.entry(2, 2)  # the xen copy of save_fl (call)
    im.put(entry, "<i", 0x7FFF0000)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, re.escape(
        f".linkfix.meta: op save_fl alternative xen: copy at {im.meta_vaddr(entry) + 0x7FFF0000:#x}"
        " (5 bytes) lies outside .linkfix.repl"))


def test_copy_outside_is_refused_even_when_not_selected(tmp_path: Path) -> None:
    im = Image(tmp_path)
    entry = im.entry(0, 3)  # the lguest copy of irq_disable
    im.put(entry, "<i", -0x100000)
    out = tmp_path / "out"
    refused(patch(im.write(), out, "native"), out, re.escape(
        f".linkfix.meta: op irq_disable alternative lguest: copy at "
        f"{im.meta_vaddr(entry) - 0x100000:#x} (10 bytes) lies outside .linkfix.repl"))


@pytest.mark.parametrize("field,value,op,message", [
    (4, ("<H", 99), "op#99", "op index 99 is not an op (n_real_ops 3)"),
    (4, ("<H", 0x100), "op#256", "op index 256 is not an op (n_real_ops 3)"),
    (4, ("<H", 3), "backend_is(native)",
     "op backend_is(native) is a branch op in an op site record"),
    # the op changed alone: its repeat in the last byte no longer agrees
    (4, ("<H", 1), "irq_enable", "check byte 0xff does not repeat the op (expected 0xfe): "
     "the record is corrupt"),
    (7, ("<B", 1), "irq_disable", "check byte 0x01 does not repeat the op (expected 0xff): "
     "the record is corrupt"),
    (7, ("<B", 0xfe), "irq_disable", "check byte 0xfe does not repeat the op (expected "
     "0xff): the record is corrupt"),
    (6, ("<B", 5), "irq_disable", "site_len 5 where the op's copies are 10 bytes"),
])
def test_bad_site_record_fields(tmp_path: Path, field: int, value: tuple[str, int], op: str,
                                message: str) -> None:
    im = Image(tmp_path)
    im.put(im.rec(0) + field, *value)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, site_re(im, 0, op) + re.escape(message))


@pytest.mark.parametrize("k,field,value,message", [
    (1, 9, ("<B", 0x11), "op 0 alternative 1: bad flags 0x11 or reserved bytes set"),
    (1, 11, ("<B", 11), "op 0 alternative 1: a 11-byte body in a 10-byte copy"),
    (1, 14, ("<H", 1), "op 0 alternative 1: bad flags 0x1 or reserved bytes set"),
    (0, 9, ("<B", 0), "op 0 alternative 0: absent, but its entry is not empty"),
    (1, 9, ("<B", 0x7), "op irq_disable alternative native: an op's alternative flagged as a "
                        "branch jmp"),
    (1, 9, ("<B", 0xB), "op irq_disable alternative native: flagged both as a call body and "
                        "an out-of-line call"),
    (1, 9, ("<B", 0x3), "op irq_disable alternative native: flagged as a call but holds {copy}"),
    (1, 9, ("<B", 0x9), "op irq_disable alternative native: flagged as a call but holds {copy}"),
    (0, 9, ("<B", 0x1), "op irq_disable alternative generic: the generic alternative must be "
                        "the dispatch call"),
    (1, 8, ("<B", 11), "op irq_disable alternative native: a 11-byte copy for a 10-byte site"),
    (1, 4, ("<I", 0x12345678), "op irq_disable alternative native: copy {copy} does not match "
                               "the digest gen-stubs recorded (crc 0x12345678)"),
])
def test_bad_body_table_entry(tmp_path: Path, k: int, field: int, value: tuple[str, int],
                              message: str) -> None:
    im = Image(tmp_path)
    copy = im.copy(0, k)
    im.put(im.entry(0, k) + field, *value)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out,
            re.escape(".linkfix.meta: " + message.format(copy=copy.hex())) + "$")


def test_absent_alternative_with_a_copy_address(tmp_path: Path) -> None:
    im = Image(tmp_path)
    im.put(im.entry(1, 3), "<i", 0x40)  # irq_enable has no lguest alternative
    out = tmp_path / "out"
    refused(patch(im.write(), out), out,
            re.escape(".linkfix.meta: op 1 alternative 3: absent, but its entry is not empty"))


@pytest.mark.parametrize("pos,size_flags,message", [
    (4, 3, "op 0 alternative 2: a relocated field outside its body"),  # size 3
    (7, 4, "op 0 alternative 2: a relocated field outside its body"),  # 7 + 4 > 10
    (4, 0x24, "op 0 alternative 2: a relocated field outside its body"),  # unknown flag
    (4, 0x84, "op irq_disable alternative xen: the relocated field at +4 of copy {copy} does "
              "not point where the link pointed it"),  # absolute marked PC-relative
])
def test_bad_field_list(tmp_path: Path, pos: int, size_flags: int, message: str) -> None:
    im = Image(tmp_path)
    copy = im.copy(0, 2)  # irq_disable xen: movb $1, %gs:xen_vcpu_mask; one absolute field
    assert im.data[im.field_pair(0, 2):im.field_pair(0, 2) + 2] == bytes((4, 4))
    struct.pack_into("<BB", im.data, im.field_pair(0, 2), pos, size_flags)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out,
            re.escape(".linkfix.meta: " + message.format(copy=copy.hex())) + "$")


def test_call_flag_on_a_copy_that_is_not_a_call(tmp_path: Path) -> None:
    # Digests made to agree, so that only the shape check stands in the way.
    im = Image(tmp_path)
    code = im.put_copy(1, 2, b"\x90", fix_crc=True)  # irq_enable xen: call rel32
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, re.escape(
        f".linkfix.meta: op irq_enable alternative xen: flagged as a call but holds {code.hex()}"))
    # The generic alternative must be a direct `call`: here a `jmp rel32`.
    im = Image(tmp_path)
    code = im.put_copy(1, 0, b"\xe9", fix_crc=True)
    refused(patch(im.write(), out, "native"), out, re.escape(
        f".linkfix.meta: op irq_enable alternative generic: flagged as a call but holds "
        f"{code.hex()}"))


def test_copy_with_an_unrecorded_pc_relative_field(tmp_path: Path) -> None:
    # irq_enable native (`sti` and padding) turned into a `jmp rel32` out of the copy,
    # digest made to agree: capstone finds a field the header does not record.
    im = Image(tmp_path)
    code = im.put_copy(1, 1, b"\xe9\x00\x01\x00\x00", fix_crc=True)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, re.escape(
        f".linkfix.meta: op irq_enable alternative native: copy {code.hex()}: its PC-relative "
        "fields [(1, 4)] are not the relocated fields the header records []"))


def test_copy_with_a_pc_relative_field_that_is_not_one(tmp_path: Path) -> None:
    # irq_disable xen: its absolute field declared PC-relative, with a recorded target
    # that the copy agrees with; the decoded copy has no PC-relative field.
    im = Image(tmp_path)
    pair = im.field_pair(0, 2)
    assert im.data[pair:pair + 2] == bytes((4, 4))
    im.put(pair + 1, "<B", 0x84)
    at = im.copy_addr(0, 2)
    value = struct.unpack_from("<i", im.copy(0, 2), 4)[0]
    im.set_target(0, 2, at + 4 + value)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, re.escape(
        f".linkfix.meta: op irq_disable alternative xen: copy {im.copy(0, 2).hex()}: its "
        "PC-relative fields [] are not the relocated fields the header records [(4, 4)]"))


def test_absolute_field_that_is_not_an_operand(tmp_path: Path) -> None:
    # irq_disable xen: 65 c6 04 25 <disp32> 01; the field moved one byte on (across the
    # displacement and the immediate), digest and recorded target made to agree.
    im = Image(tmp_path)
    pair = im.field_pair(0, 2)
    assert im.data[pair:pair + 2] == bytes((4, 4))
    im.put(pair, "<B", 5)
    code = im.put_copy(0, 2, b"", fix_crc=True, fields=((5, 4),))
    im.set_target(0, 2, struct.unpack_from("<I", code, 5)[0])
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, re.escape(
        f".linkfix.meta: op irq_disable alternative xen: copy {code.hex()}: the absolute field "
        "at +5 is not an immediate or displacement operand"))


def test_copy_with_an_outgoing_rel8_jump(tmp_path: Path) -> None:
    # Format 2 widened a rel8 jump out of a body when the site had room; format 3
    # copies sites verbatim, and gen-stubs never stores an outgoing rel8 jump.
    ops = (si.SynthOp("tight", {"native": "jz8_out"}),)
    im = Image(tmp_path, ops=ops, n=3)
    out = tmp_path / "out"
    # As generated, the jz lands at the end of the copy (after the site): accepted.
    assert im.copy(0, 1) == b"\x85\xc0\x74\x01\x90"
    r = patch(im.path, out, "native")
    assert r.returncode == 0, r.stderr
    patched = out.read_bytes()
    for site in im.synth.sites:
        off = im.img.offset_of(site.addr)
        assert off is not None
        assert patched[off:off + 5] == b"\x85\xc0\x74\x01\x90"
    out.unlink()
    # A jz 16 bytes on, past the copy's end, with a digest that agrees.
    code = im.put_copy(0, 1, b"\x85\xc0\x74\x10", fix_crc=True)
    refused(patch(im.write(), out, "native"), out, re.escape(
        f".linkfix.meta: op tight alternative native: copy {code.hex()}: its PC-relative "
        "fields [(3, 1)] are not the relocated fields the header records []"))


def test_copy_with_a_recorded_rel8_field(tmp_path: Path) -> None:
    # Even a header that records the rel8 field (digest and target agreeing) is refused:
    # irq_disable lguest turned into `nop; jmp rel8` out of the copy.
    im = Image(tmp_path)
    at = im.copy_addr(0, 3)
    pair = im.field_pair(0, 3)
    assert im.data[pair:pair + 2] == bytes((2, 0x84))  # rip_movl: RIP-relative rel32
    struct.pack_into("<BB", im.data, pair, 2, 0x81)
    code = im.put_copy(0, 3, b"\x90\xeb\x40", fix_crc=True, fields=((2, 1),))
    im.set_target(0, 3, at + 2 + 0x40)
    out = tmp_path / "out"
    refused(patch(im.write(), out, "native"), out, re.escape(
        f".linkfix.meta: op irq_disable alternative lguest: copy {code.hex()}: a branch or "
        "displacement leaving the copy is not 32 bits (gen-stubs never stores one)"))


# -- branch records (.linkfix.branches) --------------------------------------------------------

BRANCH_SITES = [0, 1, 2, 0, 1, 2, 3, 4, 5, 4]  # six op sites, four branch sites


def branch_image(tmp: Path, bits: int = 64) -> Image:
    im = Image(tmp, bits=bits, n=len(BRANCH_SITES), site_ops=BRANCH_SITES)
    assert im.t.n_op_sites == 6 and im.t.n_branch_sites == 4
    return im


@pytest.mark.parametrize("field,fmt,value,op", [
    (12, "<H", 0, "irq_disable"), (12, "<H", 6, "op#6"), (14, "<B", 4, "backend_is(native)"),
    (14, "<B", 5, "backend_is(native)"), (15, "<B", 0, "backend_is(native)"),
    # the op changed to another branch op without its backend byte: corruption
    (12, "<H", 5, "backend_is(lguest)"),
])
def test_bad_branch_record(tmp_path: Path, field: int, fmt: str, value: int, op: str) -> None:
    im = branch_image(tmp_path)
    rec = list(layout.BRANCH.unpack_from(im.data, im.brec(0)))
    im.put(im.brec(0) + field, fmt, value)
    rec[{12: 3, 14: 4, 15: 5}[field]] = value
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, site_re(im, 6, op) + re.escape(
        f"bad branch record (op {rec[3]}, backend {rec[4]}, kind {rec[5]})"))


@pytest.mark.parametrize("field,what", [(4, "generic"), (8, '"true"'), (16, "generic"),
                                        (20, '"true"')])
@pytest.mark.parametrize("delta", [1, -1, 2])
def test_branch_target_named_twice_differently(tmp_path: Path, field: int, what: str,
                                               delta: int) -> None:
    """A branch label moved to another instruction in one word of its record only: in an
    image patched for a third backend neither jump is in the site's bytes, so only the
    record's second word can refute it (the fuzz class of docs/ERRORS.md)."""
    im = branch_image(tmp_path)
    mid = tmp_path / "mid"
    assert patch(im.write(), mid, "lguest").returncode == 0
    im.data[:] = mid.read_bytes()
    first = field if field < 12 else field - 12
    vaddr = im.brec_vaddr(2)
    was = vaddr + first + struct.unpack_from("<i", im.data, im.brec(2) + first)[0]
    im.put(im.brec(2) + field, "<i", was + delta - (vaddr + field))
    moved, kept = (was + delta, was) if field < 12 else (was, was + delta)
    out = tmp_path / "out"
    for target in ("xen", "generic", "native"):
        refused(patch(im.write(), out, target), out,
                site_re(im, 8, "backend_is(lguest)") + re.escape(
                    f"bad branch record: its {what} target is {moved:#x} and, repeated, "
                    f"{kept:#x}"))


@pytest.mark.parametrize("bits", [64, 32])
def test_branch_jumps_outside_the_code(tmp_path: Path, bits: int) -> None:
    im = branch_image(tmp_path, bits)
    out = tmp_path / "out"
    data = im.synth.data[0]
    im.aim(1, 4, data)  # generic target
    refused(patch(im.write(), out), out, site_re(im, 7, "backend_is(xen)") + re.escape(
        f"jumps to {data:#x}, outside the executable segments"))
    im = branch_image(tmp_path, bits)
    im.aim(3, 8, 0x100)  # "true" target
    refused(patch(im.write(), out), out, site_re(im, 9, "backend_is(xen)") + re.escape(
        "jumps to 0x100, outside the executable segments"))


def test_branch_jumps_into_its_own_site(tmp_path: Path) -> None:
    im = branch_image(tmp_path)
    s = im.synth.sites[8].addr
    im.aim(2, 8, s + 2)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out,
            site_re(im, 8, "backend_is(lguest)") + "jumps into its own site")


@pytest.mark.parametrize("delta", [0, 1, 4])
def test_branch_jumps_to_its_own_start_or_into_another_site(tmp_path: Path, delta: int) -> None:
    """A jump to its own first byte loops forever; one into the middle of another site
    lands in bytes every patch rewrites."""
    im = branch_image(tmp_path)
    own = im.synth.sites[8].addr
    im.aim(2, 8, own)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out,
            site_re(im, 8, "backend_is(lguest)") + "jumps into its own site")
    im = branch_image(tmp_path)
    other = im.synth.sites[1]
    target = other.addr + delta
    im.aim(2, 8, target)
    if delta == 0:  # a true branch may begin with a site
        assert patch(im.write(), out).returncode == 0
        return
    refused(patch(im.write(), out), out, site_re(im, 8, "backend_is(lguest)")
            + re.escape(f"jumps to {target:#x}, inside the site at {other.addr:#x}"))


def test_branch_site_placement(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Over an op site.
    im = branch_image(tmp_path)
    s1 = im.synth.sites[1].addr
    im.put(im.brec(0), "<i", s1 + 3 - im.brec_vaddr(0))
    refused(patch(im.write(), out), out,
            rf"site {s1 + 3:#x} \(backend_is\(native\)\): overlaps the site at {s1:#x}")
    # Over another branch site (records out of order).
    im = branch_image(tmp_path)
    s6 = im.synth.sites[6].addr
    im.put(im.brec(3), "<i", s6 + 1 - im.brec_vaddr(3))
    refused(patch(im.write(), out), out,
            rf"site {s6 + 1:#x} \(backend_is\(xen\)\): overlaps the site at {s6:#x}")
    # In the data segment.
    im = branch_image(tmp_path)
    data = im.synth.data[0]
    im.put(im.brec(1), "<i", data - im.brec_vaddr(1))
    refused(patch(im.write(), out), out,
            rf"site {data:#x} \(backend_is\(xen\)\): in a non-executable PT_LOAD segment")


@pytest.mark.parametrize("i,op", [(1, "irq_enable"), (7, "backend_is(xen)")])
def test_site_not_holding_what_the_state_record_says(tmp_path: Path, i: int, op: str) -> None:
    im = branch_image(tmp_path)
    site = im.synth.sites[i]
    off = im.img.offset_of(site.addr)
    assert off is not None
    before = bytes(im.data[off:off + site.length])
    im.data[off + 1] ^= 0xFF
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, site_re(im, i, op) + re.escape(
        f"holds {bytes(im.data[off:off + site.length]).hex()}, not the generic bytes "
        f"{before.hex()} its state record implies; refusing to overwrite bytes linkfix does "
        "not recognise"))


def test_meta_header_checks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for off, fmt, value, message in [
        (0, "<B", ord("X"), "bad magic"),
        (8, "<H", 3, "table version 3, this linkfix reads version 4"),
        (8, "<H", 1, "table version 1, this linkfix reads version 4"),
        (10, "<H", 3, "tables generated for e_machine 3, image is e_machine 62"),
        (16, "<H", 40, "site_rec_size 40, expected 8"),  # format 2's record, 3 backends
        (16, "<H", 44, "site_rec_size 44, expected 8"),
        (24, "<B", 9, "corrupt state record (target 9, patched 0"),
        (25, "<B", 7, "corrupt state record (target 0, patched 7"),
        (26, "<H", 1, "the name table does not match its check (0x0001): names changed after "
                     "gen-stubs?"),
        (layout.META_STATE_OFFSET + 1, "<B", 4, "op_state [0, 4, 0"),
    ]:
        im = Image(tmp_path)
        im.put(im.t.meta_region.offset + off, fmt, value)
        refused(patch(im.write(), out), out, re.escape(message))


def test_not_an_elf_and_no_tables(tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 20)
    refused(patch(text, out), out, "not an ELF file")
    plain = tmp_path / "true"
    shutil.copy(shutil.which("true") or "/bin/true", plain)
    refused(patch(plain, out), out, r"no linkfix tables: neither a \.linkfix\.meta section")
    missing = tmp_path / "missing"
    refused(patch(missing, out), out, "cannot read")


def test_i386_refusal_names_the_site(tmp_path: Path) -> None:
    im = Image(tmp_path, bits=32)
    im.put(im.rec(4) + 6, "<B", 3)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, site_re(im, 4, "irq_enable")
            + re.escape("site_len 3 where the op's copies are 5 bytes"))


def test_failure_leaves_an_existing_output_untouched(tmp_path: Path) -> None:
    im = Image(tmp_path)
    im.put(im.rec(0) + 4, "<H", 99)
    out = tmp_path / "out"
    out.write_bytes(b"previous")
    r = patch(im.write(), out)
    assert r.returncode == 2
    assert out.read_bytes() == b"previous"


def test_layout_constants_match_format() -> None:
    # The tests above poke fields by offset: keep them honest.
    assert layout.VERSION == 4
    assert layout.site_rec_size(3) == layout.SITE_REC_SIZE == layout.SITE.size == 8
    assert layout.BRANCH_REC_SIZE == layout.BRANCH.size == 24
    assert layout.BODY.size == 16
    assert layout.STATE_OFFSET == 24 and layout.META_STATE_OFFSET == 28
    # Fields of the body table entry, by offset: copy, crc, len, flags, n_fields, 0, first, 0.
    entry = layout.BODY.pack(-1, 0x11223344, 5, 6, 7, 8, 0x0A09, 0x0C0B)
    assert entry == bytes.fromhex("ffffffff443322110506070809 0a0b0c".replace(" ", ""))


def test_two_headers_are_refused(tmp_path: Path) -> None:
    im = Image(tmp_path)
    meta = im.t.meta_region
    # Claim a meta section twice as long (as if two thunk objects were linked).
    sec = im.img.section(layout.META_SECTION)
    assert sec is not None
    shoff = struct.unpack_from("<Q", im.data, 0x28)[0]
    entry = shoff + sec.index * 64
    im.put(entry + 32, "<Q", meta.size * 2)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, "section .linkfix.meta gives 0x[0-9a-f]+ "
            rf"\({meta.size * 2} bytes\) but __linkfix_meta_start..__linkfix_meta_end gives")


def test_image_without_sites_is_patched(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    si.build_fast(str(path), 0, 64, site_ops=[])
    out = tmp_path / "out"
    r = patch(path, out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() != path.read_bytes()  # only the state record


def test_addresses_below_zero(tmp_path: Path) -> None:
    # A record's word can lead below address 0 (no 64-bit column holds that): refused
    # as outside every segment, never a crash. Op site, branch site, branch target.
    out = tmp_path / "out"
    for what in ("op", "branch", "target"):
        im = branch_image(tmp_path)
        if what == "op":
            im.put(im.rec(2), "<i", -(1 << 31))
            where = im.rec_vaddr(2) - (1 << 31)
            msg = "outside every PT_LOAD segment"
        elif what == "branch":
            im.put(im.brec(1), "<i", -(1 << 31))
            where = im.brec_vaddr(1) - (1 << 31)
            msg = "outside every PT_LOAD segment"
        else:
            im.aim(1, 4, -(1 << 20))
            where = im.synth.sites[7].addr
            msg = f"jumps to {-(1 << 20):#x}, outside the executable segments"
        r = patch(im.write(), out)
        refused(r, out, re.escape(f"site {where:#x} (") + r".*\): " + re.escape(msg))
