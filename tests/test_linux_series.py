"""The linkfix patch series in a real Linux 6.1 build (integrations/linux/patches/).

The kernels are built and booted by `integrations/linux/build.sh linkfix` (lfbuild.py:
minutes, never started from here); these tests read what it left in the cache
(out/<config>-linkfix/linkfix-summary.json, the vmlinux kept per target) and skip,
saying why, when it is absent. Marked `linux`: deselect with -m 'not linux'. The
series' own format is checked without any build.
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


def _summary(config: str) -> dict:
    path = CACHE / "out" / f"{config}-linkfix" / "linkfix-summary.json"
    if not path.is_file():
        pytest.skip(f"no linkfix build of config {config} ({path}): run "
                    f"integrations/linux/build.sh linkfix --configs {config}")
    return json.loads(path.read_text())


def _target(config: str, target: str) -> dict:
    s = _summary(config)
    if target not in s["targets"]:
        pytest.skip(f"config {config}: target {target} not built yet")
    return s["targets"][target]


CASES = [(c, t) for c in ("B", "C") for t in TARGETS]


@pytest.mark.linux
@pytest.mark.parametrize("config,target", CASES)
def test_objtool_warnings_equal_baseline(config: str, target: str) -> None:
    r = _target(config, target)
    assert r["objtool"]["baseline"] is not None, "baseline not built"
    assert r["objtool"]["warnings"] == r["objtool"]["baseline"]


@pytest.mark.linux
@pytest.mark.parametrize("config,target", CASES)
def test_verify_passes_on_vmlinux(config: str, target: str) -> None:
    r = _target(config, target)
    assert r["verify"]["rc"] == 0, r["verify"]
    vml = CACHE / "out" / f"{config}-linkfix" / target / "vmlinux"
    if not vml.is_file():
        pytest.skip(f"{vml} gone")
    p = subprocess.run([sys.executable, "-m", "linkfix", "verify", "--target", target,
                        str(vml)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.linux
@pytest.mark.parametrize("config,target", [c for c in CASES if c[0] == "B"])
def test_orccheck_finds_nothing(config: str, target: str) -> None:
    r = _target(config, target)
    assert r["orccheck"]["problems"] == 0, r["orccheck"]
    assert r["orccheck"]["sites"] and r["orccheck"]["sites"] > 1000


@pytest.mark.linux
@pytest.mark.parametrize("config,target", CASES)
def test_boots_print_the_counters(config: str, target: str) -> None:
    r = _target(config, target)
    assert r["boots"], "not booted"
    for tag, b in r["boots"].items():
        assert b["result"] == "pass", (tag, b["reasons"])
        c = b["counters"]
        assert set(c["at boot"]) == set(OPS) and set(c["at power-off"]) == set(OPS), tag
        assert c["report"]["target"] == target
        model_runs = target == "model" or "linkfix=model" in b["cmdline"]
        assert c["report"]["backend"] == ("model" if model_runs else "native"), tag
        busy = sum(c["at power-off"].values())
        # the model backend counts every op it runs; native never reaches it
        assert (busy > 0) == model_runs, (tag, c)
        if model_runs:
            for op in ("irq_disable", "irq_enable", "save_fl", "restore_fl", "read_cr3"):
                assert c["at power-off"][op] > 0, (tag, op)
