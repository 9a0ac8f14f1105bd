"""`linkfix inspect` reads source lines from real gcc -g images (docs/PATCH.md, inspect).

Each image is a small C program using gen-stubs' linkfix.h, linked by GNU ld
with --emit-relocs (so the image keeps .rela.debug_* / .rel.debug_*, which must
not be applied a second time), for x86_64 and i386. Every site must report the
line of this file's C source that calls its op: the C source marks those lines
with `SITE <op>`. Compressed debug sections: zlib is read; zstd (which
pyelftools cannot read) gives one note on stderr and no lines.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from linkfix import cli
from linkfix.postlink import image

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "tests" / "specs"
LINK_LDS = (ROOT / "ldscripts" / "minimal.lds").read_text()
SHF_COMPRESSED = 0x800

USES_C = r"""#include "linkfix.h"
unsigned long lguest_irq_enabled, lguest_last_pfn, cr3_shadow;
unsigned char xen_vcpu_mask;
void LINKFIX_CALLEE xen_irq_disable(void) {}
void xen_irq_enable(void) {}
unsigned long LINKFIX_CALLEE xen_save_fl(void) { return 0x200; }
void LINKFIX_CALLEE xen_write_cr3(unsigned long v) { cr3_shadow = v; }
unsigned long LINKFIX_CALLEE xen_read_cr3(void) { return cr3_shadow; }
void LINKFIX_CALLEE xen_set_pte(unsigned long *p, unsigned long v) { *p = v; }
#define NI __attribute__((noinline))

/* An inline function of the program's own: its sites are on its lines. */
static inline __attribute__((always_inline)) void enable_twice(void)
{
	irq_enable();			/* SITE irq_enable */
	irq_enable();			/* SITE irq_enable */
}

NI unsigned long f1(unsigned long *p)
{
	unsigned long f = save_fl();	/* SITE save_fl */

	irq_disable();			/* SITE irq_disable */
	set_pte(p, f);			/* SITE set_pte */
	write_cr3(read_cr3());		/* SITE write_cr3 SITE read_cr3 */
	restore_fl(f);			/* SITE restore_fl */
	enable_twice();
	return f;
}

NI int f2(int a)
{
	if (linkfix_backend_is(xen))	/* SITE backend_is(xen) */
		return a * 3;
	return a + 1;
}

NI int f3(int a)
{
	if (linkfix_backend_is(lguest))	/* SITE backend_is(lguest) */
		return a * 7;
	return a ^ 5;
}

void _start(void)
{
	unsigned long x;

	linkfix_boot_select("");
	f1(&x);
	f2(1);
	f3(2);
	for (;;)
		;
}
"""

ARCHES = {
    "x86_64": (["-mno-red-zone"], "elf_x86_64"),
    "i386": (["-m32", "-mregparm=3"], "elf_i386"),
}


def expected_sites() -> list[tuple[str, int]]:
    """(op, line) of every site, from the SITE marks of USES_C."""
    out = []
    for n, text in enumerate(USES_C.splitlines(), 1):
        out += [(op, n) for op in re.findall(r"SITE (\S+)", text)]
    return sorted(out)


def inspect(path: Path, *extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["inspect", str(path), *extra])
    return rc, out.getvalue(), err.getvalue()


def _sh(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, (cmd, r.stderr)
    return r


class Builder:
    """gen-stubs output and the program's compiled pieces for one architecture."""

    def __init__(self, arch: str, work: Path) -> None:
        self.arch = arch
        self.work = work
        self.mflags, self.emulation = ARCHES[arch]
        self.stubs = work / "stubs"
        _sh([sys.executable, "-m", "linkfix", "gen-stubs", str(SPECS / f"{arch}.toml"), "-o",
             str(self.stubs)], work)
        (work / "uses.c").write_text(USES_C)
        (work / "image.lds").write_text(LINK_LDS)
        _sh(["gcc", self.mflags[0] if arch == "i386" else "-m64", "-c",
             str(self.stubs / "linkfix_thunks.S"), "-o", "thunks.o"], work)

    def link(self, name: str, cflags: list[str], ldflags: list[str]) -> Path:
        cc = ["gcc", *self.mflags, "-O2", "-ffreestanding", "-fno-pic", f"-I{self.stubs}",
              *cflags, "-c"]
        _sh([*cc, "uses.c", "-o", f"{name}-uses.o"], self.work)
        _sh([*cc, str(self.stubs / "linkfix_ops.c"), "-o", f"{name}-ops.o"], self.work)
        _sh(["ld", "-m", self.emulation, *ldflags, "-L", str(self.stubs), "-T", "image.lds",
             "-o", name, f"{name}-uses.o", f"{name}-ops.o", "thunks.o"], self.work)
        return self.work / name


@pytest.fixture(scope="module", params=list(ARCHES))
def builder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Builder:
    return Builder(request.param, tmp_path_factory.mktemp(f"dwarf-{request.param}"))


def site_lines(path: Path) -> list[tuple[str, int]]:
    rc, out, err = inspect(path, "--json")
    assert (rc, err) == (0, ""), err
    got = []
    for site in json.loads(out)["sites"]:
        assert site["line"] is not None, site
        file, line = site["line"].rsplit(":", 1)
        assert file == "uses.c", site
        got.append((site["op"], int(line)))
    return sorted(got)


def compression(path: Path, name: str = ".debug_info") -> int | None:
    """ch_type of section `name` when it is SHF_COMPRESSED, else None."""
    img = image.load(str(path))
    sec = img.section(name)
    assert sec is not None
    if not sec.flags & SHF_COMPRESSED:
        return None
    return struct.unpack_from("<I", img.data, sec.offset)[0]


VARIANTS = {
    # name: (gcc flags, ld flags, compression type of the image's .debug_info)
    "emit-relocs": (["-g"], ["--emit-relocs"], None),
    "dwarf4-emit-relocs": (["-gdwarf-4"], ["--emit-relocs"], None),
    "plain": (["-g"], [], None),
    "gz-objects": (["-g", "-gz"], ["--emit-relocs"], None),
    "ld-zlib": (["-g"], ["--emit-relocs", "--compress-debug-sections=zlib"], 1),
    "gz-ld-zlib": (["-g", "-gz"], ["--emit-relocs", "--compress-debug-sections=zlib"], 1),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_site_reports_the_line_that_calls_its_op(builder: Builder, variant: str) -> None:
    cflags, ldflags, ch_type = VARIANTS[variant]
    path = builder.link(variant, cflags, ldflags)
    assert compression(path) == ch_type
    if "--emit-relocs" in ldflags:
        rel = ".rela.debug_info" if builder.arch == "x86_64" else ".rel.debug_info"
        assert image.load(str(path)).section(rel) is not None  # the trap is really there
    assert site_lines(path) == expected_sites()


def test_text_output_and_a_patched_image(builder: Builder) -> None:
    path = builder.link("for-patch", ["-g"], ["--emit-relocs"])
    out = builder.work / "for-patch.xen"
    assert cli.main(["patch", str(path), "-o", str(out), "--target", "xen", "-q"]) == 0
    assert site_lines(out) == expected_sites()  # patching moves no line
    rc, text, err = inspect(out)
    assert (rc, err) == (0, "")
    line = next(n for op, n in expected_sites() if op == "irq_disable")
    assert re.search(rf"^0x[0-9a-f]+  irq_disable  \d+ bytes  \[xen\]  f1\+0x[0-9a-f]+ "
                     rf"uses\.c:{line}$", text, re.M), text


def _zstd_by_ld(builder: Builder) -> Path:
    try:
        path = builder.link("ld-zstd", ["-g"], ["--emit-relocs",
                                               "--compress-debug-sections=zstd"])
    except AssertionError:
        pytest.skip("this ld cannot write zstd-compressed debug sections")
    if compression(path) != 2:
        pytest.skip("this ld did not compress the debug sections with zstd")
    return path


def _zstd_crafted(builder: Builder) -> Path:
    """A -g image whose .debug_info claims ELFCOMPRESS_ZSTD (flag and Chdr.ch_type)."""
    src = builder.link("to-craft", ["-g"], ["--emit-relocs"])
    img = image.load(str(src))
    data = bytearray(img.data)
    sec = img.section(".debug_info")
    assert sec is not None
    w64 = img.bits == 64
    shoff = struct.unpack_from("<Q" if w64 else "<I", data, 40 if w64 else 32)[0]
    flags_at = shoff + sec.index * (64 if w64 else 40) + 8
    fmt = "<Q" if w64 else "<I"
    struct.pack_into(fmt, data, flags_at, struct.unpack_from(fmt, data, flags_at)[0]
                     | SHF_COMPRESSED)
    struct.pack_into("<I", data, sec.offset, 2)
    path = builder.work / "crafted-zstd"
    path.write_bytes(data)
    path.chmod(0o755)
    assert compression(path) == 2
    return path


@pytest.mark.parametrize("how", ["ld", "crafted"])
def test_zstd_compressed_debug_sections_give_a_note(builder: Builder, how: str) -> None:
    path = _zstd_by_ld(builder) if how == "ld" else _zstd_crafted(builder)
    note = f"linkfix: {path}: note: debug sections are zstd-compressed; source lines omitted\n"
    rc, out, err = inspect(path, "--json")
    assert (rc, err) == (0, note)
    doc = json.loads(out)
    assert len(doc["sites"]) == len(expected_sites())
    assert all(s["line"] is None and s["symbol"] for s in doc["sites"])
    rc, text, err = inspect(path)
    assert (rc, err) == (0, note)
    assert text.startswith(f"{path}: {builder.arch}, {len(expected_sites())} sites")
    r = subprocess.run([sys.executable, "-m", "linkfix", "inspect", str(path)],
                       capture_output=True, text=True)
    assert (r.returncode, r.stderr, r.stdout) == (0, note, text)
