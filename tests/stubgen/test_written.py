"""gen-stubs --written BACKEND: sites compiled holding what `linkfix patch` writes.

A written build is the reference the Linux ORC check compares against
(integrations/linux/writtencheck.py), so what it must be is checked here on real
builds: for every backend of the fixture specs, with gcc and clang, an ordinary
image patched for the backend and the written image load the same bytes (every
allocated section at the same address with the same contents, the same symbols),
and the written image is already patched: patching it for its backend changes no
loaded byte. The compiler saw the same statements (same operands, same line
count), so the code around the sites is the same byte for byte. (clang's ld.lld
orders the symbol table differently between the two; its entries are the same.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from test_compile_props import (
    CFLAGS,
    COMPILERS,
    LDEMU,
    LINK_LDS,
    LLD,
    MODE,
    ROOT,
    WARN,
    _sh,
    gen_stubs,
    uses_c,
    uses_s,
)

from linkfix import cli


def _image(tmp: Path, spec: Path, arch: str, cc: str, written: str | None) -> Path:
    out = tmp / ("ordinary" if written is None else f"written-{written}")
    args = ["gen-stubs", str(spec), "-o", str(out), "-q"]
    if written is None:
        rc, err = gen_stubs(spec, out)
    else:
        rc = cli.main([*args, "--written", written])
        err = ""
    assert rc == 0, err
    manifest = json.loads((out / "linkfix.json").read_text())
    (out / "uses.c").write_text(uses_c(manifest))
    (out / "uses.S").write_text(uses_s(manifest))
    return _build(out, arch, cc)


def _build(out: Path, arch: str, cc: str) -> Path:
    """test_compile_props.build(), with every symbol the fixture bodies name but no
    file defines made a one-instruction function (their own code is not compared)."""
    work = out / f"build-{cc}"
    work.mkdir()
    m = MODE[arch]
    objs = {"uses.c": "uses.o", "linkfix_ops.c": "ops.o", "uses.S": "uses_s.o",
            "linkfix_thunks.S": "thunks.o"}
    for src, obj in objs.items():
        flags = [*CFLAGS, *WARN] if src.endswith(".c") else []
        _sh([cc, *m, *flags, f"-I{out}", "-c", str(out / src), "-o", obj], work)
    nm = subprocess.run(["nm", *objs.values()], cwd=work, capture_output=True, text=True,
                        check=True).stdout.split()
    defined = {nm[i + 1] for i in range(len(nm) - 1) if nm[i] in "TtDdBbRr"}
    undefined = sorted({nm[i + 1] for i in range(len(nm) - 1) if nm[i] == "U"} - defined)
    (work / "defs.S").write_text("\t.text\n" + "".join(
        f"\t.globl {name}\n{name}:\n\tret\n" for name in undefined))
    _sh([cc, *m, "-c", "defs.S", "-o", "defs.o"], work)
    ld = "ld" if cc == "gcc" or not LLD else LLD
    _sh([ld, "-m", LDEMU[arch], "-L", str(out), "-T", str(LINK_LDS), "-o", "image",
         *objs.values(), "defs.o"], work)
    return work / "image"


def _loaded(path: Path) -> dict[str, tuple[int, bytes]]:
    """Every allocated section: (address, contents); then the symbols, sorted."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        out = {s.name: (s["sh_addr"], s.data()) for s in elf.iter_sections()
               if s["sh_flags"] & 2 and s["sh_type"] != "SHT_NOBITS"}
        syms = sorted((sym.name, sym["st_value"], sym["st_size"], sym["st_info"]["type"])
                      for sym in elf.get_section_by_name(".symtab").iter_symbols())
    out[".symtab (sorted)"] = (0, repr(syms).encode())
    return out


def _patch(image: Path, target: str, dest: Path) -> bytes:
    p = subprocess.run([sys.executable, "-m", "linkfix", "patch", "-q", "--target", target,
                        "-o", str(dest), str(image)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return _loaded(dest)


# The fixture specs, the runtime ones (bodies with several relocated fields: more
# assembler lines in a written site) and the sample kernel's.
SPECS = [(f"tests/specs/{n}_{a}.toml" if n else f"tests/specs/{a}.toml", a)
         for n in ("", "runtime") for a in ("x86_64", "i386")] + \
    [(f"sample_kernel/spec/{a}.toml", a) for a in ("x86_64", "i386")]


@pytest.mark.parametrize("cc", COMPILERS)
@pytest.mark.parametrize("spec_name,arch", SPECS)
def test_written_image_is_the_patched_image(tmp_path: Path, spec_name: str, arch: str,
                                            cc: str) -> None:
    spec = ROOT / spec_name
    ordinary = _image(tmp_path, spec, arch, cc, None)
    backends = json.loads((tmp_path / "ordinary" / "linkfix.json").read_text())["backends"]
    assert len(backends) >= 2
    for b in backends:
        written = _image(tmp_path, spec, arch, cc, b)
        assert _loaded(written) != _loaded(ordinary)
        want = _patch(ordinary, b, tmp_path / f"patched-{b}")
        assert _loaded(written) == want, f"backend {b}: written image != patched image"
        assert _patch(written, b, tmp_path / f"written-patched-{b}") == want


def test_written_unknown_backend_is_refused(tmp_path: Path, capsys) -> None:
    spec = ROOT / "tests" / "specs" / "x86_64.toml"
    rc = cli.main(["gen-stubs", str(spec), "-o", str(tmp_path / "o"), "--written", "nosuch"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert str(spec) in err[0] and "nosuch" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o").exists()


def test_written_site_with_more_lines_is_refused(tmp_path: Path, capsys) -> None:
    """A copy with four relocated fields takes more assembler lines than the ordinary
    site: the compiler would see another statement, so there is no reference build."""
    spec = tmp_path / "many.toml"
    spec.write_text('[linkfix]\narch = "x86_64"\nbackends = ["native", "hv"]\n'
                    'default_backend = "native"\n[ops.zap.bodies]\n'
                    'native = "movl $0, za(%rip); movl $0, zb(%rip); movl $0, zc(%rip); '
                    'movl $0, zd(%rip)"\nhv = "call hv_zap"\n')
    assert cli.main(["gen-stubs", str(spec), "-o", str(tmp_path / "ok"), "-q"]) == 0
    out = tmp_path / "o"
    rc = cli.main(["gen-stubs", str(spec), "-o", str(out), "--written", "native"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert str(spec) in err[0] and "op 'zap'" in err[0] and "assembler lines" in err[0]
    assert not out.exists()
    assert cli.main(["gen-stubs", str(spec), "-o", str(out), "--written", "hv", "-q"]) == 0
