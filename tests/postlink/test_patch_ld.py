"""`linkfix patch` on images built by gcc and GNU ld: plain, --emit-relocs, -pie, gen-stubs.

Relocations are read back with pyelftools (not linkfix's own reader) and every
one that falls inside a site is checked against the bytes now there.
"""

from __future__ import annotations

import contextlib
import io
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import synthimage as si
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

from linkfix import layout
from linkfix.cli import main
from linkfix.postlink import image, tables

TARGETS = ("native", "xen", "lguest", "generic")
SITE_OPS = [i % (len(si.DEFAULT_OPS) + 3) for i in range(27)]
PC_TYPES = {62: {2, 4}, 3: {2, 4}}  # PC32, PLT32
NONE = 0


def run(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, err.getvalue()


def pie_safe(ops: tuple[si.SynthOp, ...]) -> tuple[si.SynthOp, ...]:
    """x86-64 PIE cannot hold 32-bit absolute addresses: use RIP-relative bodies."""
    return tuple(si.SynthOp(o.name, {b: "rip_movl" if k == "gs_movb" else k
                                     for b, k in o.bodies.items()}) for o in ops)


@pytest.fixture(scope="module", params=[(64, "plain"), (64, "relocs"), (64, "pie"),
                                        (32, "plain"), (32, "relocs")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def linked(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[Path, dict[str, Path]]:
    bits, variant = request.param
    work = tmp_path_factory.mktemp(f"ld{bits}{variant}")
    ops = pie_safe(si.DEFAULT_OPS) if variant == "pie" else si.DEFAULT_OPS
    path = Path(si.build_asm(str(work / "vmlinux"), str(work), SITE_OPS, bits, ops=ops,
                             emit_relocs=variant == "relocs", pie=variant == "pie"))
    outs = {}
    for target in TARGETS:
        out = work / f"vmlinux.{target}"
        rc, err = run("patch", str(path), "-o", str(out), "--target", target)
        assert rc == 0, err
        outs[target] = out
    return path, outs


def sites_and_state(path: Path) -> tuple[list[tuple[int, int, int]], int]:
    """[(vaddr, file offset, length)] of every site, and the state record's file offset."""
    img = image.load(str(path))
    t = tables.load(img)
    chk = tables.check_records(t)
    spans = [(s, img.offset_of(s), chk.shape_of(i).site_len) for i, s in enumerate(chk.site_addrs)]
    return spans, t.meta_region.offset + layout.STATE_OFFSET


def reloc_sections(path: Path) -> dict[str, bytes]:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        return {s.name: s.data() for s in elf.iter_sections() if isinstance(s, RelocationSection)}


def test_only_sites_state_and_relocations_change(linked: tuple[Path, dict[str, Path]]) -> None:
    path, outs = linked
    spans, state = sites_and_state(path)
    orig = path.read_bytes()
    relocs = {}
    with open(path, "rb") as f:
        for s in ELFFile(f).iter_sections():
            if isinstance(s, RelocationSection) and not s["sh_flags"] & 2:
                relocs[s.name] = (s["sh_offset"], s["sh_size"])
    for target, out in outs.items():
        new = out.read_bytes()
        allowed = bytearray(len(orig))
        for _v, off, n in spans:
            allowed[off:off + n] = b"\1" * n
        allowed[state:state + 64] = b"\1" * 64
        for off, size in relocs.values():
            allowed[off:off + size] = b"\1" * size
        assert [i for i in range(len(orig)) if orig[i] != new[i] and not allowed[i]] == [], target
        rc, err = run("verify", str(out))
        assert rc == 0, err


def test_generic_restores_linked_bytes_and_relocations(linked: tuple[Path, dict[str, Path]]
                                                       ) -> None:
    path, outs = linked
    _spans, state = sites_and_state(path)
    orig, back = path.read_bytes(), outs["generic"].read_bytes()
    assert [i for i in range(len(orig)) if orig[i] != back[i]] == [state + 1]  # `patched`
    assert reloc_sections(path) == reloc_sections(outs["generic"])


def test_retarget_equals_direct(linked: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    _path, outs = linked
    for first in TARGETS:
        for second in TARGETS:
            out = tmp_path / f"{first}-{second}"
            rc, err = run("patch", str(outs[first]), "-o", str(out), "--target", second)
            assert rc == 0, err
            assert out.read_bytes() == outs[second].read_bytes(), (first, second)


class Relocs:
    """Link-time relocations of an image, read with pyelftools."""

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        with open(path, "rb") as f:
            elf = ELFFile(f)
            self.machine = 62 if elf["e_machine"] == "EM_X86_64" else 3
            self.bits = elf.elfclass
            symtab = elf.get_section_by_name(".symtab")
            self.syms = [s["st_value"] for s in symtab.iter_symbols()]
            self.segments = [(p["p_vaddr"], p["p_offset"], p["p_filesz"])
                             for p in elf.iter_segments() if p["p_type"] == "PT_LOAD"]
            self.by_target: dict[str, list[tuple[int, int, int, int | None]]] = {}
            for sec in elf.iter_sections():
                if isinstance(sec, RelocationSection) and not sec["sh_flags"] & 2:
                    target = elf.get_section(sec["sh_info"]).name
                    self.by_target[target] = [
                        (r["r_offset"], r["r_info_type"], r["r_info_sym"],
                         r["r_addend"] if sec.is_RELA() else None)
                        for r in sec.iter_relocations()]

    def field(self, vaddr: int) -> int:
        for base, off, size in self.segments:
            if base <= vaddr < base + size:
                return struct.unpack_from("<i", self.data, off + vaddr - base)[0]
        raise KeyError(hex(vaddr))


def test_relocations_describe_the_new_bytes(linked: tuple[Path, dict[str, Path]]) -> None:
    path, outs = linked
    if "relocs" not in path.parent.name:
        pytest.skip("no link-time relocations in this variant")
    spans, _state = sites_and_state(path)
    for target, out in outs.items():
        img = image.load(str(out))
        t = tables.load(img)
        chk = tables.check_records(t)
        rel = Relocs(out)
        text = rel.by_target[".text"]
        repl = rel.by_target[layout.REPL_SECTION]
        abs_seen = 0
        for i, (s, _off, length) in enumerate(spans):
            sh = chk.shape_of(i)
            k = t.meta.op_state[sh.op] if sh.alts[t.meta.op_state[sh.op]].present else 0
            inside = [r for r in text if s <= r[0] < s + length]
            live = [r for r in inside if r[1] != NONE]
            if sh.kind == layout.KIND_BRANCH:
                # The assembler resolves a jump to a label of its own section: no slot.
                # With one, it follows the jump: live (PC32, consistent with the bytes)
                # for the generic and "true" jumps, R_*_NONE for the NOP.
                assert len(inside) <= 1
                if not inside:
                    continue
                assert inside[0][0] == s + 1
                jump = chk.copies[(sh.op, k)].per_site
                assert (inside[0][1] != NONE) == jump, (target, hex(s))
                if jump and rel.bits == 64:
                    _o, _t, sym, addend = inside[0]
                    assert rel.field(s + 1) == rel.syms[sym] + addend - (s + 1)
                continue
            c = chk.copies[(sh.op, k)]
            b = c.addr
            wanted = [r for r in repl if b <= r[0] < b + c.length]
            # Neutral slots stay at the site start; live ones mirror the body's relocations.
            assert all(r[0] == s and r[2] == 0 for r in inside if r[1] == NONE)
            for off, typ, sym, addend in live:
                twin = [w for w in wanted if w[0] - b == off - s and w[1:] == (typ, sym, addend)]
                assert twin, (target, hex(s), typ)
                value = rel.field(off)
                if rel.bits == 64:
                    expected = rel.syms[sym] + addend - (off if typ in PC_TYPES[62] else 0)
                    assert value == struct.unpack("<i", struct.pack("<I", expected & 0xFFFFFFFF))[0]
                elif typ in PC_TYPES[3]:
                    assert value + off == rel.field(twin[0][0]) + twin[0][0]
                else:
                    assert value == rel.field(twin[0][0])
                abs_seen += typ not in PC_TYPES[rel.machine]
            # Every absolute relocation the body needs is there.
            need_abs = [w for w in wanted if w[1] not in PC_TYPES[rel.machine]]
            assert len([r for r in live if r[1] not in PC_TYPES[rel.machine]]) == len(need_abs)
        if target == "xen":
            assert abs_seen > 0  # gs_movb bodies: R_X86_64_32S / R_386_32 moved to the sites


@pytest.mark.parametrize("bits", [64, 32])
def test_body_needing_more_absolute_relocations_than_slots(bits: int, tmp_path: Path) -> None:
    ops = (si.SynthOp("store", {"native": "abs2", "xen": "cli"}),)
    path = si.build_asm(str(tmp_path / "vmlinux"), str(tmp_path), [0, 0], bits, ops=ops,
                        emit_relocs=True)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "linkfix", "patch", path, "-o", str(out),
                        "--target", "native"], capture_output=True, text=True)
    assert r.returncode == 2
    kind = "R_X86_64_32S, R_X86_64_32" if bits == 64 else "R_386_32, R_386_32"
    assert "(store): alternative native needs 2 absolute relocation(s) " \
           f"({kind}) but the site owns 1 slot(s) in .rel" in r.stderr
    assert not out.exists()
    # Without link-time relocations the same body is fine.
    plain = si.build_asm(str(tmp_path / "plain"), str(tmp_path / "p"), [0, 0], bits, ops=ops)
    rc, err = run("patch", plain, "-o", str(out), "--target", "native")
    assert rc == 0, err


def test_i386_pie_refuses_bodies_and_sites_with_load_time_relocations(tmp_path: Path) -> None:
    ops = (si.SynthOp("irq_disable", {"native": "cli", "lguest": "rip_movl"}),)  # absolute
    path = si.build_asm(str(tmp_path / "vmlinux"), str(tmp_path / "a"), [0, 0, 0], 32, ops=ops,
                        pie=True)
    assert image.load(path).etype == image.ET_DYN
    assert image.load(path).dynamic_reloc_offsets
    out = tmp_path / "out"
    rc, err = run("patch", path, "-o", str(out), "--target", "native")
    assert rc == 0, err
    r = subprocess.run([sys.executable, "-m", "linkfix", "patch", path, "-o", str(tmp_path / "x"),
                        "--target", "lguest"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "(irq_disable): a load-time (dynamic) relocation at" in r.stderr
    assert "lies in the lguest copy" in r.stderr
    # A generic alternative that is not a direct call (here `call *abs`, which the
    # loader relocates in place) is refused whatever the target.
    path2 = si.build_asm(str(tmp_path / "ind"), str(tmp_path / "b"), [0, 0], 32, ops=ops,
                         pie=True, indirect_generic=True)
    for target in ("native", "generic"):
        r = subprocess.run([sys.executable, "-m", "linkfix", "patch", path2, "-o",
                            str(tmp_path / "y"), "--target", target], capture_output=True,
                           text=True)
        assert r.returncode == 2
        assert "alternative generic: flagged as a call but holds ff15" in r.stderr, r.stderr
        assert not (tmp_path / "y").exists()


# -- gen-stubs output ------------------------------------------------------------------------

SPECS = Path(__file__).resolve().parents[1] / "specs"
USES_C = r"""
#include "linkfix.h"
unsigned long lguest_irq_enabled, lguest_last_pfn, cr3_shadow;
unsigned char xen_vcpu_mask;
void LINKFIX_CALLEE xen_irq_disable(void) {}
void xen_irq_enable(void) {}
unsigned long LINKFIX_CALLEE xen_save_fl(void) { return 0x200; }
void LINKFIX_CALLEE xen_write_cr3(unsigned long v) { cr3_shadow = v; }
unsigned long LINKFIX_CALLEE xen_read_cr3(void) { return cr3_shadow; }
void LINKFIX_CALLEE xen_set_pte(unsigned long *p, unsigned long v) { *p = v; }
#define NI __attribute__((noinline))
NI unsigned long f1(unsigned long *p)
{
	unsigned long f = save_fl();
	irq_disable();
	set_pte(p, f);
	write_cr3(read_cr3());
	restore_fl(f);
	irq_enable();
	return f;
}
NI int f2(int a) { if (linkfix_backend_is(xen)) return a * 3; return a + 1; }
NI int f3(int a) { if (linkfix_backend_is(lguest)) return a * 7; return a ^ 5; }
void _start(void) { unsigned long x; linkfix_boot_select(""); f1(&x); f2(1); f3(2); for (;;); }
"""
# The example linker script in ldscripts/ that INCLUDEs linkfix.lds.
LINK_LDS = (Path(__file__).resolve().parents[2] / "ldscripts" / "minimal.lds").read_text()


def _sh(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, (cmd, r.stderr)


@pytest.mark.parametrize("arch", ["x86_64", "i386"])
def test_gen_stubs_image_patches_for_every_backend(arch: str, tmp_path: Path) -> None:
    from test_patch_props import _targets

    out = tmp_path / "stubs"
    _sh([sys.executable, "-m", "linkfix", "gen-stubs", str(SPECS / f"{arch}.toml"), "-o",
         str(out)], tmp_path)
    m = ["-m32", "-mregparm=3"] if arch == "i386" else ["-mno-red-zone"]
    (tmp_path / "uses.c").write_text(USES_C)
    (tmp_path / "image.lds").write_text(LINK_LDS)
    cc = ["gcc", *m, "-O2", "-ffreestanding", "-fno-pic", f"-I{out}", "-c"]
    _sh([*cc, "uses.c", "-o", "uses.o"], tmp_path)
    _sh([*cc, str(out / "linkfix_ops.c"), "-o", "ops.o"], tmp_path)
    _sh(["gcc", *m[:1], "-c", str(out / "linkfix_thunks.S"), "-o", "thunks.o"], tmp_path)
    emu = "elf_i386" if arch == "i386" else "elf_x86_64"
    _sh(["ld", "--emit-relocs", "-m", emu, "-L", str(out), "-T", "image.lds", "-o", "vmlinux",
         "uses.o", "ops.o", "thunks.o"], tmp_path)
    path = tmp_path / "vmlinux"
    rc, err = run("verify", str(path))  # as linked: generic everywhere
    assert rc == 0, err
    bits = 64 if arch == "x86_64" else 32
    orig = image.load(str(path))
    for target in TARGETS:
        dest = tmp_path / f"vmlinux.{target}"
        rc, err = run("patch", str(path), "-o", str(dest), "--target", target)
        assert rc == 0, (target, err)
        rc, err = run("verify", str(dest), "--target", target)
        assert rc == 0, (target, err)
        img = image.load(str(dest))
        t = tables.load(img)
        chk = tables.check_records(t)
        k_req = TARGETS.index(target) + 1 if target != "generic" else 0
        assert t.meta.target == k_req
        for i, s in enumerate(chk.site_addrs):
            sh = chk.shape_of(i)
            k = k_req if sh.alts[k_req].present else 0
            c = chk.copies[(sh.op, k)]
            if c.per_site:  # a branch site's jump: to one of its two recorded targets
                g, y = chk.branch_targets(i)
                site = img.read(s, 5)
                assert site is not None and site[0] == 0xE9
                assert s + 5 + struct.unpack("<i", site[1:])[0] == (g if k == 0 else y)
                continue
            b, blen = c.addr, c.length
            body = orig.read(b, blen) or b""
            site = img.read(s, sh.site_len)
            assert site is not None
            before = _targets(body, b, bits)
            after = _targets(site[:blen], s, bits)
            # Same instructions; every out-of-body target unchanged.
            assert [m_ for m_, _ in before] == [m_ for m_, _ in after]
            for (_a, t0), (_b, t1) in zip(before, after, strict=True):
                if t0 is not None and not b <= t0 <= b + blen:
                    assert t0 == t1, (target, hex(s))
    # Back to generic: the image as linked (but for the `patched` byte).
    rc, err = run("patch", str(tmp_path / "vmlinux.xen"), "-o", str(tmp_path / "back"),
                  "--target", "generic")
    assert rc == 0, err
    a, b2 = path.read_bytes(), (tmp_path / "back").read_bytes()
    assert sum(x != y for x, y in zip(a, b2, strict=True)) == 1
