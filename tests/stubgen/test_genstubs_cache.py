"""gen-stubs' cache (linkfix/stubgen/gencache.py), with the real toolchain.

Which assembler ran is observed through a wrapper script named `as`, first on
PATH, that logs its arguments and runs the real GNU as. The wrapper's path is
part of the cache key, so it is on PATH for every run that should hit the
cache: a hit logs only `as --version` (asked for the key) and no assembly.
A failing `as` put on PATH for the second run only would prove nothing (its
path is another key, so the run rightly misses and fails); what is shown
instead is that the second run succeeds even when the program at the same
path, answering `--version` the same, fails every assembly.

The cache is OUTDIR/.linkfix.cache: every listing of OUTDIR here allows exactly
the generated files and that one file. Where it lives, parallel runs, failed runs
and its temporary files: tests/stubgen/test_genstubs_cache_outdir.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from linkfix import progress
from linkfix.stubgen import gencache, genstubs, render

ROOT = Path(__file__).resolve().parents[2]
SPECS = Path(__file__).resolve().parents[1] / "specs"
SPEC = SPECS / "x86_64.toml"
OUTPUTS = ("linkfix.h", "linkfix_asm.h", "linkfix_thunks.S", "linkfix_ops.c", "linkfix_boot.c",
           "linkfix.lds",
           "linkfix.json")
REAL_AS = os.path.realpath(shutil.which("as") or "as")
CACHE = gencache.CACHE_NAME
HEAVY = ("keystone", "jinja2", "elftools", "capstone", "tomllib", "multiprocessing",
         "linkfix.stubgen.spec", "linkfix.stubgen.render", "linkfix.postlink.report",
         "linkfix.stubgen.bodycheck")


class Gas:
    """A logging `as` wrapper in its own directory, put first on PATH."""

    def __init__(self, where: Path, version: str | None = None, fail: bool = False) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.dir = where
        self.log = where / "log"
        self.write(version, fail)

    def write(self, version: str | None = None, fail: bool = False) -> None:
        lines = ["#!/bin/sh", f'printf "%s\\n" "$*" >> "{self.log}"']
        if version is not None:
            (self.dir / "version").write_text(version)
            lines.append(f'if [ "$1" = --version ]; then cat "{self.dir / "version"}"; exit 0; '
                         'fi')
        lines.append("exit 1" if fail else f'exec "{REAL_AS}" "$@"')
        path = self.dir / "as"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o755)

    def env(self) -> dict[str, str]:
        return dict(os.environ, PATH=f"{self.dir}{os.pathsep}{os.environ['PATH']}",
                    PYTHONPATH=str(ROOT))

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def assemblies(self) -> int:
        """Invocations since the last call that assembled something (not --version)."""
        calls = self.calls()
        self.log.unlink(missing_ok=True)
        return sum(1 for c in calls if c != "--version")


def gen(spec: Path, out: Path, *extra: str, gas: Gas | None = None,
        pyargs: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = gas.env() if gas else dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *pyargs, "-m", "linkfix", "gen-stubs", str(spec),
                           "-o", str(out), *extra], capture_output=True, text=True, env=env)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc


def files(out: Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in OUTPUTS}


def cache_file(out: Path) -> Path:
    path = Path(gencache.cache_path(str(out)))
    assert path.parent == out and path.name == CACHE
    return path


def listing(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


WITH_CACHE = sorted([*OUTPUTS, CACHE])


def claims_hold(out: Path) -> bool:
    """The cache is valid, records every output, and each as it is on disk."""
    record = gencache.load(str(cache_file(out)))
    return record is not None and set(record.outputs) == set(OUTPUTS) and all(
        hashlib.sha256((out / n).read_bytes()).hexdigest() == d
        for n, d in record.outputs.items())


def make_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The outputs of tests/specs/x86_64.toml, without the cache."""
    out = tmp_path_factory.mktemp("ref") / "gen"
    ok(gen(SPEC, out, "-q", "--no-cache"))
    assert listing(out) == sorted(OUTPUTS)  # --no-cache writes no cache
    return files(out)


def make_primed(tmp_path: Path, reference: dict[str, bytes]) -> tuple[Gas, Path]:
    """An output directory with its cache, written through the logging wrapper."""
    gas = Gas(tmp_path / "bin")
    out = tmp_path / "gen"
    ok(gen(SPEC, out, "-q", gas=gas))
    assert gas.assemblies() == 1 and files(out) == reference
    assert listing(out) == WITH_CACHE and claims_hold(out)
    return gas, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return make_reference(tmp_path_factory)


@pytest.fixture
def primed(tmp_path: Path, reference: dict[str, bytes]) -> tuple[Gas, Path]:
    return make_primed(tmp_path, reference)


def test_cached_run_prints_and_writes_what_an_uncached_one_does(
        tmp_path: Path, reference: dict[str, bytes]) -> None:
    out, plain = tmp_path / "gen", tmp_path / "plain"
    first = ok(gen(SPEC, out, "-v"))
    ok(gen(SPEC, plain, "--no-cache"))
    before = {n: (out / n).stat().st_mtime_ns for n in OUTPUTS}
    time.sleep(0.01)
    again = ok(gen(SPEC, out, "-v"))
    assert files(out) == reference == files(plain)
    assert {n: (out / n).stat().st_mtime_ns for n in OUTPUTS} == before
    # The same report, but for the counts of written files and the cache's own line.
    strip = [line for line in first.stdout.splitlines() if not line.startswith(("  cache:",
                                                                                "  GEN"))]
    assert strip == [line for line in again.stdout.splitlines()
                     if not line.startswith(("  cache:", "  GEN"))]
    assert "  cache: outputs up to date, nothing assembled" in again.stdout
    plain_again = ok(gen(SPEC, out))
    assert plain_again.stdout == f"  GEN     {out} (7 ops, 3 backends, 0 of 7 files updated)\n"
    assert ok(gen(SPEC, out, "-q")).stdout == ""


def test_unchanged_run_assembles_nothing_and_imports_nothing_heavy(
        primed: tuple[Gas, Path], reference: dict[str, bytes]) -> None:
    gas, out = primed
    proc = ok_importtime(gen(SPEC, out, "-q", gas=gas, pyargs=("-X", "importtime")))
    assert gas.calls() == ["--version"]
    loaded = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:")}
    assert "linkfix.stubgen.gencache" in loaded
    assert not [m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY]
    # The same path answering --version the same, but failing every assembly: the
    # run still succeeds, so it assembled nothing.
    gas.write(version=subprocess.run([REAL_AS, "--version"], capture_output=True, text=True,
                                     env=dict(os.environ, LC_ALL="C")).stdout,
              fail=True)
    ok(gen(SPEC, out, "-q", gas=gas))
    assert files(out) == reference


def ok_importtime(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr
    assert all(line.startswith("import time:") for line in proc.stderr.splitlines())
    return proc


def _rewrite(path: Path, edit) -> None:  # noqa: ANN001 - payload dict -> None
    """Change the payload and give it a correct checksum."""
    _head, _, body = path.read_bytes().partition(b"\n")
    payload = json.loads(body)
    edit(payload)
    path.write_bytes(gencache.encode(payload))


def _header(path: Path, head: bytes) -> None:
    _old, _, body = path.read_bytes().partition(b"\n")
    path.write_bytes(head + b"\n" + body)


CORRUPTIONS = {
    "garbage": lambda p: p.write_bytes(os.urandom(3000)),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "header only": lambda p: p.write_bytes(p.read_bytes().partition(b"\n")[0]),
    "json without header": lambda p: p.write_bytes(p.read_bytes().partition(b"\n")[2]),
    "wrong checksum": lambda p: _header(p, b"linkfix-gencache 1 sha256=" + b"0" * 64),
    "other version": lambda p: _header(p, p.read_bytes().partition(b"\n")[0].replace(
        b"gencache 1 ", b"gencache 2 ")),
    "foreign": lambda p: p.write_bytes(b'{"cache": "of another tool"}\n'),
    "flipped byte": lambda p: p.write_bytes(p.read_bytes()[:-10] + b"X"
                                            + p.read_bytes()[-9:]),
    "altered toolchain": lambda p: _rewrite(p, lambda d: d.update(toolchain="0" * 64)),
    "altered output hash": lambda p: _rewrite(
        p, lambda d: d["outputs"].update({"linkfix.h": "0" * 64})),
    "wrong structure": lambda p: _rewrite(p, lambda d: d.update(outputs=[])),
    "not an object": lambda p: p.write_bytes(_encoded_raw(b"[1, 2]")),
    "deep nesting": lambda p: p.write_bytes(_encoded_raw(b"[" * 100000 + b"]" * 100000)),
    "a directory": lambda p: (p.unlink(), p.mkdir()),
    "a fifo": lambda p: (p.unlink(), os.mkfifo(p)),
}


def _encoded_raw(body: bytes) -> bytes:
    return b"linkfix-gencache 1 sha256=" + hashlib.sha256(body).hexdigest().encode() + b"\n" \
        + body


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_cache_is_ignored(how: str, primed: tuple[Gas, Path],
                                  reference: dict[str, bytes]) -> None:
    gas, out = primed
    path = cache_file(out)
    CORRUPTIONS[how](path)
    proc = ok(gen(SPEC, out, gas=gas))
    assert proc.stdout.endswith("files updated)\n") and proc.stdout.count("\n") == 1
    assert files(out) == reference
    # Ignored means recomputed: everything assembled again (the output hash, the only
    # key-consistent change, only re-renders from the cached measurements).
    assert gas.assemblies() == (0 if how == "altered output hash" else 1)
    if how == "a directory":
        assert path.is_dir()  # left alone; the run does without a cache
        return
    assert gencache.load(str(path)) is not None  # replaced by a valid one
    ok(gen(SPEC, out, gas=gas))
    assert gas.assemblies() == 0


def test_changed_spec_reassembles_only_the_changed_body(
        primed: tuple[Gas, Path], tmp_path: Path) -> None:
    gas, out = primed
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.read_text().replace('native = "cli"', 'native = "cli; nop"'))
    proc = ok(gen(spec, out, "-v", gas=gas))
    assert gas.assemblies() == 1
    assert "  cache: the spec changed; 18 of 19 bodies reused" in proc.stdout
    ok(gen(spec, tmp_path / "plain", "-q", "--no-cache"))
    assert files(out) == files(tmp_path / "plain")
    assert json.loads((out / "linkfix.json").read_text())["ops"][0]["bodies"]["native"][
        "length"] == 2
    ok(gen(spec, out, "-q", gas=gas))
    assert gas.assemblies() == 0


def test_other_arch_reuses_nothing(primed: tuple[Gas, Path], tmp_path: Path) -> None:
    gas, out = primed
    ok(gen(SPECS / "i386.toml", out, "-q", gas=gas))
    assert gas.assemblies() == 1
    ok(gen(SPECS / "i386.toml", tmp_path / "plain", "-q", "--no-cache"))
    assert files(out) == files(tmp_path / "plain")


def test_other_assembler_path_or_version_invalidates(primed: tuple[Gas, Path],
                                                     tmp_path: Path) -> None:
    gas, out = primed
    other = Gas(tmp_path / "elsewhere")  # the same script, at another path
    ok(gen(SPEC, out, "-q", gas=other))
    assert other.assemblies() == 1
    ok(gen(SPEC, out, "-q", gas=other))
    assert other.assemblies() == 0
    other.write(version="GNU assembler (pretend) 9.99\n")  # same path, another version
    ok(gen(SPEC, out, "-v", gas=other))
    assert other.assemblies() == 1
    ok(gen(SPEC, out, "-q", gas=other))
    assert other.assemblies() == 0


def test_deleted_or_edited_output_is_regenerated(primed: tuple[Gas, Path],
                                                 reference: dict[str, bytes]) -> None:
    gas, out = primed
    kept = {n: (out / n).stat().st_mtime_ns for n in OUTPUTS}
    (out / "linkfix.h").unlink()
    (out / "linkfix_ops.c").write_bytes(reference["linkfix_ops.c"] + b"/* edited */\n")
    proc = ok(gen(SPEC, out, "-v", gas=gas))
    assert "2 of 7 files updated" in proc.stdout
    assert "  cache: linkfix.h is missing; 19 of 19 bodies reused" in proc.stdout
    assert gas.assemblies() == 0  # the measurements came from the cache
    assert files(out) == reference
    assert {n: (out / n).stat().st_mtime_ns for n in OUTPUTS
            if n not in ("linkfix.h", "linkfix_ops.c")} == \
        {n: t for n, t in kept.items() if n not in ("linkfix.h", "linkfix_ops.c")}
    for name in OUTPUTS:  # every generated file gone, the cache left: all regenerated
        (out / name).unlink()
    assert listing(out) == [CACHE]
    proc = ok(gen(SPEC, out, "-v", gas=gas))
    assert "7 of 7 files updated" in proc.stdout and gas.assemblies() == 0
    assert files(out) == reference and listing(out) == WITH_CACHE and claims_hold(out)
    shutil.rmtree(out)  # `make clean` takes the cache with it: everything assembled again
    ok(gen(SPEC, out, "-q", gas=gas))
    assert gas.assemblies() == 1 and files(out) == reference and listing(out) == WITH_CACHE


def test_no_cache_neither_reads_nor_writes(primed: tuple[Gas, Path],
                                           reference: dict[str, bytes]) -> None:
    gas, out = primed
    path = cache_file(out)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    ok(gen(SPEC, out, "-q", "--no-cache", gas=gas))
    assert gas.assemblies() == 1
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert files(out) == reference


def test_bad_spec_is_still_one_line(primed: tuple[Gas, Path], tmp_path: Path) -> None:
    gas, out = primed
    path = cache_file(out)
    before = path.read_bytes()
    for text in ("[linkfix\n", SPEC.read_text().replace('native = "cli"', 'native = "clix"')):
        spec = tmp_path / "bad.toml"
        spec.write_text(text)
        proc = gen(spec, out, gas=gas)
        assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
        assert proc.stderr.startswith(f"linkfix: {spec}: "), proc.stderr
    proc = gen(tmp_path / "missing.toml", out, gas=gas)
    assert (proc.returncode, proc.stderr) == (2, f"linkfix: {tmp_path / 'missing.toml'}: "
                                                 "spec file not found\n")
    assert path.read_bytes() == before


# ------------------------------------------------------------------ the key, in-process


def test_key_covers_sources_templates_and_libraries(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "linkfix", tree / "linkfix",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for d in gencache.DATA_DIRS:
        shutil.copytree(ROOT / d, tree / d)
    monkeypatch.setattr(gencache, "_PACKAGE", str(tree / "linkfix"))
    monkeypatch.setattr(gencache, "_ROOT", str(tree))
    mods = ["stubgen/render.py", "stubgen/sitetext.py"]

    def digest(gas: str = "/usr/bin/as", version: str = "GNU assembler 2.40",
               modules: list[str] = mods) -> str:
        return gencache.toolchain_digest(gas, version, modules)

    base = digest()
    assert base == digest()
    seen = {base, digest(gas="/usr/local/bin/as"), digest(version="GNU assembler 2.41"),
            digest(modules=[*mods, "padding.py"])}
    (tree / "linkfix" / "postlink" / "inspect.py").write_text("# not a module gen-stubs loads\n")
    assert digest() == base
    for edit in (tree / "linkfix" / "stubgen" / "sitetext.py", tree / "templates" / "linkfix.h.j2",
                 tree / "ldscripts" / "linkfix.lds"):
        edit.write_bytes(edit.read_bytes() + b"\n")
        seen.add(digest())
    (tree / "linkfix" / "stubgen" / "render.py").unlink()
    seen.add(digest())
    site = tmp_path / "site"
    (site / "jinja2").mkdir(parents=True)
    (site / "jinja2" / "__init__.py").write_text("")
    (site / "jinja2-9.9.dist-info").mkdir()
    monkeypatch.syspath_prepend(str(site))  # a jinja2 that shadows the installed one
    seen.add(digest())
    assert len(seen) == 4 + 3 + 1 + 1


def test_key_lists_the_modules_gen_stubs_loads(primed: tuple[Gas, Path]) -> None:
    _gas, out = primed
    record = gencache.load(str(cache_file(out)))
    assert record is not None
    mods = set(record.modules)
    assert {f"stubgen/{m}.py" for m in ("genstubs", "gencache", "measure", "spec", "body",
                                        "bodycheck", "opmodel", "render", "sitetext")} \
        | {"layout.py", "padding.py"} <= mods
    assert not any(m.startswith("postlink/") for m in mods)


def test_key_reads_what_render_reads() -> None:
    roots = {Path(gencache._ROOT) / d for d in gencache.DATA_DIRS}
    assert render.TEMPLATES in roots and render.LDSCRIPT.parent in roots
    assert Path(gencache._PACKAGE) == Path(render.__file__).parents[1]


@pytest.mark.parametrize("verbose", [False, True])
@pytest.mark.parametrize("quiet", [False, True])
@pytest.mark.parametrize("v_env", [None, "1", "0"])
def test_talk_is_report_verbose_and_quiet(verbose: bool, quiet: bool, v_env: str | None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if v_env is None:
        monkeypatch.delenv("V", raising=False)
    else:
        monkeypatch.setenv("V", v_env)
    import argparse

    args = argparse.Namespace(verbose=verbose, quiet=quiet)
    assert genstubs._talk(args) == (progress.verbose(args), progress.quiet(args))


def test_bodies_naming_a_measuring_section_are_not_cached() -> None:
    assert gencache.body_key(("cli",)) == "cli"
    assert gencache.body_key(("movl $0, .lfb.3(%rip)",)) is None
