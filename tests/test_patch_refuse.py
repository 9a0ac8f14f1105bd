"""Every refusal of `linkfix patch`: one line on stderr, exit 2, no output written."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import synthimage as si

from linkfix import image, layout, tables

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
    """A writable copy of a synthetic image with helpers to corrupt its records."""

    def __init__(self, tmp: Path, bits: int = 64, ops: tuple = OPS, n: int = 12,
                 site_ops: list[int] | None = None) -> None:
        self.path = tmp / "vmlinux"
        self.synth = si.build_fast(str(self.path), n, bits, ops=ops,
                                   site_ops=site_ops or [i % len(ops) for i in range(n)])
        img = image.load(str(self.path))
        self.t = tables.load(img)
        self.img = img
        self.data = bytearray(img.data)

    def rec(self, i: int) -> int:
        return self.t.sites_region.offset + i * self.t.rec_size

    def rec_vaddr(self, i: int) -> int:
        return self.t.sites_region.vaddr + i * self.t.rec_size

    def put(self, off: int, fmt: str, value: int) -> None:
        struct.pack_into(fmt, self.data, off, value)

    def site_at(self, i: int, vaddr: int) -> None:
        self.put(self.rec(i), "<i", vaddr - self.rec_vaddr(i))

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


@pytest.mark.parametrize("site_len,message", [(4, "site_len 4 is less than 5"),
                                              (11, "site_len 11 inconsistent"),
                                              (8, "body of 9 bytes longer than the 8-byte")])
def test_bad_site_len(tmp_path: Path, site_len: int, message: str) -> None:
    im = Image(tmp_path)
    im.put(im.rec(0) + 6, "<B", site_len)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out, site_re(im, 0, "irq_disable") + ".*" + message)


def test_site_len_differs_between_sites_of_an_op(tmp_path: Path) -> None:
    # Site 2 claims 6 bytes and a 6-byte body: consistent in itself, not with its op.
    ops = (si.SynthOp("a", {"native": "cli"}), si.SynthOp("b", {"native": "pushf_pop"}))
    im = Image(tmp_path, ops=ops, n=6)
    im.put(im.rec(2) + 6, "<B", 6)
    im.put(im.rec(2) + 8 + 8 * 1 + 4, "<B", 6)
    out = tmp_path / "out"
    refused(patch(im.write(), out, "native"), out,
            site_re(im, 2, "a") + "site_len or set of alternatives differs")


def test_body_outside_every_segment(tmp_path: Path) -> None:
    im = Image(tmp_path)
    field = im.rec(2) + 8 + 8 * 2  # xen body of site 2 (save_fl: call)
    im.put(field, "<i", 0x7FFF0000)
    out = tmp_path / "out"
    refused(patch(im.write(), out), out,
            site_re(im, 2, "save_fl") + r"alternative xen: body at 0x.* not in the file bytes")


def test_body_outside_is_refused_even_when_not_selected(tmp_path: Path) -> None:
    im = Image(tmp_path)
    im.put(im.rec(0) + 8 + 8 * 3, "<i", -0x100000)  # lguest body of irq_disable
    out = tmp_path / "out"
    refused(patch(im.write(), out, "native"), out, r"alternative lguest: body at")


@pytest.mark.parametrize("field,value,message", [
    (4, ("<H", 99), r"op index 99 out of range"),
    (7, ("<B", 1), r"site kind 1 does not match op"),
    (7, ("<B", 7), r"unknown site kind 7"),
    (8 + 8 * 1 + 5, ("<B", 0x9), r"alternative native: bad flags 0x9"),
    (8 + 8 * 1 + 5, ("<B", 0x7), r"alternative native: both call and jmp flags"),
    (8 + 8 * 1 + 5, ("<B", 0x3), r"alternative native: call/jmp body of 1 bytes"),
    (8 + 8 * 1 + 6, ("<H", 1), r"alternative native: bad flags 0x101"),
    (8 + 5, ("<B", 0), r"alternative generic: flags 0x0 / len 5 without the present bit"),
])
def test_bad_record_fields(tmp_path: Path, field: int, value: tuple[str, int],
                           message: str) -> None:
    im = Image(tmp_path)
    im.put(im.rec(0) + field, *value)
    out = tmp_path / "out"
    op = "irq_disable" if field != 4 else "op#99"
    refused(patch(im.write(), out), out, site_re(im, 0, op) + message)


def test_absent_alternative_with_a_body_address(tmp_path: Path) -> None:
    im = Image(tmp_path)
    im.put(im.rec(1) + 8 + 8 * 3, "<i", 0x40)  # irq_enable has no lguest body
    out = tmp_path / "out"
    refused(patch(im.write(), out), out,
            site_re(im, 1, "irq_enable") + "alternative lguest is absent but has a body")


def test_call_flag_on_a_body_that_is_not_a_call(tmp_path: Path) -> None:
    im = Image(tmp_path)
    body = im.synth.sites[1].bodies[2]  # irq_enable xen: call rel32
    assert body is not None
    off = im.img.offset_of(body[0])
    im.data[off] = 0x90
    out = tmp_path / "out"
    refused(patch(im.write(), out), out,
            site_re(im, 1, "irq_enable") + "alternative xen: flagged as a call but starts "
            "with 0x90")


def test_rel8_jump_without_room_to_widen(tmp_path: Path) -> None:
    ops = (si.SynthOp("tight", {"native": "jz8_out"}),)
    im = Image(tmp_path, ops=ops, n=3)
    out = tmp_path / "out"
    refused(patch(im.path, out, "native"), out,
            site_re(im, 0, "tight") + "alternative native: widening rel8 jumps needs 8 bytes, "
                                      "the site has 5")


def test_meta_header_checks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for off, fmt, value, message in [
        (0, "<B", ord("X"), "bad magic"),
        (8, "<H", 1, "table version 1, this linkfix reads version 2"),
        (10, "<H", 3, "tables generated for e_machine 3, image is e_machine 62"),
        (16, "<H", 44, "site_rec_size 44"),
        (25, "<B", 7, "corrupt state record"),
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
    refused(patch(im.write(), out), out, site_re(im, 4, "irq_enable") + "site_len 3")


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
    assert layout.site_rec_size(3) == 40
    assert layout.STATE_OFFSET == 24


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
