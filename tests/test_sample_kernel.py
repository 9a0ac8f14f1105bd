"""The sample kernel, built with its Makefile, patched with `linkfix patch`, booted in QEMU.

Each arch's generic image is built once (make LINKFIX_TARGET=, -j2, into a
temporary O=), patched per backend, and every image boots under QEMU TCG: the
patched image for each backend, and the generic image with the backend chosen
on the kernel command line. The kernel's self-test prints one line per op and
exits through isa-debug-exit (33 = every op passed).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from linkfix import layout, padding

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_kernel"))
import skernel  # noqa: E402
from skernel import ARCHES, BACKENDS, OPS, TOOLCHAINS  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (skernel.qemu_available("x86_64") and skernel.qemu_available("i386")),
    reason="qemu-system-x86_64 / qemu-system-i386 not installed "
           "(apt-get install qemu-system-x86)")


def toolchain_param(name: str):  # noqa: ANN201 - a pytest param
    return pytest.param(name, marks=pytest.mark.skipif(
        not skernel.toolchain_available(name),
        reason=f"{skernel.TOOLCHAIN_TEXT[name]} not installed (apt-get install clang lld)"))


ALL_TOOLCHAINS = [toolchain_param(t) for t in TOOLCHAINS]


@dataclass
class ArchImages:
    arch: str
    out: Path
    generic: Path
    patched: dict[str, Path]
    boots: dict[tuple[str, str], skernel.Boot] = field(default_factory=dict)

    def boot(self, backend: str, mode: str) -> skernel.Boot:
        """Boot once per (backend, mode) per session."""
        key = (backend, mode)
        if key not in self.boots:
            if mode == "patched":
                self.boots[key] = skernel.boot(self.patched[backend], self.arch)
            elif mode == "bootpatched":
                self.boots[key] = skernel.boot(self.generic, self.arch,
                                               append=f"linkfix={backend} bootpatch sitedump")
            else:
                self.boots[key] = skernel.boot(self.generic, self.arch,
                                               append=f"linkfix={backend}")
        return self.boots[key]


@pytest.fixture(scope="session")
def build_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sample_kernel")


_images: dict[tuple[str, str], ArchImages] = {}


@pytest.fixture
def images(build_root: Path):
    def get(arch: str, toolchain: str = "gcc") -> ArchImages:
        key = (arch, toolchain)
        if key not in _images:
            out = build_root / toolchain / arch
            generic = skernel.build_generic(arch, out, toolchain=toolchain)
            patched = {b: skernel.patch(generic, b, out / f"vmlinux.{b}") for b in BACKENDS}
            _images[key] = ArchImages(arch, out, generic, patched)
        return _images[key]
    return get


def assert_all_ok(boot: skernel.Boot, arch: str, backend: str, patched: bool) -> None:
    assert f"selftest: arch={arch} backend={backend} patched={backend if patched else 'no'} " \
           "paravirt=y" in boot.output, boot.output
    for op in OPS:
        assert op in boot.ops, f"no line for op {op}:\n{boot.output}"
        verdict, detail = boot.ops[op]
        assert verdict == "ok", f"op {op}: {detail}\n{boot.output}"
    assert f"selftest: {len(OPS)} of {len(OPS)} ops passed" in boot.output
    assert boot.status == skernel.EXIT_PASS, boot.output


@pytest.mark.parametrize("mode", ["patched", "generic", "bootpatched"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("toolchain", ALL_TOOLCHAINS)
def test_boot(images, toolchain: str, arch: str, backend: str, mode: str) -> None:
    boot = images(arch, toolchain).boot(backend, mode)
    assert_all_ok(boot, arch, backend, patched=mode == "patched")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("toolchain", ALL_TOOLCHAINS)
def test_boot_patching_writes_what_linkfix_patch_writes(images, toolchain: str, arch: str,
                                                        backend: str) -> None:
    """The oracle: after the boot patcher ran, every site in memory holds the bytes
    `linkfix patch --target <backend>` writes into the same image, site by site."""
    im = images(arch, toolchain)
    boot = im.boot(backend, "bootpatched")
    n = len(skernel.file_sites(im.generic))
    assert f"linkfix: boot-patched {n} sites for {backend}" in boot.output, boot.output
    booted = skernel.dumped_sites(boot.output)
    assert len(booted) == n
    assert skernel.site_differences(booted, skernel.file_sites(im.patched[backend])) == []
    # and the generic image's own sites, unpatched at boot, are its linked bytes
    plain = skernel.boot(im.generic, arch, append=f"linkfix={backend} sitedump")
    assert skernel.site_differences(skernel.dumped_sites(plain.output),
                                    skernel.file_sites(im.generic)) == []


def test_boot_patcher_leaves_an_unrecognised_site_generic(images, tmp_path: Path) -> None:
    """A site that does not hold its linked bytes is reported and left alone; the
    others are patched."""
    im = images("x86_64")
    sites = find_sites(im.generic, "irq_disable", "do_op")
    assert len(sites) == 1
    broken = tmp_path / "vmlinux.generic"
    data = bytearray(im.generic.read_bytes())
    site = sites[0]
    data[site.offset:site.offset + site.length] = b"\x90" * site.length
    broken.write_bytes(bytes(data))
    boot = skernel.boot(broken, "x86_64", append="linkfix=native bootpatch sitedump")
    n = len(skernel.file_sites(im.generic))
    assert f"linkfix: site {site.addr:x} (op 0) left generic (reason 3)" in boot.output
    assert f"linkfix: boot-patched {n - 1} sites for native" in boot.output
    booted = skernel.dumped_sites(boot.output)
    assert booted[site.addr] == b"\x90" * site.length  # untouched
    diffs = skernel.site_differences(booted, skernel.file_sites(im.patched["native"]))
    assert diffs == [f"site {site.addr:#x}: booted {'90' * site.length}, linkfix patch "
                     f"{skernel.file_sites(im.patched['native'])[site.addr].hex()}"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("toolchain", ALL_TOOLCHAINS)
def test_generic_matches_patched(images, toolchain: str, arch: str, backend: str) -> None:
    """Backend B chosen at boot and B spliced at build time behave identically."""
    im = images(arch, toolchain)
    generic, patched = im.boot(backend, "generic"), im.boot(backend, "patched")
    assert len(patched.op_lines()) == len(OPS)
    assert generic.op_lines() == patched.op_lines()


def test_backends_differ(images) -> None:
    """The op lines name each backend's own mechanism (the check is not vacuous)."""
    im = images("x86_64")
    lines = {b: im.boot(b, "patched").ops["irq_disable"][1] for b in BACKENDS}
    assert lines == {"native": "IF 1 -> 0", "xen": "vcpu mask 0 -> 1, no hypercall",
                     "lguest": "irq_enabled 0x200 -> 0, no hypercall"}


# ---- a broken splice is caught -------------------------------------------------

@dataclass
class Site:
    addr: int
    op: str
    length: int
    offset: int  # in the file


def find_sites(image: Path, op: str, function: str) -> list[Site]:
    """Sites of `op` inside `function` (a local symbol, maybe with a GCC suffix)."""
    with image.open("rb") as f:
        elf = ELFFile(f)
        meta = elf.get_section_by_name(layout.META_SECTION).data()
        (_, _, _, n_ops, n_backends, rec_size, _, _, _, _, _) = layout.META_FIXED.unpack_from(meta)
        names = meta[layout.META_STATE_OFFSET + n_ops:].split(b"\0")
        op_names = [n.decode() for n in names[n_backends:n_backends + n_ops]]
        sites_sec = elf.get_section_by_name(layout.SITES_SECTION)
        data, base = sites_sec.data(), sites_sec["sh_addr"]
        syms = [s for s in elf.get_section_by_name(".symtab").iter_symbols()
                if s.name == function or s.name.startswith(function + ".")]
        assert len(syms) == 1, [s.name for s in syms]
        lo, hi = syms[0]["st_value"], syms[0]["st_value"] + syms[0]["st_size"]
        text = elf.get_section_by_name(".text")
        found = []
        for at in range(0, len(data), rec_size):
            rel, op_idx, site_len, _kind = layout.SITE.unpack_from(data, at)
            addr = base + at + rel
            if op_names[op_idx] == op and lo <= addr < hi:
                found.append(Site(addr, op, site_len,
                                  text["sh_offset"] + addr - text["sh_addr"]))
    return found


CORRUPTIONS = [
    # arch, image patched for, op, replacement at the site
    ("x86_64", "xen", "irq_disable", "native body"),
    ("x86_64", "native", "restore_fl", "nops"),
    ("i386", "lguest", "save_fl", "native body"),
    ("i386", "native", "irq_disable", "nops"),
]
NATIVE_BODY = {  # GNU as encodings of the specs' native bodies
    ("x86_64", "irq_disable"): bytes.fromhex("fa"),
    ("i386", "save_fl"): bytes.fromhex("9c58"),
}


@pytest.mark.parametrize(("arch", "backend", "op", "kind"), CORRUPTIONS)
def test_broken_splice_is_caught(images, tmp_path: Path, arch: str, backend: str, op: str,
                                 kind: str) -> None:
    im = images(arch)
    broken = tmp_path / "vmlinux.broken"
    shutil.copyfile(im.patched[backend], broken)
    sites = find_sites(broken, op, "do_op")
    assert len(sites) == 1, sites
    site = sites[0]
    body = NATIVE_BODY[(arch, op)] if kind == "native body" else b""
    data = bytearray(broken.read_bytes())
    new = body + padding.pad(site.length - len(body))
    assert data[site.offset:site.offset + site.length] != new
    data[site.offset:site.offset + site.length] = new
    broken.write_bytes(bytes(data))

    # the untouched image verifies; the broken one does not (exit 3)
    assert skernel.linkfix("verify", "-q", str(im.patched[backend]), check=False).returncode == 0
    res = skernel.linkfix("verify", "-q", str(broken), check=False)
    assert res.returncode == 3, res.stdout + res.stderr
    assert f"{site.addr:x}" in (res.stdout + res.stderr).lower()

    # the kernel's self-test notices: that op fails, the others pass
    boot = skernel.boot(broken, arch)
    assert boot.status == skernel.EXIT_FAIL, boot.output
    assert boot.ops[op][0] == "FAIL", boot.output
    assert [o for o in OPS if boot.ops[o][0] != "ok"] == [op], boot.output


# ---- the Makefile ---------------------------------------------------------------

def kbuild_lines(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of sample_kernel/ (the tests touch its sources)."""
    dst = tmp_path_factory.mktemp("tree") / "sample_kernel"
    shutil.copytree(skernel.SRC, dst, ignore=shutil.ignore_patterns("out", "__pycache__"))
    return dst


def test_incremental_build(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    first = skernel.make("x86_64", out, src=tree)
    lines = kbuild_lines(first.stdout)
    assert lines[0].startswith("GEN ") and lines[-2:] == ["LD      vmlinux.generic",
                                                          "LINKFIX vmlinux"], lines
    assert "CC      kernel/selftest.o" in lines and "AS      arch/x86_64/entry.o" in lines
    assert "AS      gen/linkfix_thunks.o" in lines and "CC      gen/linkfix_ops.o" in lines

    again = skernel.make("x86_64", out, src=tree)
    assert again.stdout == "" and again.stderr == ""

    (tree / "kernel" / "lib.c").touch()
    assert kbuild_lines(skernel.make("x86_64", out, src=tree).stdout) == [
        "CC      kernel/lib.o", "LD      vmlinux.generic", "LINKFIX vmlinux"]

    # the spec's mtime alone: gen-stubs runs, writes nothing, nothing recompiles
    (tree / "spec" / "x86_64.toml").touch()
    assert kbuild_lines(skernel.make("x86_64", out, src=tree).stdout) == [
        "GEN     gen/ (spec/x86_64.toml)"]

    # a new target reruns only the post-link step, once
    assert kbuild_lines(skernel.make("x86_64", out, "LINKFIX_TARGET=xen", src=tree).stdout) == [
        "LINKFIX vmlinux"]
    assert skernel.make("x86_64", out, "LINKFIX_TARGET=xen", src=tree).stdout == ""
    assert skernel.linkfix("verify", "-q", str(out / "vmlinux"), "--target", "xen",
                           check=False).returncode == 0
    assert kbuild_lines(skernel.make("x86_64", out, "LINKFIX_TARGET=", src=tree).stdout) == [
        "LINKFIX vmlinux (generic: not patched)"]
    assert (out / "vmlinux").read_bytes() == (out / "vmlinux.generic").read_bytes()


def test_verbose_and_run(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    res = skernel.make("i386", out, "V=1", "LINKFIX_TARGET=lguest", src=tree)
    text = res.stdout
    assert " -m linkfix gen-stubs -q " in text
    assert "gcc " in text and "-m32" in text and "-mregparm=3" in text and "-c -o" in text
    assert "ld -m elf_i386" in text and f"-L {out}/gen -T " in text
    assert f"-m linkfix patch -q {out}/vmlinux.generic -o {out}/vmlinux --target lguest" in text
    assert "  CC      " not in text

    run = skernel.make("i386", out, "run", "LINKFIX_TARGET=lguest", src=tree)
    assert "selftest: arch=i386 backend=lguest patched=lguest" in run.stdout
    assert f"selftest: {len(OPS)} of {len(OPS)} ops passed" in run.stdout


@pytest.mark.parametrize("arch", ARCHES)
def test_no_paravirt_build(tmp_path: Path, arch: str) -> None:
    """PARAVIRT=n: plain inline instructions, no linkfix sections, same self-test."""
    out = tmp_path / "o"
    lines = kbuild_lines(skernel.make(arch, out, "PARAVIRT=n").stdout)
    assert not any(line.startswith(("GEN", "LINKFIX")) for line in lines)
    assert lines[-1] == "LD      vmlinux"
    with (out / "vmlinux").open("rb") as f:
        assert ELFFile(f).get_section_by_name(layout.SITES_SECTION) is None
    boot = skernel.boot(out / "vmlinux", arch, append="linkfix=xen")
    assert f"selftest: arch={arch} backend=native patched=no paravirt=n" in boot.output
    assert boot.passed == len(OPS) and boot.status == skernel.EXIT_PASS, boot.output


@pytest.mark.parametrize("toolchain", ALL_TOOLCHAINS)
def test_bench_counts_instructions(images, toolchain: str) -> None:
    """Under -icount rdtsc counts instructions: a patched native cli site is the
    cli alone (its padding is prefixes); the generic image pays the dispatch."""
    im = images("x86_64", toolchain)
    patched = skernel.boot(im.patched["native"], "x86_64", append="bench", icount=True)
    generic = skernel.boot(im.generic, "x86_64", append="bench", icount=True)
    assert patched.status == skernel.EXIT_PASS, patched.output
    assert patched.bench["irq_disable"][0] == 100  # cli alone (prefix-padded), in hundredths
    assert generic.bench["irq_disable"][0] > 1000
    again = skernel.boot(im.patched["native"], "x86_64", append="bench", icount=True)
    assert again.bench == patched.bench


@pytest.mark.parametrize("arch", ARCHES)
def test_fault_is_reported(images, arch: str) -> None:
    """An unexpected exception prints its vector and address and exits with 37."""
    boot = skernel.boot(images(arch).generic, arch, append="fault")
    assert boot.status == skernel.EXIT_FAULT, boot.output
    assert "FAULT: exception 14, error code 0x0," in boot.output
    assert "cr2 0x401ff000" in boot.output
    assert not boot.ops


def test_failing_tool_fails_the_build(tree: Path, tmp_path: Path) -> None:
    # A command that fails inside an `a && b` recipe must stop make, not be ignored.
    out = tmp_path / "o"
    res = skernel.make("x86_64", out, "LINKFIX=/nonexistent/linkfix", src=tree, check=False)
    assert res.returncode != 0
    assert not (out / "vmlinux").exists()
    assert not (out / "gen" / ".stamp").exists()
    # ...and must not record the command as done, or the next make would skip it.
    assert not (out / "gen" / "..stamp.cmd").exists()


def _owned_bytes(generic: Path) -> tuple[bytearray, int]:
    """A mask of the bytes linkfix may change in the sample kernel image, and its site count.

    Sites (from linkfix's own tables), the state record (target, patched, op_state),
    and the `--emit-relocs` entries whose offset lies inside a site (read with
    pyelftools, not linkfix's reader).
    """
    from elftools.elf.relocation import RelocationSection

    from linkfix.postlink import image, tables
    img = image.load(str(generic))
    t = tables.load(img)
    chk = tables.check_records(t)
    data = generic.read_bytes()
    mask = bytearray(len(data))
    spans = []
    for i, addr in enumerate(chk.site_addrs):
        n = chk.shape_of(i).site_len
        off = img.offset_of(addr)
        mask[off:off + n] = b"\1" * n
        spans.append((addr, addr + n))
    state = t.meta_region.offset + layout.STATE_OFFSET
    n_ops = len(t.meta.ops)
    mask[state:state + 4 + n_ops] = b"\1" * (4 + n_ops)
    with open(generic, "rb") as f:
        elf = ELFFile(f)
        for sec in elf.iter_sections():
            if not isinstance(sec, RelocationSection) or sec["sh_flags"] & 2:
                continue
            size = sec["sh_entsize"]
            for k, rel in enumerate(sec.iter_relocations()):
                if any(lo <= rel["r_offset"] < hi for lo, hi in spans):
                    at = sec["sh_offset"] + k * size
                    mask[at:at + size] = b"\1" * size
    return mask, len(spans)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("toolchain", ALL_TOOLCHAINS)
def test_patch_changes_only_owned_bytes_and_verifies(images, toolchain: str, arch: str) -> None:
    imgs = images(arch, toolchain)
    mask, n_sites = _owned_bytes(imgs.generic)
    assert n_sites > 20
    orig = imgs.generic.read_bytes()
    for backend, patched in imgs.patched.items():
        new = patched.read_bytes()
        assert len(new) == len(orig)
        changed = [i for i in range(len(orig)) if orig[i] != new[i]]
        assert changed, backend
        stray = [hex(i) for i in changed if not mask[i]]
        assert stray == [], f"{arch} {backend}: bytes outside linkfix's own changed: {stray[:8]}"
        assert skernel.linkfix("verify", "-q", str(patched), check=False).returncode == 0
        assert skernel.linkfix("verify", "-q", str(patched), "--target", backend,
                               check=False).returncode == 0


@pytest.mark.parametrize("arch", ARCHES)
def test_boot_selection_ignores_case_and_reports_unknown_names(images, arch: str) -> None:
    """linkfix=XEN selects xen; an unknown name is reported through the kernel's own
    linkfix_unknown_backend and the default backend runs."""
    im = images(arch)
    upper = skernel.boot(im.generic, arch, append="linkfix=XEN")
    assert f"selftest: arch={arch} backend=xen patched=no" in upper.output, upper.output
    assert upper.status == skernel.EXIT_PASS
    bogus = skernel.boot(im.generic, arch, append="linkfix=Bogus")
    assert "linkfix: warning: unknown backend 'Bogus' on the command line; using the " \
           "default" in bogus.output, bogus.output
    assert f"selftest: arch={arch} backend=native patched=no" in bogus.output
    assert bogus.status == skernel.EXIT_PASS
