"""The linkfix patch series in a real Linux 6.1 build (integrations/linux/patches/).

The `linux_builds` fixture (conftest.py) runs the harness first: configs B and C
built and booted without linkfix (`integrations/linux/build.sh`) and with the
series for every target (`build.sh linkfix`, lfbuild.py), incrementally from the
cache. These tests then check what it measured (out/<config>-linkfix/
linkfix-summary.json, out/<config>-baseline/summary.json) and re-run `linkfix
verify` on the kept images. The first run on a fresh machine builds every tree
(about an hour here); later ones take minutes. Marked `linux`: deselect with
-m 'not linux'. The series' own format is checked without any build.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "integrations" / "linux" / "patches"
CACHE = Path(os.environ.get("LINKFIX_LINUX_CACHE", Path.home() / ".cache" / "linkfix-linux"))
TARGETS = ("native", "model", "generic")
OPS = ("irq_disable", "irq_enable", "save_fl", "restore_fl", "safe_halt", "halt",
       "read_cr2", "read_cr3", "write_cr3")


def test_series_is_format_patch_with_messages() -> None:
    patches = sorted(PATCHES.glob("*.patch"))
    assert len(patches) >= 5
    for i, p in enumerate(patches, 1):
        text = p.read_text()
        assert p.name.startswith(f"{i:04d}-")
        m = re.search(r"^Subject: \[PATCH (\d+)/(\d+)\] (\S.*)$", text, re.M)
        assert m and int(m.group(1)) == i and int(m.group(2)) == len(patches), p.name
        body = text.split("\n\n", 1)[1].split("\n---\n", 1)[0]
        assert len([ln for ln in body.splitlines() if ln.strip()]) >= 3, p.name
        assert "\ndiff --git a/" in text
        assert re.search(r"^Signed-off-by: \S.* <\S+@\S+>$", body, re.M), p.name


@pytest.fixture(scope="module")
def built(linux_builds: Path) -> Path:
    return linux_builds


def _summary(config: str) -> dict:
    path = CACHE / "out" / f"{config}-linkfix" / "linkfix-summary.json"
    assert path.is_file(), f"the harness wrote no {path}"
    return json.loads(path.read_text())


def _baseline(config: str) -> dict:
    path = CACHE / "out" / f"{config}-baseline" / "summary.json"
    assert path.is_file(), f"the harness wrote no {path}"
    return json.loads(path.read_text())


def _target(config: str, target: str) -> dict:
    s = _summary(config)
    assert target in s["targets"], f"config {config}: target {target} not built"
    return s["targets"][target]


CASES = [(c, t) for c in ("B", "C") for t in TARGETS]


@pytest.mark.linux
@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("config,target", CASES)
def test_objtool_warnings_equal_baseline(config: str, target: str) -> None:
    r = _target(config, target)
    assert r["objtool"]["baseline"] is not None, "baseline not built"
    assert r["objtool"]["warnings"] == r["objtool"]["baseline"]


@pytest.mark.linux
@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("config,target", CASES)
def test_verify_passes_on_vmlinux(config: str, target: str) -> None:
    r = _target(config, target)
    assert r["verify"]["rc"] == 0, r["verify"]
    vml = CACHE / "out" / f"{config}-linkfix" / target / "vmlinux"
    assert vml.is_file(), f"the harness kept no {vml}"
    p = subprocess.run([sys.executable, "-m", "linkfix", "verify", "--target", target,
                        str(vml)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.linux
@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("config,target", [c for c in CASES if c[0] == "B"])
def test_orccheck_finds_nothing(config: str, target: str) -> None:
    r = _target(config, target)
    assert r["orccheck"]["problems"] == 0, r["orccheck"]
    assert r["orccheck"]["sites"] and r["orccheck"]["sites"] > 1000


@pytest.mark.linux
@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("config,target", CASES)
def test_boots_print_the_counters(config: str, target: str) -> None:
    r = _target(config, target)
    assert r["boots"], "not booted"
    for tag, b in r["boots"].items():
        assert b["result"] == "pass", (tag, b["reasons"])
        c = b["counters"]
        assert set(c["at boot"]) == set(OPS) and set(c["at power-off"]) == set(OPS), tag
        assert set(c["by /init"]) == set(OPS), (tag, c["by /init"])
        assert c["report"]["target"] == target
        model_runs = target == "model" or "linkfix=model" in b["cmdline"]
        assert c["report"]["backend"] == ("model" if model_runs else "native"), tag
        busy = sum(c["at power-off"].values())
        # the model backend counts every op it runs; native never reaches it
        assert (busy > 0) == model_runs, (tag, c)
        if model_runs:
            for op in ("irq_disable", "irq_enable", "save_fl", "restore_fl", "read_cr3"):
                assert c["at power-off"][op] > 0, (tag, op)


@pytest.mark.linux
@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("config", ["B", "C"])
def test_baseline_builds_and_boots(config: str) -> None:
    b = _baseline(config)
    assert b["variant"] == "baseline" and b["boot"]["result"] == "pass", b["boot"]["reasons"]
    assert b["boot"]["modules"]["lfops"]["insmod"], b["boot"]["modules"]
    assert any("checks passed (linkfix off)" in ln
               for ln in b["boot"]["modules"]["lfops"]["dmesg"])
    assert (int(b["boot"]["kaslr_offset"], 16) != 0) == (config == "B")


@pytest.mark.linux
@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("config,target", CASES)
def test_bzimage_payload_is_the_patched_vmlinux(config: str, target: str) -> None:
    r = _target(config, target)["bzimage"]
    assert r["sections_equal"], r
    assert r["verify"]["rc"] == 0, r["verify"]


@pytest.mark.linux
@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("config,target", CASES)
def test_no_table_resident_after_boot(config: str, target: str) -> None:
    r = _target(config, target)
    for tag, b in r["boots"].items():
        res = b["resident"]
        assert "error" not in res, (tag, res)
        assert res["freed_initmem"], tag
        assert res["table_bytes"] > 0 and res["sites"] > 1000, (tag, res)
        assert res["resident_bytes"] == 0, (tag, res)


@pytest.mark.linux
@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("config,target", CASES)
def test_module_runs_every_op(config: str, target: str) -> None:
    r = _target(config, target)
    assert r["module_sites"].get("lfops", 0) >= 9, r["module_sites"]
    for tag, b in r["boots"].items():
        assert b["lfops"]["passed"], (tag, b["lfops"])
        assert "(linkfix on)" in b["lfops"]["line"], (tag, b["lfops"])


@pytest.mark.linux
@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("config", ["B", "C"])
def test_retargeting_is_byte_exact(config: str) -> None:
    r = _target(config, "generic")["retarget"]
    assert all(rc == 0 for rc in r["runs"].values()), r
    assert r["equal"] and all(r["equal"].values()), r


@pytest.mark.linux
@pytest.mark.usefixtures("built")
def test_orc_equals_the_written_kernel() -> None:
    """Config B: every site's bytes and the ORC entry at every address of the patched
    native vmlinux equal those of the kernel compiled with the native bytes written
    into its sites (LINKFIX_GENFLAGS=--written native, writtencheck.py)."""
    w = _summary("B")["written"]
    c = w["compare"]
    assert w["verify"]["rc"] == 0, w["verify"]
    assert ".text" in c["compared_sections"], c
    assert c["sites"]["count"] > 1000
    assert c["sites"]["in_compared_sections"] == c["sites"]["count"], c["not_compared"]
    assert c["sites"]["differences"] == 0, c["sites"]["first"]
    assert c["orc"]["differences"] == 0, c["orc"]["first"]
    assert c["orc"]["entries_written"] > 10_000
    assert w["ok"]


@pytest.mark.linux
@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("config", ["B", "C"])
def test_noop_make_does_nothing(config: str) -> None:
    n = _summary(config)["noop_make"]
    assert n["vmlinux_unchanged"] and not n["relinked"] and not n["repatched"], n
    assert _summary(config)["ok"]


@pytest.mark.linux
@pytest.mark.usefixtures("built")
def test_written_comparison_sees_one_changed_entry(tmp_path: Path) -> None:
    """The comparison is live: one ORC entry inside a save_fl site (where the body has
    pushed the flags) edited in a copy of the patched vmlinux is one difference, and
    one site byte changed is one differing site."""
    sys.path.insert(0, str(ROOT / "integrations" / "linux"))
    import orc  # noqa: PLC0415
    import writtencheck  # noqa: PLC0415

    patched = CACHE / "out" / "B-linkfix" / "native" / "vmlinux"
    written = CACHE / "build" / "B-written" / "vmlinux"
    lf = [sys.executable, "-m", "linkfix"]
    t = orc.OrcTable.from_file(patched)
    sites = writtencheck.sites(lf, patched)
    addr = next(a + 3 for a, _, op in sites if op == "save_fl" and t.index(a + 3) is not None
                and t.ips[t.index(a + 3)] == a + 3)
    i = t.index(addr)
    data = bytearray(patched.read_bytes())
    off = t.entry_file_offset(i)
    data[off] ^= 0x08  # sp_offset += or -= 8
    edited = tmp_path / "vmlinux.orc"
    edited.write_bytes(data)
    res = writtencheck.check(edited, written, lf)
    assert res["orc"]["differences"] == 1 and res["orc"]["differences_in_sites"] == 1, res["orc"]
    assert not res["ok"]
    site, size, _ = sites[len(sites) // 2]
    sec = next(s for s in t.elf.sections if s.addr <= site < s.addr + s.size and s.size)
    data = bytearray(patched.read_bytes())
    data[sec.offset + site - sec.addr] ^= 0xFF
    edited.write_bytes(data)
    res = writtencheck.check(edited, written, lf)
    assert res["sites"]["differences"] == 1 and not res["ok"], res["sites"]
