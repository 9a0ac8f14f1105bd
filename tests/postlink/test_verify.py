"""`linkfix verify`: exit 0 when every site holds what the selection implies, else 3."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import synthimage as si

from linkfix.postlink import image, tables


def verify(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linkfix", "verify", *argv],
                          capture_output=True, text=True)


@pytest.fixture(scope="module", params=[64, 32])
def images(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, Path]:
    work = tmp_path_factory.mktemp(f"verify{request.param}")
    orig = work / "vmlinux"
    si.build_fast(str(orig), 60, request.param, seed=3)
    out = {"orig": orig}
    for target in ("xen", "native"):
        p = work / f"vmlinux.{target}"
        r = subprocess.run([sys.executable, "-m", "linkfix", "patch", str(orig), "-o", str(p),
                            "--target", target], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out[target] = p
    return out


def test_state_record_is_the_default_selection(images: dict[str, Path]) -> None:
    for name in ("orig", "xen", "native"):
        r = verify(str(images[name]))
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"  VERIFY  {images[name]}\n"
    assert verify("-q", str(images["xen"])).stdout == ""


def test_explicit_selection(images: dict[str, Path], tmp_path: Path) -> None:
    assert verify(str(images["xen"]), "--target", "xen").returncode == 0
    assert verify(str(images["orig"]), "--target", "generic").returncode == 0
    policy = tmp_path / "p.toml"
    policy.write_text('target = "xen"\n')
    assert verify(str(images["xen"]), "--policy", str(policy)).returncode == 0
    r = verify(str(images["xen"]), "--target", "native")
    assert r.returncode == 3
    lines = r.stderr.splitlines()
    img = image.load(str(images["xen"]))
    t = tables.load(img)
    chk = tables.check_records(t)
    # One line per differing site, then the summary line.
    differ = 0
    nat = image.load(str(images["native"]))
    for i, s in enumerate(chk.site_addrs):
        n = chk.shape_of(i).site_len
        differ += img.read(s, n) != nat.read(s, n)
    assert len(lines) == differ + 1
    assert lines[-1].endswith(f"{differ} of {t.n_sites} sites differ from the selection "
                              "(--target: native)")
    assert all(" expected native " in x or " expected generic " in x for x in lines[:-1])


def test_one_corrupt_site_is_reported(images: dict[str, Path], tmp_path: Path) -> None:
    img = image.load(str(images["xen"]))
    t = tables.load(img)
    chk = tables.check_records(t)
    i = 7
    s = chk.site_addrs[i]
    n = chk.shape_of(i).site_len
    data = bytearray(img.data)
    off = img.offset_of(s)
    good = bytes(data[off:off + n])
    data[off + n - 1] ^= 0x55
    bad = tmp_path / "bad"
    bad.write_bytes(data)
    r = verify(str(bad))
    assert r.returncode == 3
    lines = r.stderr.splitlines()
    assert len(lines) == 2
    op = t.op_name(chk.shape_of(i).op)
    assert lines[0].startswith(f"linkfix: {bad}: site {s:#x} ({op}): expected ")
    assert good.hex() in lines[0] and bytes(data[off:off + n]).hex() in lines[0]
    assert lines[1].endswith("1 of 60 sites differ from the selection (state record: xen)")
    assert r.stdout == ""


def test_bad_selection_is_exit_2(images: dict[str, Path]) -> None:
    r = verify(str(images["xen"]), "--target", "kvm")
    assert r.returncode == 2 and "unknown backend 'kvm'" in r.stderr
    # --op without --target: the state record, with that op changed.
    r = verify(str(images["xen"]), "--op", "irq_disable=native")
    assert r.returncode == 3 and "(irq_disable): expected native " in r.stderr
    assert "(state record with --op/[ops]: xen)" in r.stderr
    r = verify(str(images["xen"]), "--op", "irq_disable=xen")
    assert r.returncode == 0, r.stderr
    r = verify(str(images["xen"]), "--target", "xen", "--op", "irq_disable=xen",
               "--op", "irq_disable=native")
    assert r.returncode == 2 and "op 'irq_disable' is given more than once" in r.stderr
