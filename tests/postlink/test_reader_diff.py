"""The two ELF readers (LINKFIX_ELF_READER=lief and =hand) give the same facts or refusals.

Every kind of image the test suite builds (tests/tools/synthimage.py's pure-Python
images of both classes; gcc and GNU ld images, plain, --emit-relocs and -pie;
gen-stubs output linked by GNU ld; clang and ld.lld images, plain, --emit-relocs,
-pie and -pie with RELR; the sample kernel's images when they are built; a
distribution's /bin/true, which has only .dynsym), then corrupted variants of
each (truncations, ELF/program/section header fields, string and symbol tables,
bit flips in the headers): linkfix.image.Image built by each reader must give
identical facts (header, segments, sections, symbols, symbol lookups, load-time
and link-time relocations, the tables) or the identical one-line refusal, and
`linkfix patch` must give identical output or the identical message.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import synthimage as si
from test_trust import build as build_genstubs

from linkfix import cli
from linkfix.errors import BadInput
from linkfix.postlink import image, tables

ROOT = Path(__file__).resolve().parents[2]
READERS = ("hand", "lief")
SITE_OPS = [i % (len(si.DEFAULT_OPS) + 3) for i in range(27)]
NAMES = (tables.META_START, tables.META_END, tables.SITES_START, tables.SITES_END,
         tables.REPL_START, tables.REPL_END, "_start", "fn_0", "no_such_symbol")
SAMPLE = ("x86_64/vmlinux", "i386/vmlinux", "llvm/vmlinux", "x86_64/vmlinux.generic")
CLANG, LLD = shutil.which("clang"), shutil.which("ld.lld")


def _pie_ops() -> tuple[si.SynthOp, ...]:
    return tuple(si.SynthOp(o.name, {b: "rip_movl" if k == "gs_movb" else k
                                     for b, k in o.bodies.items()}) for o in si.DEFAULT_OPS)


def _lld_image(work: Path, bits: int, variant: str) -> Path:
    """synthimage's assembly source, assembled by clang and linked by ld.lld."""
    work.mkdir(parents=True, exist_ok=True)
    pie = variant in ("pie", "relr")
    ops = _pie_ops() if pie and bits == 64 else si.DEFAULT_OPS
    (work / "synth.S").write_text(si.asm_source(SITE_OPS, bits, ops, si.BACKENDS,
                                                pie and bits == 32))
    (work / "synth.lds").write_text(si.LDSCRIPT % {"base": "0x400000" if bits == 64
                                                   else "0x8048000"})
    m = "-m64" if bits == 64 else "-m32"
    subprocess.run([CLANG, m, "-c", "synth.S", "-o", "synth.o"], cwd=work, check=True,
                   capture_output=True)
    args = {"plain": ["-T", "synth.lds"], "relocs": ["--emit-relocs", "-T", "synth.lds"],
            "pie": ["-pie", "--no-dynamic-linker", "-z", "notext"],
            "relr": ["-pie", "--no-dynamic-linker", "-z", "notext", "--pack-dyn-relocs=relr"]}
    emu = "elf_x86_64" if bits == 64 else "elf_i386"
    subprocess.run([LLD, "-m", emu, *args[variant], "-o", "vmlinux", "synth.o"], cwd=work,
                   check=True, capture_output=True)
    return work / "vmlinux"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("readers")
    out: dict[str, Path] = {}

    def synth(name: str, **kw: object) -> None:
        si.build_fast(str(work / name), **kw)  # type: ignore[arg-type]
        out[name] = work / name

    synth("synth64", n_sites=40, bits=64, seed=1)
    synth("synth32", n_sites=40, bits=32, seed=2)
    synth("synth64-nosections", n_sites=24, bits=64, seed=3, section_names=False)
    synth("synth32-nosymbols", n_sites=24, bits=32, seed=4, symbols=False)
    for bits in (64, 32):
        for variant, kw in (("plain", {}), ("relocs", {"emit_relocs": True}),
                            ("pie", {"pie": True, "ops": _pie_ops()} if bits == 64 else
                             {"pie": True, "indirect_generic": True})):
            name = f"ld{bits}-{variant}"
            out[name] = Path(si.build_asm(str(work / name), str(work / f"{name}.d"),
                                          SITE_OPS, bits, **kw))  # type: ignore[arg-type]
    for arch in ("x86_64", "i386"):
        d = work / f"genstubs-{arch}"
        d.mkdir()
        out[f"genstubs-{arch}"] = build_genstubs(arch, d)
    if CLANG and LLD:
        for bits in (64, 32):
            for variant in ("plain", "relocs", "pie", "relr"):
                out[f"lld{bits}-{variant}"] = _lld_image(work / f"lld{bits}-{variant}", bits,
                                                         variant)
    true = shutil.which("true")
    if true:
        out["bin-true"] = Path(os.path.realpath(true))
    for rel in SAMPLE:
        p = ROOT / "sample_kernel" / "out" / rel
        if p.exists():
            out["sample-" + rel.replace("/", "-")] = p
    return out


# -- facts ---------------------------------------------------------------------------------


def attempt(f: Callable[[], object]) -> tuple:
    try:
        return ("ok", f())
    except BadInput as exc:
        return ("refused", exc.path, exc.message)


def _tables(img: image.Image) -> tuple:
    t = tables.load(img)
    return (t.meta_region, t.sites_region, t.repl_region, t.meta.backends, t.meta.ops,
            t.n_sites, bytes(img.data[t.sites_region.offset:t.sites_region.offset
                                      + t.sites_region.size]))


def facts(path: str, data: bytes, reader: str, deep: bool = True) -> dict[str, object]:
    """Everything Image says about the image (a refusal where it says "no"); `deep`
    decodes every link-time relocation too (elfrelocs decodes them for both readers
    from the sections compared here: for the corrupted variants the sections suffice)."""
    try:
        img = image.Image(path, data, reader)
        fresh = image.Image(path, data, reader)  # symbol lookups before any full decode
    except BadInput as exc:
        return {"image": ("refused", exc.path, exc.message)}
    assert img.reader == reader
    out: dict[str, object] = {
        "header": (img.bits, img.w, img.etype, img.machine, img.entry, img.header_ranges),
        "segments": img.segments, "loads": img.load_segments, "sections": img.sections,
        "guarded": attempt(img.guarded_ranges),
        "ambiguous": attempt(lambda: img.ambiguous_ranges),
        "values": [attempt(lambda n=n: fresh.symbol_value(n)) for n in NAMES],
        "symbols": attempt(lambda: img.symbols),
        "values_after": [attempt(lambda n=n: img.symbol_value(n)) for n in NAMES],
        "symbolize": attempt(lambda: img.symbolize(img.entry)),
        "dynamic": attempt(lambda: img.dynamic_reloc_offsets),
        "static": attempt(lambda: [(t.section, t.rela, t.entries_in(0, 1 << 64) if deep else 0)
                                   for t in img.static_relocs]),
        "tables": attempt(lambda: _tables(img)),
    }
    return out


def same_facts(path: str, data: bytes, deep: bool = True) -> dict[str, object]:
    hand, lief = (facts(path, data, r, deep) for r in READERS)
    for key in hand.keys() | lief.keys():
        assert hand.get(key) == lief.get(key), (path, key, hand.get(key), lief.get(key))
    return hand


def patch_run(src: Path, out: Path, reader: str, monkeypatch: pytest.MonkeyPatch
              ) -> tuple[int, str, str, bytes | None]:
    monkeypatch.setenv(image.READER_ENV, reader)
    if out.exists():
        out.unlink()
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = cli.main(["patch", str(src), "-o", str(out), "--target", "xen", "-q"])
    return rc, so.getvalue(), se.getvalue(), out.read_bytes() if out.exists() else None


# -- corrupted variants --------------------------------------------------------------------

_EHDR = {64: {"e_type": (16, "<H"), "e_machine": (18, "<H"), "e_entry": (24, "<Q"),
              "e_phoff": (32, "<Q"), "e_shoff": (40, "<Q"), "e_phentsize": (54, "<H"),
              "e_phnum": (56, "<H"), "e_shentsize": (58, "<H"), "e_shnum": (60, "<H"),
              "e_shstrndx": (62, "<H"), "EI_CLASS": (4, "<B"), "EI_DATA": (5, "<B")},
         32: {"e_type": (16, "<H"), "e_machine": (18, "<H"), "e_entry": (24, "<I"),
              "e_phoff": (28, "<I"), "e_shoff": (32, "<I"), "e_phentsize": (42, "<H"),
              "e_phnum": (44, "<H"), "e_shentsize": (46, "<H"), "e_shnum": (48, "<H"),
              "e_shstrndx": (50, "<H"), "EI_CLASS": (4, "<B"), "EI_DATA": (5, "<B")}}
_PHDR = {64: {"p_type": (0, "<I"), "p_flags": (4, "<I"), "p_offset": (8, "<Q"),
              "p_vaddr": (16, "<Q"), "p_filesz": (32, "<Q"), "p_memsz": (40, "<Q")},
         32: {"p_type": (0, "<I"), "p_offset": (4, "<I"), "p_vaddr": (8, "<I"),
              "p_filesz": (16, "<I"), "p_memsz": (20, "<I"), "p_flags": (24, "<I")}}
_SHDR = {64: {"sh_name": (0, "<I"), "sh_type": (4, "<I"), "sh_flags": (8, "<Q"),
              "sh_addr": (16, "<Q"), "sh_offset": (24, "<Q"), "sh_size": (32, "<Q"),
              "sh_link": (40, "<I"), "sh_info": (44, "<I"), "sh_entsize": (56, "<Q")},
         32: {"sh_name": (0, "<I"), "sh_type": (4, "<I"), "sh_flags": (8, "<I"),
              "sh_addr": (12, "<I"), "sh_offset": (16, "<I"), "sh_size": (20, "<I"),
              "sh_link": (24, "<I"), "sh_info": (28, "<I"), "sh_entsize": (36, "<I")}}
_SPECIAL = {"e_type": [1, 3, 4], "e_machine": [3, 62, 40], "EI_CLASS": [0, 1, 2, 3],
            "EI_DATA": [0, 2], "e_phentsize": [0, 32, 56, 57, 64], "e_shentsize": [0, 40, 64, 65],
            "e_phnum": [0, 0xFFFF, 10001], "e_shnum": [0, 1, 0xFFFF], "e_shstrndx": [0, 0xFFFF],
            "p_type": [0, 1, 2, 3, 6, 0x6474E553, 0x70000000, 0x7FFFFFFF],
            "sh_type": [0, 1, 2, 3, 6, 8, 9, 11, 19, 0x70000001, 0x6FFFFFF6],
            "sh_link": [0, 1, 0xFFFF], "sh_name": [0, 1, 0x7FFFFFFF]}


def _put(data: bytearray, off: int, fmt: str, value: int) -> None:
    size = struct.calcsize(fmt)
    if 0 <= off and off + size <= len(data):
        struct.pack_into(fmt, data, off, value & ((1 << 8 * size) - 1))


def _get(data: bytes, off: int, fmt: str) -> int:
    if 0 <= off and off + struct.calcsize(fmt) <= len(data):
        return struct.unpack_from(fmt, data, off)[0]
    return 0


def _values(data: bytes, name: str, at: int, fmt: str) -> list[int]:
    old = _get(data, at, fmt)
    size = struct.calcsize(fmt)
    return sorted({*_SPECIAL.get(name, []), old + 1, old - 1, old + 0x1000, 0,
                   (1 << 8 * size) - 1, len(data), 1 << (8 * size - 1)})


def variants(data: bytes, rng: random.Random, limit: int) -> list[tuple[str, bytes]]:
    """Corrupted copies of a valid image: (what was done, bytes)."""
    img = image.Image("x", data, "hand")
    bits = img.bits
    w = "<Q" if bits == 64 else "<I"
    phoff, shoff = _get(data, 32 if bits == 64 else 28, w), _get(data, 40 if bits == 64 else 32, w)
    phent, shent = (56, 64) if bits == 64 else (32, 40)
    out: list[tuple[str, bytes]] = []

    def edit(what: str, f: Callable[[bytearray], None]) -> None:
        b = bytearray(data)
        f(b)
        if bytes(b) != data:
            out.append((what, bytes(b)))

    ehsize = 64 if bits == 64 else 52
    cuts = {0, 1, 16, 40, ehsize - 1, ehsize + 10, phoff + phent * len(img.segments) - 1,
            shoff, shoff + 70, shoff + shent * len(img.sections) - 1, len(data) - 1}
    for sec in img.sections:
        if sec.type != 8 and sec.size:
            cuts |= {sec.offset, sec.offset + sec.size - 1}
    for seg in img.load_segments:
        cuts.add(seg.offset + seg.filesz - 1)
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        out.append((f"truncate at {cut:#x}", data[:cut]))
    header = []
    for name, (off, fmt) in _EHDR[bits].items():
        for v in _values(data, name, off, fmt):
            header.append((f"{name}={v:#x}", off, fmt, v))
    fields = []
    for i in range(len(img.segments)):
        for name, (off, fmt) in _PHDR[bits].items():
            at = phoff + i * phent + off
            for v in _values(data, name, at, fmt):
                fields.append((f"phdr[{i}].{name}={v:#x}", at, fmt, v))
    for i in range(len(img.sections)):
        for name, (off, fmt) in _SHDR[bits].items():
            at = shoff + i * shent + off
            for v in _values(data, name, at, fmt):
                fields.append((f"shdr[{i}].{name}={v:#x}", at, fmt, v))
    symtab = next((s for s in img.sections if s.type in (2, 11)), None)
    if symtab is not None and symtab.link < len(img.sections):
        strs = img.sections[symtab.link]
        ent = 24 if bits == 64 else 16
        edit("string table without its last NUL",
             lambda b: b.__setitem__(strs.offset + strs.size - 1, 0x41))
        edit("string table: invalid UTF-8", lambda b: b.__setitem__(
            slice(strs.offset + 1, strs.offset + 3), b"\xff\xfe"))
        for j in rng.sample(range(1, max(symtab.size // ent, 2)), min(6, symtab.size // ent - 1)):
            at = symtab.offset + j * ent
            fields.append((f"sym[{j}].st_name=huge", at, "<I", strs.size))
            fields.append((f"sym[{j}].st_name=last", at, "<I", strs.size - 1))
            fields.append((f"sym[{j}].st_shndx=0", at + (6 if bits == 64 else 14), "<H", 0))
            fields.append((f"sym[{j}].st_value+1", at + (8 if bits == 64 else 4), w,
                           _get(data, at + (8 if bits == 64 else 4), w) + 1))
    fields = rng.sample(fields, min(len(fields), limit))
    for what, at, fmt, v in header + fields:
        edit(what, lambda b, at=at, fmt=fmt, v=v: _put(b, at, fmt, v))
    for k in range(limit // 10):
        region = rng.choice([(0, ehsize), (phoff, phent * len(img.segments)),
                             (shoff, shent * len(img.sections))])

        def flip(b: bytearray, region: tuple[int, int] = region) -> None:
            for _ in range(rng.choice([1, 2, 3])):
                pos = min(region[0] + rng.randrange(max(region[1], 1)), len(b) - 1)
                b[pos] ^= 1 << rng.randrange(8)

        edit(f"bit flips #{k}", flip)
    return out


# -- the tests -----------------------------------------------------------------------------


def test_readers_agree_on_every_image(corpus: dict[str, Path]) -> None:
    for name, path in corpus.items():
        got = same_facts(str(path), path.read_bytes())
        assert "image" not in got, (name, got)
        if not name.startswith(("bin-", "sample-")):  # (sample_kernel/out may be stale)
            assert got["tables"][0] == "ok", (name, got["tables"])  # type: ignore[index]


def _reference_symbolize(img: image.Image, vaddr: int) -> str | None:
    """How sites were named from a list of every Symbol (the index linkfix now keeps
    as columns must name every address alike)."""
    import bisect

    syms = sorted((s for s in img.symbols
                   if s.name and s.shndx != 0 and s.type in (0, 1, 2) and s.value),
                  key=lambda s: (s.value, s.type != 2, s.name))
    values = [s.value for s in syms]
    i = bisect.bisect_right(values, vaddr) - 1
    if i < 0:
        return None
    best = syms[i]
    j = i
    while j >= 0 and values[j] == values[i]:
        if syms[j].type == 2:
            best = syms[j]
        j -= 1
    off = vaddr - best.value
    if best.size and off >= best.size:
        return None
    return f"{best.name}+{off:#x}"


def _tied(corpus: dict[str, Path], work: Path) -> list[tuple[str, Path]]:
    """Variants whose symbols share addresses: three functions and two labels at the
    first function's address, two labels alone at another's."""
    out = []
    for name in ("synth64", "synth32", "ld64-plain"):
        src = corpus[name]
        img = image.Image(str(src), src.read_bytes(), "hand")
        sec = next(s for s in img.sections if s.type == image.SHT_SYMTAB)
        syms = img.symbols
        code = [j for j, s in enumerate(syms) if s.name and s.shndx and s.value]
        funcs = [j for j in code if syms[j].type == 2][::-1]
        labels = [j for j in code if syms[j].type == 0]
        data = bytearray(src.read_bytes())
        at, fmt = (8, "<Q") if img.bits == 64 else (4, "<I")

        if len(funcs) >= 4 and len(labels) >= 4:
            moves = [(j, syms[funcs[0]].value) for j in funcs[1:3] + labels[:2]] + \
                [(j, syms[funcs[3]].value) for j in labels[2:4]]
            for j, value in moves:
                struct.pack_into(fmt, data, sec.offset + j * sec.entsize + at, value)
            path = work / name
            path.write_bytes(data)
            out.append((f"{name}-tied", path))
    assert out
    return out


def test_sites_are_named_alike_by_every_reader_read_or_mapped(corpus: dict[str, Path],
                                                               tmp_path: Path) -> None:
    # The symbol index is columns of the raw table (hand reader, read or mapped) or of
    # lief's symbols; symbols sharing an address (ld images have several) pick alike.
    ties = 0
    work = tmp_path / "tied"
    work.mkdir()
    for name, path in [*corpus.items(), *_tied(corpus, work)]:
        imgs = [image.Image(str(path), path.read_bytes(), r) for r in READERS]
        with open(path, "rb") as f:
            if os.path.getsize(path):
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                imgs.append(image.Image(str(path), mapped, "hand"))
        ref = imgs[0]
        values = sorted({s.value for s in ref.symbols if s.value})
        ties += len(values) < sum(1 for s in ref.symbols if s.value and s.name
                                  and s.shndx and s.type in (0, 1, 2))
        probes = [v + d for v in values for d in (-1, 0, 1, 7)] + [0, ref.entry]
        want = [_reference_symbolize(ref, a) for a in probes]
        for img in imgs:
            assert [img.symbolize(a) for a in probes] == want, (name, img.reader)
            assert [img.symbol_value(n) for n in NAMES] == \
                [ref.symbol_value(n) for n in NAMES], name
    assert ties


def test_readers_patch_every_image_alike(corpus: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for name, path in corpus.items():
        hand, lief = (patch_run(path, tmp_path / f"{name}.{r}", r, monkeypatch)
                      for r in READERS)
        assert hand == lief, (name, hand[:3], lief[:3])


def test_readers_agree_on_corrupted_images(corpus: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes = {"ok": 0, "refused": 0}
    for n, (name, path) in enumerate(sorted(corpus.items())):
        data = path.read_bytes()
        mutant = tmp_path / "mutant"
        for k, (what, bad) in enumerate(variants(data, random.Random(f"{name}/{n}"), 150)):
            try:
                got = same_facts(str(mutant), bad, deep=False)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {what}: {exc}") from None
            outcomes["refused" if "image" in got else "ok"] += 1
            if "image" not in got and k % 16 == 0:  # the command, end to end, on a share
                mutant.write_bytes(bad)
                hand, lief = (patch_run(mutant, tmp_path / f"out.{r}", r, monkeypatch)
                              for r in READERS)
                assert hand == lief, (name, what, hand[:3], lief[:3])
    print(outcomes)
    assert outcomes["ok"] > 1500 and outcomes["refused"] > 1500, outcomes


def test_lief_disagreeing_with_the_bytes_is_a_refusal(corpus: dict[str, Path]) -> None:
    """What lief reads is compared with the bytes linkfix patches. Here lief reads the
    file (from_path, as for load()) while the bytes in hand say another sh_addr."""
    path = corpus["synth64"]
    data = bytearray(path.read_bytes())
    sec = image.Image(str(path), bytes(data), "hand").section(".text")
    assert sec is not None
    shoff = struct.unpack_from("<Q", data, 40)[0]
    struct.pack_into("<Q", data, shoff + 64 * sec.index + 16, sec.addr + 16)  # sh_addr
    moved = image.Image(str(path), bytes(data), "hand", from_path=True).section(".text")
    assert moved is not None and moved.addr == sec.addr + 16
    with pytest.raises(BadInput) as exc:
        image.Image(str(path), bytes(data), "lief", from_path=True)
    assert exc.value.path == str(path)
    assert exc.value.message == f"lief reads section #{sec.index} as {sec!r}, the file holds " \
                                f"{moved!r}"


def test_reader_selection(corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(corpus["synth32"])
    for r in READERS:
        monkeypatch.setenv(image.READER_ENV, r)
        assert image.load(path).reader == r
    monkeypatch.delenv(image.READER_ENV)
    assert image.load(path).reader == image.DEFAULT_READER
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        # a mapped image (over image.READ_LIMIT) is read by hand: lief would copy it
        mapped = image.Image(path, mm, "lief")
        assert mapped.reader == "hand"
        assert mapped.sections == image.Image(path, mm[:], "lief").sections
        del mapped
    monkeypatch.setenv(image.READER_ENV, "elftools")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["verify", path])
    assert (rc, err.getvalue()) == (2, "linkfix: LINKFIX_ELF_READER='elftools': not an ELF "
                                       "reader (lief or hand)\n")


@pytest.mark.parametrize("argv,reads", [(["--help"], False), (["gen-stubs", "--help"], False),
                                        (["gen-stubs", "SPEC", "-o", "OUT", "-q"], False),
                                        (["verify", "IMAGE", "-q"], True)])
def test_lief_is_imported_only_to_read_an_image(argv: list[str], reads: bool,
                                                corpus: dict[str, Path], tmp_path: Path) -> None:
    subst = {"SPEC": str(ROOT / "tests" / "specs" / "x86_64.toml"), "OUT": str(tmp_path / "out"),
             "IMAGE": str(corpus["synth64"])}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "linkfix",
                        *(subst.get(a, a) for a in argv)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, image.READER_ENV: "lief"})
    assert r.returncode == 0, r.stderr[-500:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")]
    assert "linkfix.cli" in imported
    assert bool([m for m in imported if m.split(".")[0] == "lief"]) == reads, imported
