"""Bad input, the error contract, reproducibility and parallel runs (docs/ERRORS.md).

Every refusal is checked with its exact message: `linkfix: FILE: message`, one
line on stderr, nothing on stdout, exit 2, no output file and no temporary file
left. Refusals already covered elsewhere (tests/postlink/test_patch_refuse.py,
tests/postlink/test_patch.py, tests/postlink/test_verify.py, tests/postlink/test_inspect.py,
tests/stubgen/test_spec.py) are listed in docs/ERRORS.md and not repeated here.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import synthimage as si

from linkfix import cli, fileio, layout
from linkfix.postlink import image, tables
from linkfix.stubgen import gencache

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "tests" / "specs"
OPS = (si.SynthOp("op_a", {"native": "cli", "xen": "gs_movb", "lguest": "jz_in"}),
       si.SynthOp("op_b", {"native": "sti", "xen": "call"}))
SITE_OPS = [0, 1] * 5 + [2, 3]  # ten op sites, then backend_is(native), backend_is(xen)
COMMANDS = ("patch", "inspect", "verify")


def run(*argv: str) -> tuple[int, str, str]:
    """linkfix in-process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(list(argv))
        except SystemExit as exc:  # argparse usage errors
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


def proc(*argv: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linkfix", *argv], capture_output=True,
                          text=True, **kw)


def temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(fileio.TEMP_PREFIX)]


def command(cmd: str, path: Path, out: Path, target: str = "xen") -> list[str]:
    if cmd == "patch":
        return ["patch", str(path), "-o", str(out), "--target", target]
    if cmd == "verify":
        return ["verify", str(path)]
    return ["inspect", str(path)]


def refused(argv: list[str], where: str | Path, message: str, out: Path | None = None) -> None:
    """`argv` fails with exactly `linkfix: where: message`, exit 2, nothing written."""
    rc, stdout, stderr = run(*argv)
    assert (rc, stderr) == (2, f"linkfix: {where}: {message}\n"), stderr
    assert stdout == ""
    if out is not None:
        assert not out.exists()
        assert temp_files(out.parent) == []


class Elf:
    """A writable copy of a synthetic image and the places of its header fields."""

    def __init__(self, src: Path, dst: Path) -> None:
        self.path = dst
        self.data = bytearray(src.read_bytes())
        self.img = image.Image(str(src), bytes(self.data))
        self.w64 = self.img.bits == 64
        self.t = tables.load(self.img)

    # ELF header
    def ehdr(self, name: str, value: int) -> None:
        off64 = {"e_type": (16, "<H"), "e_machine": (18, "<H"), "e_phentsize": (54, "<H"),
                 "e_shentsize": (58, "<H"), "e_shstrndx": (62, "<H")}
        off32 = {"e_type": (16, "<H"), "e_machine": (18, "<H"), "e_phentsize": (42, "<H"),
                 "e_shentsize": (46, "<H"), "e_shstrndx": (50, "<H")}
        off, fmt = (off64 if self.w64 else off32)[name]
        struct.pack_into(fmt, self.data, off, value)

    def shdr_at(self, name: str) -> int:
        shoff = struct.unpack_from("<Q" if self.w64 else "<I", self.data, 40 if self.w64 else 32)[0]
        sec = self.img.section(name)
        assert sec is not None
        return shoff + sec.index * (64 if self.w64 else 40)

    def section(self, name: str, **fields: int) -> None:
        where = {"addr": (16, 12), "offset": (24, 16), "size": (32, 20), "flags": (8, 8)}
        base = self.shdr_at(name)
        for f, value in fields.items():
            off = where[f][0 if self.w64 else 1]
            struct.pack_into("<Q" if self.w64 else "<I", self.data, base + off, value)

    def phdr_flags(self, index: int, flags: int) -> None:
        phoff = 64 if self.w64 else 52
        at = phoff + index * (56 if self.w64 else 32) + (4 if self.w64 else 24)
        struct.pack_into("<I", self.data, at, flags)

    def meta(self, off: int, fmt: str, value: int) -> None:
        struct.pack_into(fmt, self.data, self.t.meta_region.offset + off, value)

    def names_at(self) -> int:
        return self.t.meta_region.offset + layout.META_STATE_OFFSET + len(self.t.meta.ops)

    def replace_name(self, old: bytes, new: bytes) -> None:
        assert len(old) == len(new)
        at = self.data.index(old + b"\0", self.names_at())
        self.data[at:at + len(old)] = new

    # .linkfix.sites: op site record i; .linkfix.branches: branch site record j
    def rec(self, i: int) -> int:
        return self.t.sites_region.offset + i * layout.SITE_REC_SIZE

    def rec_vaddr(self, i: int) -> int:
        return self.t.sites_region.vaddr + i * layout.SITE_REC_SIZE

    def brec(self, j: int) -> int:
        return self.t.branches_region.offset + j * layout.BRANCH_REC_SIZE

    def brec_vaddr(self, j: int) -> int:
        return self.t.branches_region.vaddr + j * layout.BRANCH_REC_SIZE

    def site_at(self, i: int, vaddr: int) -> None:
        struct.pack_into("<i", self.data, self.rec(i), vaddr - self.rec_vaddr(i))

    def site_addr(self, i: int) -> int:
        """Site i as linked: op records first, then branch records (tables.Checked order)."""
        n = self.t.n_op_sites
        if i < n:
            return self.rec_vaddr(i) + struct.unpack_from("<i", self.img.data, self.rec(i))[0]
        j = i - n
        return self.brec_vaddr(j) + struct.unpack_from("<i", self.img.data, self.brec(j))[0]

    # .linkfix.meta: the body table entry of (op, k), its stored copy, recorded targets
    def entry(self, op: int, k: int) -> int:
        """File offset of the 16-byte body table entry of alternative k of op."""
        return self.t.meta_region.offset + self.t.meta.table_offset() + \
            layout.BODY.size * (op * self.t.n_alts + k)

    def copy_addr(self, op: int, k: int) -> int:
        addr = self.t.meta.alt(op, k).addr
        assert addr is not None
        return addr

    def copy(self, op: int, k: int) -> bytes:
        off = self.img.offset_of(self.copy_addr(op, k))
        assert off is not None
        return bytes(self.data[off:off + self.t.meta.alt(op, k).digest.length])

    def put_copy(self, op: int, k: int, code: bytes, fix_crc: bool = False) -> bytes:
        """Overwrite the start of the stored copy; with `fix_crc`, make the header's digest
        agree (as a consistent hostile gen-stubs output would). Returns the whole copy."""
        off = self.img.offset_of(self.copy_addr(op, k))
        assert off is not None
        self.data[off:off + len(code)] = code
        whole = self.copy(op, k)
        if fix_crc:
            d = self.t.meta.alt(op, k).digest
            struct.pack_into("<I", self.data, self.entry(op, k) + 4,
                             zlib.crc32(layout.masked(whole, d.fields)))
        return whole

    def recorded_target(self, op: int, k: int, field: int = 0) -> int:
        """File offset of the recorded target (a self-relative word) of a field of (op, k)."""
        meta = self.t.meta
        fields, _links = meta._fields()
        at = meta.table_offset() + layout.BODY.size * len(meta.ops) * meta.n_alts + len(fields)
        for o in range(len(meta.ops)):
            for a in range(meta.n_alts):
                for j, link in enumerate(meta.alt(o, a).digest.links):
                    if (o, a, j) == (op, k, field):
                        fmt = "<q" if meta.word == 8 else "<i"
                        value = struct.unpack_from(fmt, self.img.data,
                                                   self.t.meta_region.offset + at)[0]
                        mask = (1 << (8 * meta.word)) - 1
                        assert (self.t.meta_region.vaddr + at + value) & mask == link.target
                        return self.t.meta_region.offset + at
                    at += meta.word * link.recorded
        raise AssertionError((op, k, field))

    def write(self) -> Path:
        self.path.write_bytes(self.data)
        return self.path


@pytest.fixture(scope="module", params=[64, 32], ids=["x86_64", "i386"])
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(f"base{request.param}") / "vmlinux"
    si.build_fast(str(path), len(SITE_OPS), request.param, ops=OPS, site_ops=SITE_OPS)
    return path


@pytest.fixture()
def elf(base: Path, tmp_path: Path) -> Elf:
    return Elf(base, tmp_path / "vmlinux")


# -- the ELF file itself, for every command ---------------------------------------------------


def _structural(elf: Elf) -> dict[str, tuple[Callable[[Elf], None], str]]:
    bits = 64 if elf.w64 else 32
    ehsize = 64 if elf.w64 else 52
    shoff = struct.unpack_from("<Q" if elf.w64 else "<I", elf.data, 40 if elf.w64 else 32)[0]
    last_load = max(s.offset + s.filesz for s in elf.img.load_segments)

    def cut(n: int) -> Callable[[Elf], None]:
        def f(e: Elf) -> None:
            del e.data[n:]
        return f

    def setb(off: int, value: int) -> Callable[[Elf], None]:
        def f(e: Elf) -> None:
            e.data[off] = value
        return f

    def eh(name: str, value: int) -> Callable[[Elf], None]:
        return lambda e: e.ehdr(name, value)

    out = {
        "empty": (cut(0), "not an ELF file"),
        "text": (lambda e: e.data.__setitem__(slice(None), b"hello, world\n" * 20),
                 "not an ELF file"),
        "truncated-ident": (cut(40), "not an ELF file"),
        "bad-class": (setb(4, 3), "unknown ELF class 3"),
        "big-endian": (setb(5, 2), "not a little-endian ELF file"),
        "wrong-machine": (eh("e_machine", 40), "unsupported e_machine 40 (x86-64 or i386 only)"),
        "class-machine": (eh("e_machine", 3 if elf.w64 else 62),
                          f"ELF{bits} file with e_machine {3 if elf.w64 else 62}"),
        "relocatable": (eh("e_type", 1),
                        "e_type 1: a linked executable (ET_EXEC or ET_DYN) is required"),
        "phentsize": (eh("e_phentsize", 8), "e_phentsize 8 too small"),
        "shentsize": (eh("e_shentsize", 8), "e_shentsize 8 too small"),
        "truncated-phdrs": (cut(ehsize + 10),
                            "program header table lies outside the file (truncated image?)"),
        "truncated-load": (cut(elf.t.sites_region.offset + 7),
                           "PT_LOAD segment lies outside the file (truncated image?)"),
        "truncated-shdrs": (cut(shoff + 70),
                            "section header table lies outside the file (truncated image?)"),
        "section-outside": (lambda e: e.section(".symtab", offset=len(e.data) + 16),
                            "section .symtab lies outside the file (truncated image?)"),
        "shstrtab-outside": (lambda e: e.section(".shstrtab", offset=len(e.data)),
                             "section name table lies outside the file (truncated image?)"),
    }
    if elf.w64:
        out["truncated-ehdr64"] = (cut(60), "ELF header truncated (60 bytes, ELF64 needs 64)")
    assert last_load < shoff  # the section headers follow every PT_LOAD's bytes
    return out


STRUCTURAL = ["empty", "text", "truncated-ident", "truncated-ehdr64", "bad-class", "big-endian",
              "wrong-machine", "class-machine", "relocatable", "phentsize", "shentsize",
              "truncated-phdrs", "truncated-load", "truncated-shdrs", "section-outside",
              "shstrtab-outside"]


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("case", STRUCTURAL)
def test_bad_elf_file(elf: Elf, cmd: str, case: str) -> None:
    cases = _structural(elf)
    if case not in cases:
        pytest.skip("ELF64 only")
    mutate, message = cases[case]
    mutate(elf)
    out = elf.path.parent / "out"
    refused(command(cmd, elf.write(), out), elf.path, message, out)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_no_linkfix_tables(cmd: str, tmp_path: Path) -> None:
    plain = tmp_path / "true"
    shutil.copy(shutil.which("true") or "/bin/true", plain)
    out = tmp_path / "out"
    refused(command(cmd, plain, out), plain,
            "no linkfix tables: neither a .linkfix.meta section nor "
            "__linkfix_meta_start/__linkfix_meta_end symbols (was the image linked with "
            "linkfix.lds?)", out)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_input_is_not_a_regular_file(cmd: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    refused(command(cmd, tmp_path, out), tmp_path, "cannot read: Is a directory", out)
    refused(command(cmd, Path("/dev/zero"), out), "/dev/zero",
            "cannot read: not a regular file", out)  # would be read forever
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(command(cmd, fifo, out), fifo, "cannot read: not a regular file", out)  # no wait
    refused(command(cmd, tmp_path / "missing", out), tmp_path / "missing",
            "cannot read: No such file or directory", out)


# -- the tables ------------------------------------------------------------------------------


def test_truncated_and_inconsistent_tables(elf: Elf) -> None:
    out = elf.path.parent / "out"
    meta = layout.META_SECTION
    n_ops = len(elf.t.meta.ops)
    meta_size = elf.t.meta_region.size
    sites_size = elf.t.sites_region.size
    branches_size = elf.t.branches_region.size
    assert branches_size == 2 * layout.BRANCH_REC_SIZE
    bounds = elf.t.meta.table_offset() - layout.BOUNDS.size  # in .linkfix.meta
    cases: list[tuple[Callable[[Elf], None], str]] = [
        (lambda e: e.section(meta, size=20),
         f"{meta}: section {meta} gives {elf.t.meta_region.vaddr:#x} (20 bytes) but "
         f"__linkfix_meta_start..__linkfix_meta_end gives {elf.t.meta_region.vaddr:#x} "
         f"({meta_size} bytes)"),
        (lambda e: e.section(".linkfix.sites", size=sites_size - 4),
         f".linkfix.sites: section .linkfix.sites gives {elf.t.sites_region.vaddr:#x} "
         f"({sites_size - 4} bytes) but __linkfix_sites_start..__linkfix_sites_end gives "
         f"{elf.t.sites_region.vaddr:#x} ({sites_size} bytes)"),
        # One whole record short, by any one of the three descriptions: never patched short.
        (lambda e: e.section(".linkfix.sites", size=sites_size - layout.SITE_REC_SIZE),
         f".linkfix.sites: section .linkfix.sites gives {elf.t.sites_region.vaddr:#x} "
         f"({sites_size - 8} bytes) but __linkfix_sites_start..__linkfix_sites_end gives "
         f"{elf.t.sites_region.vaddr:#x} ({sites_size} bytes)"),
        (lambda e: e.section(".linkfix.branches", size=branches_size - layout.BRANCH_REC_SIZE),
         f".linkfix.branches: section .linkfix.branches gives "
         f"{elf.t.branches_region.vaddr:#x} ({branches_size - layout.BRANCH_REC_SIZE} bytes) but "
         "__linkfix_branches_start..__linkfix_branches_end gives "
         f"{elf.t.branches_region.vaddr:#x} ({branches_size} bytes)"),
        (lambda e: e.meta(bounds + 4, "<i", struct.unpack_from(
            "<i", e.data, e.t.meta_region.offset + bounds + 4)[0] - layout.SITE_REC_SIZE),
         f".linkfix.sites: section .linkfix.sites gives {elf.t.sites_region.vaddr:#x} "
         f"({sites_size} bytes) but the bounds in .linkfix.meta gives "
         f"{elf.t.sites_region.vaddr:#x} ({sites_size - 8} bytes)"),
        (lambda e: e.meta(bounds + 12, "<i", struct.unpack_from(
            "<i", e.data, e.t.meta_region.offset + bounds + 12)[0] + layout.BRANCH_REC_SIZE),
         f".linkfix.branches: section .linkfix.branches gives "
         f"{elf.t.branches_region.vaddr:#x} ({branches_size} bytes) but the bounds in "
         f".linkfix.meta gives {elf.t.branches_region.vaddr:#x} "
         f"({branches_size + layout.BRANCH_REC_SIZE} bytes)"),
        (lambda e: e.meta(14, "<H", 0), f"{meta}: n_ops {n_ops} / n_backends 0 inconsistent"),
        (lambda e: e.meta(18, "<H", 0x7000), f"{meta}: name table runs past the header"),
        (lambda e: e.meta(18, "<H", e.t.meta_region.size - 28 - n_ops - 4),
         f"{meta}: name table not NUL-terminated"),
        (lambda e: e.meta(layout.META_STATE_OFFSET + n_ops + 1, "<B", 0xFF),
         f"{meta}: name table is not UTF-8"),
        (lambda e: e.replace_name(b"op_a", b"op\0a"), f"{meta}: {3 + n_ops + 1} names, "
                                                      f"expected {3 + n_ops}"),
        (lambda e: e.replace_name(b"op_a", b"op-a"), f"{meta}: name 'op-a' is not a C "
                                                     "identifier"),
        (lambda e: e.replace_name(b"lguest", b"native"),
         f"{meta}: bad backend names ['native', 'xen', 'native']"),
        (lambda e: e.replace_name(b"op_b", b"op_a"), f"{meta}: duplicate or empty op names"),
        (lambda e: e.replace_name(b"backend_is(xen)", b"backend_is(xem)"),
         f"{meta}: the last 3 ops must be backend_is(native), backend_is(xen), "
         "backend_is(lguest)"),
        (lambda e: e.section(meta, size=meta_size + 64),
         f"{meta}: section {meta} gives {elf.t.meta_region.vaddr:#x} ({meta_size + 64} bytes) "
         "but __linkfix_meta_start..__linkfix_meta_end gives "
         f"{elf.t.meta_region.vaddr:#x} ({meta_size} bytes)"),
    ]
    for mutate, message in cases:
        e = Elf(Path(elf.img.path), elf.path)
        mutate(e)
        refused(command("patch", e.write(), out), elf.path, message, out)


def test_tables_overlapping_each_other_or_the_headers(elf: Elf) -> None:
    out = elf.path.parent / "out"
    sites = elf.t.sites_region
    repl = elf.t.repl_region
    assert repl is not None
    # .linkfix.repl moved onto the site records.
    elf.section(".linkfix.repl", addr=sites.vaddr, offset=sites.offset)
    refused(command("patch", elf.write(), out), elf.path,
            f".linkfix.repl: section .linkfix.repl gives {sites.vaddr:#x} ({repl.size} bytes) "
            f"but __linkfix_repl_start..__linkfix_repl_end gives {repl.vaddr:#x} "
            f"({repl.size} bytes)", out)
    # .linkfix.repl moved onto the ELF header (the first PT_LOAD maps file offset 0).
    e = Elf(Path(elf.img.path), elf.path)
    base_vaddr = e.img.load_segments[0].vaddr
    e.section(".linkfix.repl", addr=base_vaddr, offset=0)
    refused(command("verify", e.write(), out), elf.path,
            f".linkfix.repl: section .linkfix.repl gives {base_vaddr:#x} ({repl.size} bytes) "
            f"but __linkfix_repl_start..__linkfix_repl_end gives {repl.vaddr:#x} "
            f"({repl.size} bytes)", out)


def test_table_not_file_backed(elf: Elf) -> None:
    out = elf.path.parent / "out"
    bss = max(s.vaddr + s.memsz for s in elf.img.load_segments) - 16
    elf.section(layout.META_SECTION, addr=bss)
    meta = elf.t.meta_region
    refused(command("inspect", elf.write(), out), elf.path,
            f".linkfix.meta: section .linkfix.meta gives {bss:#x} ({meta.size} bytes) but "
            f"__linkfix_meta_start..__linkfix_meta_end gives {meta.vaddr:#x} "
            f"({meta.size} bytes)", out)


def test_table_symbols_end_before_start(tmp_path: Path) -> None:
    path = tmp_path / "nosections"
    si.build_fast(str(path), 6, 64, ops=OPS, site_ops=[0, 1, 0, 1, 2, 3], section_names=False)
    img = image.load(str(path))
    data = bytearray(img.data)
    # Swap the values of the meta start and end symbols.
    symtab = next(s for s in img.sections if s.type == image.SHT_SYMTAB)
    strtab = img.sections[symtab.link]
    slots = {}
    for j in range(symtab.size // 24):
        at = symtab.offset + j * 24
        name_off = struct.unpack_from("<I", data, at)[0]
        s0 = strtab.offset + name_off
        slots[bytes(data[s0:data.index(b"\0", s0)])] = at + 8
    a, b = slots[b"__linkfix_meta_start"], slots[b"__linkfix_meta_end"]
    va, vb = data[a:a + 8], data[b:b + 8]
    data[a:a + 8], data[b:b + 8] = vb, va
    path.write_bytes(data)
    out = tmp_path / "out"
    refused(command("patch", path, out), path,
            "__linkfix_meta_start..__linkfix_meta_end: end before start", out)


def test_sites_table_not_aligned(elf: Elf) -> None:
    out = elf.path.parent / "out"
    sites = elf.t.sites_region
    elf.section(".linkfix.sites", addr=sites.vaddr + 2, offset=sites.offset + 2)
    refused(command("patch", elf.write(), out), elf.path,
            f".linkfix.sites: section .linkfix.sites gives {sites.vaddr + 2:#x} "
            f"({sites.size} bytes) but __linkfix_sites_start..__linkfix_sites_end gives "
            f"{sites.vaddr:#x} ({sites.size} bytes)", out)


def test_op_without_generic_alternative(elf: Elf) -> None:
    out = elf.path.parent / "out"
    # Format 3 keeps the alternatives per op in the header's body table, not per site.
    elf.data[elf.entry(1, 0):elf.entry(1, 0) + layout.BODY.size] = bytes(layout.BODY.size)
    refused(command("verify", elf.write(), out), elf.path,
            f"{layout.META_SECTION}: op op_b alternative generic: absent: every op has its "
            "generic alternative", out)
    # Only the present bit cleared: the entry still names a copy.
    e = Elf(Path(elf.img.path), elf.path)
    e.data[e.entry(1, 0) + 9] = 0
    refused(command("patch", e.write(), out), elf.path,
            f"{layout.META_SECTION}: op 1 alternative 0: absent, but its entry is not empty", out)


@pytest.fixture(scope="module")
def linked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """gcc/ld images: x86-64 with --emit-relocs, -pie, and -g (DWARF)."""
    work = tmp_path_factory.mktemp("linked")
    site_ops = [i % (len(si.DEFAULT_OPS) + 3) for i in range(18)]
    pie_ops = tuple(si.SynthOp(o.name, {b: "rip_movl" if k == "gs_movb" else k
                                        for b, k in o.bodies.items()}) for o in si.DEFAULT_OPS)
    return {
        "relocs": Path(si.build_asm(str(work / "relocs"), str(work / "r"), site_ops, 64,
                                    emit_relocs=True)),
        "pie": Path(si.build_asm(str(work / "pie"), str(work / "p"), site_ops, 64, ops=pie_ops,
                                 pie=True)),
        "debug": Path(si.build_asm(str(work / "debug"), str(work / "d"), site_ops, 64,
                                   debug=True)),
    }


def test_relocation_sections_inconsistent(linked: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    e = Elf(linked["relocs"], tmp_path / "vmlinux")
    text = e.img.section(".text")
    assert text is not None
    # .rela.linkfix.sites claims to relocate .text too.
    info = 44 if e.w64 else 28
    struct.pack_into("<I", e.data, e.shdr_at(".rela.linkfix.sites") + info, text.index)
    refused(command("patch", e.write(), out), e.path,
            f"two relocation sections for section index {text.index}", out)
    # .rela.linkfix.repl names another symbol table than .rela.text: its entries
    # cannot be moved into the site's slots.
    e = Elf(linked["relocs"], tmp_path / "vmlinux")
    link = 40 if e.w64 else 24
    struct.pack_into("<I", e.data, e.shdr_at(".rela.linkfix.repl") + link, 0)
    # The first site whose xen copy has a relocation to move: irq_disable (gs_movb).
    assert e.t.meta.ops[0] == "irq_disable" and e.t.meta.alt(0, 2).digest.fields
    first_xen = next(i for i in range(e.t.n_op_sites)
                     if struct.unpack_from("<H", e.data, e.rec(i) + 4)[0] == 0)
    refused(command("patch", e.write(), out), e.path,
            f"site {e.site_addr(first_xen):#x} (irq_disable): relocation sections .rela.text "
            "and .rela.linkfix.repl differ in kind or symbol table; cannot move relocations",
            out)


def _dynamic_tag(e: Elf, tag: int) -> int:
    """File offset of the d_tag of `tag` in PT_DYNAMIC."""
    for ptype, _f, off, _v, filesz, _m in e.img.segments:
        if ptype == 2:
            for j in range(filesz // 16):
                if struct.unpack_from("<q", e.data, off + 16 * j)[0] == tag:
                    return off + 16 * j
    raise AssertionError(f"no dynamic tag {tag}")


def test_dynamic_relocation_tables_outside_the_image(linked: dict[str, Path],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    e = Elf(linked["pie"], tmp_path / "vmlinux")
    struct.pack_into("<Q", e.data, _dynamic_tag(e, 7) + 8, 0x7FFF0000)  # DT_RELA
    refused(command("patch", e.write(), out), e.path,
            "dynamic relocation table outside PT_LOAD", out)
    e = Elf(linked["pie"], tmp_path / "vmlinux")
    rela, relasz = _dynamic_tag(e, 7), _dynamic_tag(e, 8)
    struct.pack_into("<qQ", e.data, rela, 36, 0x7FFF0000)  # now DT_RELR
    struct.pack_into("<q", e.data, relasz, 35)  # DT_RELRSZ
    refused(command("patch", e.write(), out), e.path, "DT_RELR table outside PT_LOAD", out)


def test_unreadable_dwarf(linked: dict[str, Path], tmp_path: Path) -> None:
    e = Elf(linked["debug"], tmp_path / "vmlinux")
    sec = e.img.section(".debug_line")
    assert sec is not None
    e.data[sec.offset] = 0xFF  # unit_length: runs past the section
    rc, out, err = run("inspect", str(e.write()))
    assert rc == 2 and out == "" and err.count("\n") == 1
    # The rest of the line is pyelftools' own wording, which varies between versions.
    assert err.startswith(f"linkfix: {e.path}: unreadable DWARF line information: ")
    rc, _o, err = run("patch", str(e.path), "-o", str(tmp_path / "out"), "--target", "xen")
    assert rc == 0, err  # patch and verify never read DWARF


# -- site records and stored copies ----------------------------------------------------------


def test_site_over_the_tables_or_the_elf_header(elf: Elf) -> None:
    out = elf.path.parent / "out"
    # Make the tables' segment executable (as in a kernel linked into one RWX
    # segment): then only the new check stands between a site and the tables.
    elf.phdr_flags(1, 5)
    meta = elf.t.meta_region.vaddr
    elf.site_at(3, meta)
    refused(command("patch", elf.write(), out), elf.path,
            f"site {meta:#x} (op_b): lies in .linkfix.meta", out)
    e = Elf(Path(elf.img.path), elf.path)
    e.phdr_flags(1, 5)
    rec = e.rec_vaddr(5)
    e.site_at(0, rec)
    refused(command("patch", e.write(), out), elf.path,
            f"site {rec:#x} (op_a): lies in .linkfix.sites", out)
    e = Elf(Path(elf.img.path), elf.path)
    top = e.img.load_segments[0].vaddr + 8  # file offset 8: the ELF header
    e.site_at(2, top)
    refused(command("verify", e.write(), out), elf.path,
            f"site {top:#x} (op_a): lies in the ELF header", out)
    # Branch records: a branch site over .linkfix.branches or the stored copies.
    for name, table, rec_j in ((".linkfix.branches", e.t.branches_region, 1),
                               (".linkfix.repl", e.t.repl_region, 0)):
        assert table is not None and table.size >= 5
        e = Elf(Path(elf.img.path), elf.path)
        e.phdr_flags(1, 5)
        struct.pack_into("<i", e.data, e.brec(rec_j), table.vaddr - e.brec_vaddr(rec_j))
        op = ("backend_is(native)", "backend_is(xen)")[rec_j]
        refused(command("patch", e.write(), out), elf.path,
                f"site {table.vaddr:#x} ({op}): lies in {name}", out)


def test_copy_outside_repl(elf: Elf) -> None:
    out = elf.path.parent / "out"
    # The body table entry of op_a xen (gs_movb) pointed at site 1's bytes in .text.
    target = elf.site_addr(1)
    entry = elf.entry(0, 2)
    struct.pack_into("<i", elf.data, entry, target - (elf.t.meta_region.vaddr + entry
                                                      - elf.t.meta_region.offset))
    n = 9 if elf.w64 else 8
    # Every copy is checked, the selected ones or not.
    refused(command("patch", elf.write(), out, "native"), elf.path,
            f"{layout.META_SECTION}: op op_a alternative xen: copy at {target:#x} ({n} bytes) "
            "lies outside .linkfix.repl", out)


def test_copies_that_cannot_be_placed(elf: Elf) -> None:
    out = elf.path.parent / "out"
    meta = layout.META_SECTION
    # op_a native `cli` (and its padding) with a lone 0x0f first: not what gen-stubs stored.
    code = elf.put_copy(0, 1, b"\x0f")
    d = elf.t.meta.alt(0, 1).digest
    refused(command("patch", elf.write(), out, "native"), elf.path,
            f"{meta}: op op_a alternative native: copy {code.hex()} does not match the digest "
            f"gen-stubs recorded (crc {d.crc:#010x})", out)
    # op_a lguest: `je` into the middle of a `jmp` that leaves the copy, with a digest
    # that agrees: the decoded copy has a PC-relative field the header does not record.
    e = Elf(Path(elf.img.path), elf.path)
    code = e.put_copy(0, 3, b"\x74\x01\xeb\xf9\x90", fix_crc=True)
    refused(command("patch", e.write(), out, "lguest"), elf.path,
            f"{meta}: op op_a alternative lguest: copy {code.hex()}: its PC-relative fields "
            "[(3, 1)] are not the relocated fields the header records []", out)
    # backend_is(xen) (op 3), alternative xen: the jmp to the site's "true" label is
    # stored nowhere; a body table entry that names a copy is corrupt.
    e = Elf(Path(elf.img.path), elf.path)
    struct.pack_into("<i", e.data, e.entry(3, 2), 0x40)
    refused(command("patch", e.write(), out, "xen"), elf.path,
            f"{meta}: op backend_is(xen) alternative xen: not the 5-byte jmp to a label of its "
            "site", out)
    # The branches' shared 5-byte NOP ("false") changed: refused for the first op using it.
    e = Elf(Path(elf.img.path), elf.path)
    code = e.put_copy(2, 2, b"\x90")
    crc = e.t.meta.alt(2, 2).digest.crc
    assert e.copy_addr(2, 2) == e.copy_addr(3, 1)
    refused(command("verify", e.write(), out), elf.path,
            f"{meta}: op backend_is(native) alternative xen: copy {code.hex()} does not match "
            f"the digest gen-stubs recorded (crc {crc:#010x})", out)


FAR_OPS = (si.SynthOp("far", {"native": "cli", "lguest": "rip_movl"}),)


def _far(tmp_path: Path) -> Elf:
    path = tmp_path / "vmlinux"
    si.build_fast(str(path), 4, 64, ops=FAR_OPS, site_ops=[0, 0, 0, 0])
    return Elf(path, path)


@pytest.mark.parametrize("where", ["copy", "record"])
def test_rip_relative_displacement_out_of_range(tmp_path: Path, where: str) -> None:
    e = _far(tmp_path)
    off = e.img.offset_of(e.copy_addr(0, 3))
    assert off is not None and e.data[off:off + 2] == b"\xc7\x05"
    out = tmp_path / "out"
    if where == "copy":
        # The copy's field aimed 2 GiB - 256 after it: the header records where the link
        # pointed the field, and a copy that reaches elsewhere is refused before any site
        # is touched.
        struct.pack_into("<i", e.data, off + 2, 0x7FFFFF00)
        message = (f"{layout.META_SECTION}: op far alternative lguest: the relocated field at "
                   f"+2 of copy {e.copy(0, 3).hex()} does not point where the link pointed it")
    else:
        # The recorded target 4 GiB further: the copy's 32-bit field agrees (modulo 2**32),
        # but no site reaches it with a signed 32-bit displacement.
        at = e.recorded_target(0, 3)
        value = struct.unpack_from("<q", e.data, at)[0]
        struct.pack_into("<q", e.data, at, value + (1 << 32))
        message = (f"site {e.site_addr(0):#x} (far): alternative lguest: relocated "
                   "displacement does not fit in 32 bits")
    refused(command("patch", e.write(), out, "lguest"), e.path, message, out)
    if where == "record":  # the generic and native alternatives need no such field
        rc, _o, err = run(*command("patch", e.path, out, "native"))
        assert rc == 0, err


def test_inspect_shows_a_copy_that_cannot_be_placed(tmp_path: Path) -> None:
    # inspect reports per alternative instead of failing: the image is still readable.
    e = _far(tmp_path)
    at = e.recorded_target(0, 3)
    struct.pack_into("<q", e.data, at, struct.unpack_from("<q", e.data, at)[0] + (1 << 32))
    rc, out, err = run("inspect", str(e.write()))
    assert rc == 0, err
    assert out.count("lguest     (cannot be placed: alternative lguest: relocated displacement "
                     "does not fit in 32 bits)") == 4
    assert out.count("native     cli") == 4


def test_inspect_refuses_a_corrupt_copy(elf: Elf) -> None:
    # A copy that is not what gen-stubs stored is refused by every command: inspect too
    # checks every copy once, before it reads any site.
    code = elf.put_copy(0, 1, b"\x0f")
    d = elf.t.meta.alt(0, 1).digest
    refused(["inspect", str(elf.write())], elf.path,
            f"{layout.META_SECTION}: op op_a alternative native: copy {code.hex()} does not "
            f"match the digest gen-stubs recorded (crc {d.crc:#010x})")


# -- selection -------------------------------------------------------------------------------


def test_policy_file_errors(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pol = tmp_path / "policy.toml"
    for content, message in [
        (b"\xff\xfe", "policy is not UTF-8 (byte 0)"),
        (b"target = 3\n", "policy 'target' must be a string"),
        (b'target = "kvm"\n', "policy target: unknown backend 'kvm' (known: generic, native, "
                              "xen, lguest)"),
        (b'target = "xen"\n[ops]\nop_a = 1\n',
         "policy [ops] must map op names to backend name strings"),
        (b'target = "xen"\n[ops]\n"op_a\\n" = "xen"\n',
         "policy [ops] op_a\\n: unknown op 'op_a\\n' (known: op_a, op_b, backend_is(native), "
         "backend_is(xen), backend_is(lguest))"),
    ]:
        pol.write_bytes(content)
        refused(["patch", str(base), "-o", str(out), "--policy", str(pol)], pol, message, out)
    refused(["patch", str(base), "-o", str(out), "--policy", str(tmp_path)], tmp_path,
            "cannot read policy: Is a directory", out)
    refused(["verify", str(base), "--policy", str(tmp_path / "none.toml")],
            tmp_path / "none.toml", "cannot read policy: No such file or directory")


def test_op_argument_errors(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for arg, message in [
        ("=xen", "--op =xen: expected OP=BACKEND"),
        ("op_a=", "--op op_a=: expected OP=BACKEND"),
        ("backend_is(kvm)=xen", "--op backend_is(kvm)=xen: unknown op 'backend_is(kvm)' "
                                "(known: op_a, op_b, backend_is(native), backend_is(xen), "
                                "backend_is(lguest))"),
    ]:
        refused(["patch", str(base), "-o", str(out), "--target", "xen", "--op", arg], base,
                message, out)


# -- output files ----------------------------------------------------------------------------


def test_output_directory_missing_or_output_a_directory(base: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nodir" / "out"
    refused(["patch", str(base), "-o", str(missing), "--target", "xen"], missing,
            "cannot create output: No such file or directory")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("keep")
    refused(["patch", str(base), "-o", str(tmp_path / "d"), "--target", "xen"], tmp_path / "d",
            "cannot write output: Is a directory")
    assert (tmp_path / "d" / "x").read_text() == "keep"
    assert temp_files(tmp_path) == []


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str) -> Iterator[bool]:
    """A tmpfs at `where` when this process may mount one (root with CAP_SYS_ADMIN)."""
    where.mkdir()
    ok = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", str(where)], check=True)


def test_unwritable_output_directory(base: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    with mounted_tmpfs(ro, "ro,size=64k") as ok:
        if ok:
            reason = "Read-only file system"
        elif os.geteuid() != 0:
            ro.chmod(0o555)
            reason = "Permission denied"
        else:
            pytest.skip("root without permission to mount: no way to make a directory unwritable")
        out = ro / "vmlinux.xen"
        refused(["patch", str(base), "-o", str(out), "--target", "xen"], out,
                f"cannot create output: {reason}")
        rc, _o, err = run("gen-stubs", str(SPECS / "x86_64.toml"), "-o", str(ro / "gen"))
        assert rc == 2 and err.startswith(f"linkfix: {ro / 'gen'}: cannot create output "
                                          f"directory: {reason}"), err
        assert list(ro.iterdir()) == []


def _enospc(*_a: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_simulated(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from fsync (what a full disk or quota gives at the latest), in-process."""
    out = tmp_path / "out"
    out.write_bytes(b"previous")
    monkeypatch.setattr(os, "fsync", _enospc)
    rc, stdout, err = run("patch", str(base), "-o", str(out), "--target", "xen")
    assert (rc, stdout, err) == (2, "", f"linkfix: {out}: cannot write output: No space left "
                                        "on device\n")
    assert out.read_bytes() == b"previous"
    assert temp_files(tmp_path) == []


def test_disk_full_tmpfs(base: Path, tmp_path: Path) -> None:
    """A real ENOSPC: a 64 KiB tmpfs is smaller than the gen-stubs output and the image."""
    small = tmp_path / "small"
    with mounted_tmpfs(small, "size=64k") as ok:
        if not ok:
            pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
        big = small / "big"
        big.write_bytes(bytes(40 * 1024))  # leave ~24 KiB
        image_big = tmp_path / "image"
        si.build_fast(str(image_big), 2000, 64, ops=OPS)
        assert image_big.stat().st_size > 2 * 24 * 1024  # format 3 images are compact
        out = small / "out"
        refused(["patch", str(image_big), "-o", str(out), "--target", "xen"], out,
                "cannot write output: No space left on device", out)
        # gen-stubs: six files, all or none.
        gen = small / "gen"
        rc, _o, err = run("gen-stubs", str(SPECS / "x86_64.toml"), "-o", str(gen))
        assert rc == 2 and "No space left on device" in err and err.count("\n") == 1, err
        assert not gen.exists()
        assert sorted(p.name for p in small.iterdir()) == ["big"]


def test_gen_stubs_writes_all_files_or_none(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "gen"
    rc, _o, err = run("gen-stubs", str(SPECS / "i386.toml"), "-o", str(out))
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # Another spec (one body changed), and the disk fills up on the third file.
    spec = tmp_path / "spec.toml"
    spec.write_text((SPECS / "i386.toml").read_text().replace('native = "cli"',
                                                              'native = "cli; nop"'))
    real_stage = fileio._stage
    calls = []

    def stage(path: str, data: bytes, mode: int | None) -> str:
        calls.append(path)
        if len(calls) == 3:
            raise fileio.BadInput(path, "cannot write output: No space left on device")
        return real_stage(path, data, mode)

    monkeypatch.setattr(fileio, "_stage", stage)
    rc, _o, err = run("gen-stubs", str(spec), "-o", str(out))
    assert rc == 2 and err.endswith("cannot write output: No space left on device\n"), err
    assert len(calls) == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no mixed set


def test_output_is_the_input_through_a_link(base: Path, tmp_path: Path) -> None:
    copy = tmp_path / "vmlinux"
    shutil.copy(base, copy)
    (tmp_path / "sym").symlink_to(copy)
    os.link(copy, tmp_path / "hard")
    before = copy.read_bytes()
    for other in ("sym", "hard"):
        refused(["patch", str(copy), "-o", str(tmp_path / other), "--target", "xen"], copy,
                "output is the input; use --in-place to patch it in place")
    assert copy.read_bytes() == before


def test_in_place_failure_leaves_the_input(elf: Elf) -> None:
    struct.pack_into("<H", elf.data, elf.rec(4) + 4, 99)  # op index out of range
    path = elf.write()
    before = path.read_bytes()
    inode = path.stat().st_ino
    rc, _o, err = run("patch", str(path), "--in-place", "--target", "xen")
    assert rc == 2 and "op index 99 is not an op (n_real_ops 2)" in err
    assert path.read_bytes() == before and path.stat().st_ino == inode
    assert temp_files(path.parent) == []


def test_in_place_replaces_atomically(base: Path, tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    shutil.copy(base, path)
    reader = open(path, "rb")  # a reader of the old file keeps seeing the old bytes
    before = path.read_bytes()
    rc, _o, err = run("patch", str(path), "--in-place", "--target", "xen")
    assert rc == 0, err
    assert reader.read() == before
    reader.close()
    assert path.read_bytes() != before
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(base.stat().st_mode)
    assert temp_files(tmp_path) == []


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate' (choose from 'gen-stubs', "
                     "'patch', 'inspect', 'verify') (see 'linkfix --help')"),
    (["patch", "x"], "one of the arguments -o/--output --in-place is required "
                     "(see 'linkfix patch --help')"),
    (["patch", "x", "-o", "y", "--in-place"], "argument --in-place: not allowed with argument "
                                              "-o/--output (see 'linkfix patch --help')"),
    (["inspect"], "the following arguments are required: image (see 'linkfix inspect --help')"),
    (["verify", "x", "--colour"], "unrecognized arguments: --colour (see 'linkfix --help')"),
    (["gen-stubs", "spec.toml"], "the following arguments are required: -o/--output "
                                 "(see 'linkfix gen-stubs --help')"),
])
def test_usage_errors_are_one_line(argv: list[str], message: str) -> None:
    rc, out, err = run(*argv)
    assert (rc, out, err) == (2, "", f"linkfix: {message}\n")


def test_internal_error_is_one_line_and_debug_shows_the_traceback(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from linkfix.postlink import patch
    def boom(_args: object) -> int:
        raise KeyError("x")

    monkeypatch.setattr(patch, "run", boom)
    argv = ["patch", str(base), "-o", "/nonexistent/out", "--target", "xen"]
    assert run(*argv) == (1, "", "linkfix: internal error: KeyError: 'x'\n")
    for dbg in (["--debug", *argv], [*argv, "--debug"]):
        rc, _o, err = run(*dbg)
        assert rc == 1
        assert err.startswith("Traceback (most recent call last):")
        assert err.endswith("linkfix: internal error: KeyError: 'x'\n")


def test_debug_before_or_after_the_command(base: Path) -> None:
    for argv in (["--debug", "verify", str(base), "--target", "kvm"],
                 ["verify", str(base), "--target", "kvm", "--debug"]):
        rc, _o, err = run(*argv)
        assert rc == 2 and "Traceback" in err and "linkfix.errors.BadInput" in err, argv
    rc, _o, err = run("verify", str(base), "--target", "kvm")
    assert rc == 2 and "Traceback" not in err


def test_unprintable_characters_are_escaped(base: Path, tmp_path: Path) -> None:
    odd = tmp_path / "a\nb"
    refused(["inspect", str(odd)], str(odd).replace("\n", "\\n"),
            "cannot read: No such file or directory")


def test_sigterm_while_writing_leaves_no_temporary_file(
        base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """make stopping its jobs sends SIGTERM: the run unwinds, the temporary file goes."""
    out = tmp_path / "out"

    def terminated(_fd: int) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the temporary file exists

    monkeypatch.setattr(os, "fsync", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert run("patch", str(base), "-o", str(out), "--target", "xen") == \
        (cli.EXIT_TERMINATED, "", "linkfix: terminated\n")
    assert not out.exists() and temp_files(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_closed_pipe_is_quiet(tmp_path: Path) -> None:
    path = tmp_path / "big"
    si.build_fast(str(path), 2000, 64)
    p = subprocess.Popen([sys.executable, "-m", "linkfix", "inspect", str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.read(100)
    p.stdout.close()  # `| head -c 100`
    err = p.stderr.read()
    assert p.wait(timeout=60) == cli.EXIT_BROKEN_PIPE
    assert err == b""


def test_real_cli_prints_no_traceback(elf: Elf) -> None:
    struct.pack_into("<H", elf.data, elf.rec(0) + 4, 99)
    path = elf.write()
    for cmd in COMMANDS:
        r = proc(*command(cmd, path, path.parent / "out"))
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr == (f"linkfix: {path}: site {elf.site_addr(0):#x} (op#99): op index 99 "
                            "is not an op (n_real_ops 2)\n")


# -- reproducibility -------------------------------------------------------------------------


def _env(hashseed: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = hashseed
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_outputs_are_byte_identical_across_runs(tmp_path: Path) -> None:
    """gen-stubs, patch and inspect in two processes: different hash seeds, different cwd."""
    src_dir = tmp_path / "src"
    img = Path(si.build_asm(str(tmp_path / "linked"), str(src_dir), SITE_OPS * 2, 64,
                            ops=OPS, emit_relocs=True, debug=True))
    results = []
    for run_dir, hashseed in ((tmp_path / "a", "1"), (tmp_path / "b" / "deeper", "4242")):
        run_dir.mkdir(parents=True)
        shutil.copy(SPECS / "x86_64.toml", run_dir / "spec.toml")
        shutil.copy(img, run_dir / "vmlinux")
        env = _env(hashseed)
        outs: dict[str, bytes] = {}
        r = proc("gen-stubs", "spec.toml", "-o", "gen", "-q", cwd=run_dir, env=env)
        assert r.returncode == 0, r.stderr
        for f in sorted((run_dir / "gen").iterdir()):
            outs[f"gen/{f.name}"] = f.read_bytes()
        for target in ("xen", "lguest"):
            r = proc("patch", "vmlinux", "-o", f"vmlinux.{target}", "--target", target,
                     "--op", "op_b=native", "-q", cwd=run_dir, env=env)
            assert r.returncode == 0, r.stderr
            outs[target] = (run_dir / f"vmlinux.{target}").read_bytes()
        for argv in (["inspect", "vmlinux.xen", "--json"], ["inspect", "vmlinux"]):
            r = proc(*argv, cwd=run_dir, env=env)
            assert r.returncode == 0, r.stderr
            outs[" ".join(argv)] = r.stdout.encode()
        results.append(outs)
    # generated files and gen-stubs' cache (its key holds no cwd or hash seed either),
    # images, inspect outputs
    assert len(results[0]) == 7 + 1 + 2 + 2 and f"gen/{gencache.CACHE_NAME}" in results[0]
    assert results[0] == results[1]
    assert b'"line": "' in results[0]["inspect vmlinux.xen --json"]  # DWARF was read


# -- concurrency -----------------------------------------------------------------------------


def test_parallel_patch_runs_do_not_interfere(tmp_path: Path) -> None:
    """Eight `linkfix patch` processes in one directory at once, as `make -j8` would run them."""
    src = Path(si.build_asm(str(tmp_path / "vmlinux"), str(tmp_path / "src"), SITE_OPS * 20,
                            32, ops=OPS, emit_relocs=True))
    jobs = {
        "native": ["--target", "native"], "xen": ["--target", "xen"],
        "lguest": ["--target", "lguest"], "generic": ["--target", "generic"],
        "mixed1": ["--target", "xen", "--op", "op_a=native"],
        "mixed2": ["--target", "lguest", "--op", "op_b=xen"],
    }
    expected = {}
    for name, sel in jobs.items():
        serial = tmp_path / f"serial.{name}"
        rc, _o, err = run("patch", str(src), "-o", str(serial), *sel)
        assert rc == 0, err
        expected[f"out.{name}"] = serial.read_bytes()
    # Two more jobs patch their own copies in place, in the same directory.
    for name in ("inplace1", "inplace2"):
        shutil.copy(src, tmp_path / f"out.{name}")
        expected[f"out.{name}"] = expected["out.xen"]
    argvs = [["patch", str(src), "-o", str(tmp_path / f"out.{n}"), *sel, "-q"]
             for n, sel in jobs.items()]
    argvs += [["patch", str(tmp_path / f"out.{n}"), "--in-place", "--target", "xen", "-q"]
              for n in ("inplace1", "inplace2")]
    assert len(argvs) == 8
    for _round in range(3):
        procs = [subprocess.Popen([sys.executable, "-m", "linkfix", *a], stderr=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for a in argvs]
        for p in procs:
            _out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        for name, data in expected.items():
            assert (tmp_path / name).read_bytes() == data, name
        assert temp_files(tmp_path) == []
        # In-place jobs re-patch an already patched image in the next round: same bytes.


def test_parallel_gen_stubs_into_one_directory(tmp_path: Path) -> None:
    serial = tmp_path / "serial"
    rc, _o, err = run("gen-stubs", str(SPECS / "x86_64.toml"), "-o", str(serial), "-q")
    assert rc == 0, err
    shared = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-m", "linkfix", "gen-stubs",
                               str(SPECS / "x86_64.toml"), "-o", str(shared), "-q"],
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err

    def generated(d: Path) -> dict[str, bytes]:
        # The cache's key differs in-process (the modules this process loaded): it is
        # compared for being there and valid, the generated files byte for byte.
        assert gencache.load(str(d / gencache.CACHE_NAME)) is not None
        return {p.name: p.read_bytes() for p in d.iterdir() if p.name != gencache.CACHE_NAME}

    assert generated(shared) == generated(serial)
    assert len(list(shared.iterdir())) == len(list(serial.iterdir())) == 8  # 7 and the cache


# -- the fuzzer, a fixed slice ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_module():  # noqa: ANN201 - tests/tools/fuzz.py, imported from its directory
    sys.path.insert(0, str(ROOT / "tests" / "tools"))
    try:
        import fuzz
    finally:
        sys.path.pop(0)
    return fuzz


def test_fuzz_slice(fuzz_module, tmp_path: Path) -> None:  # noqa: ANN001
    """300 in-process cases, 10 through the real CLI: no bug of any class, silent wrong
    output (a successful patch wrong by the unmutated seed image) included."""
    f = fuzz_module
    assert "silent_wrong" in f.BUGS
    no_bugs = dict.fromkeys(f.BUGS, 0)
    seeds = f.build_corpus(str(tmp_path), genstubs=True, ld=True, sample=False)
    res = f.fuzz(seeds, 20240501, 0, 300, 20.0, str(tmp_path))
    assert {b: res.counts[b] for b in f.BUGS} == no_bugs, \
        [(o, c.ident, c.mutation, c.argv, d) for o, c, d in res.bugs]
    assert res.bugs == []
    assert res.counts["ok"] > 30 and res.counts["refused"] > 100 and res.counts["mismatch"] > 0
    sub = f.fuzz_subprocess(seeds, 20240501, 300, 10, 20.0, str(tmp_path))
    assert {b: sub.counts[b] for b in f.BUGS} == no_bugs, \
        [(o, c.ident, c.mutation, c.argv, d) for o, c, d in sub.bugs]
    assert sub.bugs == []
    assert sum(sub.counts.values()) == 10


def test_fuzz_scale_slice(fuzz_module, tmp_path: Path) -> None:  # noqa: ANN001
    """Whole-table corruptions of a 100,000-site image end well within the hang bound."""
    res = fuzz_module.fuzz_scale(5, 3, 120.0, str(tmp_path))
    assert res.bugs == [], [(o, c.mutation, c.argv, d) for o, c, d in res.bugs]
    assert sum(res.counts.values()) == 3
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no alarm left behind
