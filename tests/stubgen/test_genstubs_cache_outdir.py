"""gen-stubs' cache in OUTDIR (OUTDIR/.linkfix.cache): where it lives, `make -j`, failed runs.

The cache is not one of the outputs: it is written after all of them are in
place, is believed only while the outputs on disk hash to what it records, and
is replaced atomically. Parallel runs are real processes started together;
helpers and fixtures come from tests/stubgen/test_genstubs_cache.py.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_genstubs_cache import (
    CACHE,
    CORRUPTIONS,
    OUTPUTS,
    SPEC,
    WITH_CACHE,
    Gas,
    cache_file,
    claims_hold,
    files,
    gen,
    listing,
    make_primed,
    make_reference,
    ok,
)

from linkfix import cli
from linkfix.stubgen import gencache


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return make_reference(tmp_path_factory)


@pytest.fixture
def primed(tmp_path: Path, reference: dict[str, bytes]) -> tuple[Gas, Path]:
    return make_primed(tmp_path, reference)


def _other_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "other.toml"
    spec.write_text(SPEC.read_text().replace('native = "cli"', 'native = "cli; nop"'))
    return spec


def _start_state(how: str, gas: Gas, out: Path, tmp_path: Path) -> None:
    """OUTDIR as two parallel runs find it."""
    if how == "no outdir":
        shutil.rmtree(out)
    elif how == "outputs deleted":
        for name in OUTPUTS:
            (out / name).unlink()
    elif how == "corrupt cache":
        CORRUPTIONS["truncated"](cache_file(out))
    elif how == "cache of other outputs":  # both re-render, and only write the cache
        CORRUPTIONS["altered output hash"](cache_file(out))
    elif how == "other spec's outputs":
        ok(gen(_other_spec(tmp_path), out, "-q", gas=gas))
    gas.assemblies()


def _together(n: int, gas: Gas, out: Path) -> None:
    argv = [sys.executable, "-m", "linkfix", "gen-stubs", str(SPEC), "-o", str(out), "-q"]
    procs = [subprocess.Popen(argv, env=gas.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert (p.returncode, stdout, stderr) == (0, "", "")


@pytest.mark.parametrize("how", ["no outdir", "outputs deleted", "corrupt cache",
                                 "cache of other outputs", "other spec's outputs"])
def test_parallel_runs_into_one_directory(how: str, primed: tuple[Gas, Path], tmp_path: Path,
                                          reference: dict[str, bytes]) -> None:
    """`make -j`: runs of one spec into one OUTDIR at once, real processes. Each ends
    with the right outputs and a valid cache that records them, and nothing else."""
    gas, out = primed
    _start_state(how, gas, out, tmp_path)
    _together(3 if how == "no outdir" else 2, gas, out)
    assert files(out) == reference
    assert listing(out) == WITH_CACHE and claims_hold(out)  # no temporary file left
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # none beside
    gas.assemblies()
    _together(2, gas, out)  # and then two unchanged runs at once: both served
    assert gas.assemblies() == 0
    assert files(out) == reference and listing(out) == WITH_CACHE and claims_hold(out)


def _failing_replace(monkeypatch: pytest.MonkeyPatch, fail_at: int | str) -> list[str]:
    """os.replace fails on its `fail_at`-th call, or on the first onto that name."""
    real = os.replace
    calls: list[str] = []

    def replace(src: str, dst: str) -> None:
        calls.append(os.path.basename(dst))
        if len(calls) == fail_at or calls[-1] == fail_at:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def in_process(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_failed_run_keeps_the_cache_of_the_outputs_in_place(
        primed: tuple[Gas, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        reference: dict[str, bytes]) -> None:
    _gas, out = primed
    path = cache_file(out)
    before = (path.read_bytes(), path.stat().st_ino)
    spec = _other_spec(tmp_path)
    # A rename of the outputs fails (all rolled back): the cache is not touched.
    _failing_replace(monkeypatch, 3)
    rc, stdout, err = in_process("gen-stubs", str(spec), "-o", str(out))
    assert (rc, stdout) == (2, "") and "Input/output error" in err
    monkeypatch.undo()
    assert (path.read_bytes(), path.stat().st_ino) == before
    assert files(out) == reference and listing(out) == WITH_CACHE and claims_hold(out)
    # A first run into a new OUTDIR that fails leaves neither OUTDIR nor a cache.
    fresh = tmp_path / "fresh"
    _failing_replace(monkeypatch, 3)
    assert in_process("gen-stubs", str(SPEC), "-o", str(fresh))[0] == 2
    monkeypatch.undo()
    assert not fresh.exists()
    # The outputs are renamed into place, then the cache's own rename fails: not an
    # error, and the old cache stays, recording the old outputs (never up to date again).
    calls = _failing_replace(monkeypatch, CACHE)
    rc, stdout, err = in_process("gen-stubs", str(spec), "-o", str(out), "-v")
    assert (rc, err) == (0, "") and calls[-1] == CACHE and len(calls) > 1, calls
    assert "6 of 7 files updated" in stdout
    assert f"{path} not written: Input/output error" in stdout
    monkeypatch.undo()
    assert (path.read_bytes(), path.stat().st_ino) == before and not claims_hold(out)
    assert listing(out) == WITH_CACHE
    rc, stdout, _e = in_process("gen-stubs", str(spec), "-o", str(out))
    assert rc == 0 and "0 of 7 files updated" in stdout and claims_hold(out)


def test_cache_lives_in_outdir_and_the_old_place_is_ignored(
        primed: tuple[Gas, Path], tmp_path: Path, reference: dict[str, bytes]) -> None:
    gas, out = primed
    old = tmp_path / f".{out.name}.linkfix-cache"  # where earlier builds kept it
    os.replace(cache_file(out), old)
    kept = old.read_bytes()
    ok(gen(SPEC, out, "-q", gas=gas))
    assert gas.assemblies() == 1  # not read
    assert old.read_bytes() == kept  # nor removed or rewritten
    assert listing(out) == WITH_CACHE and claims_hold(out) and files(out) == reference


def test_stale_temporaries_of_the_cache_are_removed_not_the_cache(
        primed: tuple[Gas, Path], tmp_path: Path) -> None:
    gas, out = primed
    dead = _dead_pid()
    stale = out / f".linkfix-{dead}-0badc0de-{CACHE}.tmp"
    live = out / f".linkfix-{os.getpid()}-0badc0de-{CACHE}.tmp"  # this test is alive
    for p in (stale, live):
        p.write_bytes(b"half a cache")
    ok(gen(_other_spec(tmp_path), out, "-q", gas=gas))  # writes the cache
    assert listing(out) == sorted([*OUTPUTS, CACHE, live.name])
    assert gencache.load(str(cache_file(out))) is not None


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_unwritable_cache_place_is_not_an_error(tmp_path: Path,
                                                reference: dict[str, bytes]) -> None:
    out = tmp_path / "gen"
    cache_file(out).mkdir(parents=True)  # nothing can be renamed over it
    proc = ok(gen(SPEC, out, "-v"))
    assert "not written" in proc.stdout
    assert files(out) == reference and listing(out) == WITH_CACHE  # no temporary left
