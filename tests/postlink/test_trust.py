"""patch never writes a byte it cannot prove right: the examples of a hostile image.

Every image here is real: gen-stubs output of tests/specs/<arch>.toml compiled by
gcc and linked by GNU ld with ldscripts/minimal.lds. Each corruption must end
in one line and exit 2 from patch (and from verify where it reads the same
bytes), with no output written.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_patch_ld import USES_C

from linkfix import layout
from linkfix.postlink import image, tables

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "tests" / "specs"


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linkfix", *argv], capture_output=True,
                          text=True, cwd=ROOT)


def _sh(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, (cmd, r.stderr)


def build(arch: str, work: Path) -> Path:
    out = work / "stubs"
    _sh([sys.executable, "-m", "linkfix", "gen-stubs", str(SPECS / f"{arch}.toml"), "-o",
         str(out)], ROOT)
    m = ["-m32", "-mregparm=3"] if arch == "i386" else ["-mno-red-zone"]
    (work / "uses.c").write_text(USES_C)
    cc = ["gcc", *m, "-O2", "-ffreestanding", "-fno-pic", "-fno-stack-protector", f"-I{out}",
          "-c"]
    _sh([*cc, "uses.c", "-o", "uses.o"], work)
    _sh([*cc, str(out / "linkfix_ops.c"), "-o", "ops.o"], work)
    _sh(["gcc", *m[:1], "-c", str(out / "linkfix_thunks.S"), "-o", "thunks.o"], work)
    emu = "elf_i386" if arch == "i386" else "elf_x86_64"
    _sh(["ld", "-m", emu, "-L", str(out), "-T", str(ROOT / "ldscripts" / "minimal.lds"),
         "-o", "vmlinux", "uses.o", "ops.o", "thunks.o"], work)
    return work / "vmlinux"


@pytest.fixture(scope="module", params=["x86_64", "i386"])
def linked(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(request.param, tmp_path_factory.mktemp(request.param))


class Mut:
    """A copy of the linked image to corrupt, with its parsed tables."""

    def __init__(self, src: Path, dst: Path) -> None:
        self.src, self.path = src, dst
        self.data = bytearray(src.read_bytes())
        self.img = image.Image(str(src), bytes(self.data))
        self.t = tables.load(self.img)
        self.chk = tables.check_records(self.t)
        self.w64 = self.img.bits == 64

    def site_of(self, op: str) -> int:
        k = self.t.meta.ops.index(op)
        return next(i for i in range(self.t.n_sites) if self.chk.shape_of(i).op == k)

    def copy_offset(self, op: str, backend: str) -> tuple[int, bytes]:
        """File offset and bytes of the one stored copy of `op`'s alternative `backend`."""
        j = self.t.meta.ops.index(op)
        k = 0 if backend == "generic" else self.t.meta.backends.index(backend) + 1
        c = self.chk.copies[(j, k)]
        assert c.addr is not None
        off = self.img.offset_of(c.addr, c.length)
        assert off is not None
        code = bytes(self.data[off:off + c.length])
        assert code == c.code
        return off, code

    def write(self) -> Path:
        self.path.write_bytes(self.data)
        return self.path

    def phdr(self, index: int) -> int:
        phoff = struct.unpack_from("<Q" if self.w64 else "<I", self.data, 32 if self.w64 else 28)[0]
        return phoff + index * (56 if self.w64 else 32)

    def set_phdr(self, index: int, **fields: int) -> None:
        where64 = {"type": (0, "<I"), "flags": (4, "<I"), "offset": (8, "<Q"),
                   "vaddr": (16, "<Q"), "filesz": (32, "<Q"), "memsz": (40, "<Q")}
        where32 = {"type": (0, "<I"), "offset": (4, "<I"), "vaddr": (8, "<I"),
                   "filesz": (16, "<I"), "memsz": (20, "<I"), "flags": (24, "<I")}
        for name, value in fields.items():
            off, fmt = (where64 if self.w64 else where32)[name]
            struct.pack_into(fmt, self.data, self.phdr(index) + off, value)

    def set_section(self, name: str, size: int) -> None:
        shoff = struct.unpack_from("<Q" if self.w64 else "<I", self.data, 40 if self.w64 else 32)[0]
        sec = self.img.section(name)
        assert sec is not None
        at = shoff + sec.index * (64 if self.w64 else 40) + (32 if self.w64 else 20)
        struct.pack_into("<Q" if self.w64 else "<I", self.data, at, size)

    def set_symbol(self, name: str, value: int) -> None:
        symtab = next(s for s in self.img.sections if s.type == image.SHT_SYMTAB)
        strtab = self.img.sections[symtab.link]
        ent = 24 if self.w64 else 16
        for j in range(symtab.size // ent):
            at = symtab.offset + j * ent
            (n,) = struct.unpack_from("<I", self.data, at)
            s0 = strtab.offset + n
            if bytes(self.data[s0:self.data.index(b"\0", s0)]) == name.encode():
                struct.pack_into("<Q" if self.w64 else "<I", self.data,
                                 at + (8 if self.w64 else 4), value)
                return
        raise AssertionError(name)


def refused(r: subprocess.CompletedProcess[str], path: Path, text: str,
            out: Path | None = None) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"linkfix: {path}: "), r.stderr
    assert text in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    if out is not None:
        assert not out.exists()
    return r.stderr


def test_record_aimed_into_a_function_is_not_overwritten(linked: Path, tmp_path: Path) -> None:
    m = Mut(linked, tmp_path / "vmlinux")
    i = m.site_of("irq_disable")
    fn = m.img.symbol_value("linkfix_boot_select")
    assert fn is not None
    f1 = fn + 8  # the middle of a function with no site of its own
    assert all(not fn <= s < fn + 64 for s in m.chk.site_addrs)
    assert i < m.t.n_op_sites  # op site records come first: site i is record i
    rec = m.t.sites_region.offset + i * layout.SITE_REC_SIZE
    assert struct.unpack_from("<i", m.data, rec)[0] + m.t.sites_region.vaddr + \
        i * layout.SITE_REC_SIZE == m.chk.site_addrs[i]
    struct.pack_into("<i", m.data, rec, f1 - (m.t.sites_region.vaddr + i * layout.SITE_REC_SIZE))
    path = m.write()
    out = tmp_path / "out"
    # verify already disagrees (exit 3); patch must refuse rather than write xen's body there.
    assert run("verify", str(path)).returncode == 3
    refused(run("patch", str(path), "-o", str(out), "--target", "xen"), path,
            f"site {f1:#x} (irq_disable): holds ", out)
    err = run("patch", str(path), "-o", str(out), "--target", "xen").stderr
    assert "its state record implies; refusing to overwrite bytes linkfix does not recognise" \
        in err


def test_flipped_bit_in_a_body_is_refused(linked: Path, tmp_path: Path) -> None:
    """Format 3 stores one copy of irq_disable's native body for all its sites: a bit
    flipped in it is refused by every patch and verify (each copy is checked before
    anything is written), whichever alternative the selection uses."""
    m = Mut(linked, tmp_path / "vmlinux")
    off, code = m.copy_offset("irq_disable", "native")
    j = code.index(0xFA)  # cli, after the redundant segment prefixes gen-stubs added
    assert set(code[:j]) <= {0x2E, 0x3E, 0x36} and len(code) == m.chk.shape_of(
        m.site_of("irq_disable")).site_len
    m.data[off + j] = 0xFB  # sti: every irq_disable() would enable interrupts
    bad = code[:j] + b"\xfb" + code[j + 1:]
    path = m.write()
    out = tmp_path / "out"
    for argv in (["patch", str(path), "-o", str(out), "--target", "native"],
                 ["patch", str(path), "-o", str(out), "--target", "xen"],
                 ["verify", str(path), "--target", "native"],
                 ["verify", str(path)]):
        refused(run(*argv), path, f".linkfix.meta: op irq_disable alternative native: copy "
                                  f"{bad.hex()} does not match the digest gen-stubs recorded",
                out)
    # The unflipped image patches.
    assert run("patch", str(linked), "-o", str(out), "--target", "native").returncode == 0


def test_a_copy_calling_elsewhere_is_refused(linked: Path, tmp_path: Path) -> None:
    """A relocated field is masked in the digest; what it must hold is the link's record
    (symbol + addend). A stored copy's call aimed elsewhere is refused, a backend's as well
    as the generic dispatch call's."""
    m = Mut(linked, tmp_path / "vmlinux")
    off, code = m.copy_offset("save_fl", "xen")
    assert code[0] == 0xE8
    struct.pack_into("<i", m.data, off + 1, struct.unpack_from("<i", m.data, off + 1)[0] + 16)
    path = m.write()
    out = tmp_path / "out"
    refused(run("patch", str(path), "-o", str(out), "--target", "xen"), path,
            f".linkfix.meta: op save_fl alternative xen: the relocated field at +1 of copy "
            f"{bytes(m.data[off:off + len(code)]).hex()} does not point where the link "
            "pointed it", out)
    # The generic alternative (the dispatch call) of another op, aimed elsewhere too.
    m2 = Mut(linked, tmp_path / "v2")
    goff, gcode = m2.copy_offset("irq_enable", "generic")
    assert gcode[0] == 0xE8
    m2.data[goff + 4] ^= 0x40
    p2 = m2.write()
    for argv in (["patch", str(p2), "-o", str(out), "--target", "native"],
                 ["verify", str(p2)]):
        refused(run(*argv), p2, ".linkfix.meta: op irq_enable alternative generic: the "
                                "relocated field at +1 of copy ", out)


def test_overlapping_load_segments_are_refused(linked: Path, tmp_path: Path) -> None:
    m = Mut(linked, tmp_path / "vmlinux")
    t = next(s for s in m.img.load_segments if s.executable)
    # Another program header (PT_GNU_STACK) turned into a second mapping of the
    # sites' addresses, from other file bytes: the loader and patch would disagree.
    other = next(n for n, seg in enumerate(m.img.segments) if seg[0] != image.PT_LOAD)
    m.set_phdr(other, type=image.PT_LOAD, flags=5, vaddr=t.vaddr, offset=t.offset + 0x40,
               filesz=t.filesz - 0x40, memsz=t.filesz - 0x40)
    path = m.write()
    out = tmp_path / "out"
    err = refused(run("patch", str(path), "-o", str(out), "--target", "xen"), path,
                  "PT_LOAD segments", out)
    assert "overlapping addresses" in err or "the same file bytes" in err


def test_site_past_the_file_bytes_is_refused(linked: Path, tmp_path: Path) -> None:
    m = Mut(linked, tmp_path / "vmlinux")
    segs = m.img.load_segments
    text = next(n for n, s in enumerate(segs) if s.executable)
    t = segs[text]
    first = min(m.chk.site_addrs)
    m.set_phdr(text, filesz=first - t.vaddr)  # p_filesz < p_memsz over every site
    path = m.write()
    out = tmp_path / "out"
    r = run("patch", str(path), "-o", str(out), "--target", "xen")
    assert r.returncode == 2
    # Here the tables lie past the file bytes too: whichever is checked first refuses.
    assert "not in the file bytes of its PT_LOAD segment" in r.stderr or \
        "is not file-backed in a PT_LOAD segment" in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("how", ["section-shrunk", "section-zeroed", "symbol-end",
                                 "both-shrunk"])
def test_sites_table_described_short_is_refused(linked: Path, tmp_path: Path, how: str) -> None:
    m = Mut(linked, tmp_path / "vmlinux")
    r = m.t.sites_region
    rs = layout.SITE_REC_SIZE
    if how == "section-shrunk":
        m.set_section(".linkfix.sites", r.size - rs)
    elif how == "section-zeroed":
        m.set_section(".linkfix.sites", 0)
    elif how == "symbol-end":
        m.set_symbol("__linkfix_sites_end", r.vaddr + r.size - rs)
    else:  # section and symbols agree with each other, not with the header's link-time bounds
        m.set_section(".linkfix.sites", r.size - rs)
        m.set_symbol("__linkfix_sites_end", r.vaddr + r.size - rs)
    path = m.write()
    out = tmp_path / "out"
    err = refused(run("patch", str(path), "-o", str(out), "--target", "xen"), path,
                  ".linkfix.sites: ", out)
    assert "gives" in err
    if how == "both-shrunk":
        assert "the bounds in .linkfix.meta" in err


def test_sparse_image_is_read_through_mmap(tmp_path: Path, linked: Path) -> None:
    """A 2 GB sparse image is patched without holding it in memory (input mapped,
    output a kernel copy edited through a mapping): peak RSS stays far below 2 GB."""
    path = tmp_path / "huge"
    with open(path, "wb") as f:
        f.write(linked.read_bytes())
        f.truncate(2 << 30)  # a hole after the image: same ELF, a 2 GB file
    out = tmp_path / "out"
    code = ("import resource, subprocess, sys; "
            f"r = subprocess.run([sys.executable, '-m', 'linkfix', 'patch', '{path}', '-o', "
            f"'{out}', '--target', 'xen', '-q']); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    rc, rss_kib = map(int, r.stdout.split())
    assert rc == 0, r.stderr
    assert rss_kib < 512 * 1024, rss_kib
    assert out.stat().st_size == 2 << 30
    with open(out, "rb") as f:
        assert f.read(16) == linked.read_bytes()[:16]


def test_dynamic_table_read_at_its_address(tmp_path: Path) -> None:
    """A PT_DYNAMIC whose p_offset disagrees with its address would hide the load-time
    relocations from patch (the loader reads the table at its address)."""
    import synthimage as si

    path = tmp_path / "pie"
    si.build_asm(str(path), str(tmp_path / "w"), [0, 1, 2], 32, pie=True)
    m = Mut(path, tmp_path / "bad")
    n = next(j for j, seg in enumerate(m.img.segments) if seg[0] == image.PT_DYNAMIC)
    m.set_phdr(n, offset=0)
    bad = m.write()
    out = tmp_path / "out"
    refused(run("patch", str(bad), "-o", str(out), "--target", "native"), bad,
            "PT_DYNAMIC: p_offset 0x0 disagrees with its address", out)
