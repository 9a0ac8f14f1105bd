"""`linkfix inspect`: sites with symbol, file:line, state and every alternative."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import synthimage as si

from linkfix import image, tables

SITE_OPS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 2]  # every op and every branch pseudo-op


def inspect(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linkfix", "inspect", *argv],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("inspect")
    path = Path(si.build_asm(str(work / "vmlinux"), str(work), SITE_OPS, 64, debug=True))
    out = work / "vmlinux.xen"
    r = subprocess.run([sys.executable, "-m", "linkfix", "patch", str(path), "-o", str(out),
                        "--target", "xen"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {"orig": path, "xen": out, "src": work / "synth.S"}


def test_json_lists_every_site_with_location_and_alternatives(built: dict[str, Path]) -> None:
    r = inspect("--json", str(built["orig"]))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["machine"] == "x86_64" and doc["patched"] is False
    sites = doc["sites"]
    assert len(sites) == len(SITE_OPS)
    assert [int(s["address"], 16) for s in sites] == sorted(int(s["address"], 16) for s in sites)
    src = built["src"].read_text().splitlines()
    names = [o.name for o in si.DEFAULT_OPS] + [f"backend_is({b})" for b in si.BACKENDS]
    for n, site in enumerate(sites):
        assert site["op"] == names[SITE_OPS[n]]
        assert site["symbol"] is not None and site["symbol"].startswith("fn_")
        # DWARF line info of the .S points at the line holding the site's label.
        file, line = site["line"].rsplit(":", 1)
        assert file.endswith("synth.S")
        assert src[int(line) - 1].startswith("661:")
        assert site["state"] == "generic" and site["matches"][0] == "generic"
        assert site["alternatives"]["generic"]["asm"][0].startswith(
            "call" if site["kind"] == "op" else "jmp")
    first = sites[0]  # irq_disable
    alts = first["alternatives"]
    assert alts["native"]["asm"][0] == "cli"
    mask = image.load(str(built["orig"])).symbol_value("xen_vcpu_mask")
    assert alts["xen"]["asm"] == [f"mov byte ptr gs:[{mask:#x}], 1", "nop"]
    # Format 3 stores every alternative as the whole site (body and padding): the
    # current inspect reports the copy's length and no separate padding.
    assert alts["xen"]["body_len"] == 10
    assert alts["xen"]["bytes"].startswith("65c60425") and len(alts["xen"]["bytes"]) == 20
    assert alts["lguest"]["asm"][0].startswith("mov dword ptr [rip + ")
    irq_enable = sites[1]
    assert irq_enable["alternatives"]["lguest"] is None
    summary = doc["summary"]
    assert summary["irq_disable"]["sites"] == 2
    assert summary["irq_disable"]["bytes"] == 2 * 10
    assert summary["irq_disable"]["padding"] == {"generic": 0, "native": 0, "xen": 0,
                                                 "lguest": 0}


def test_state_after_patch_and_after_corruption(built: dict[str, Path], tmp_path: Path) -> None:
    doc = json.loads(inspect("--json", str(built["xen"])).stdout)
    assert doc["patched"] is True and doc["target"] == "xen"
    states = [s["state"] for s in doc["sites"]]
    n_real = len(si.DEFAULT_OPS)
    expected = ["xen" if o >= n_real or "xen" in si.DEFAULT_OPS[o].bodies else "generic"
                for o in SITE_OPS]
    assert states == expected
    corrupt = tmp_path / "corrupt"
    data = bytearray(built["xen"].read_bytes())
    img = image.load(str(built["xen"]))
    t = tables.load(img)
    chk = tables.check_records(t)
    off = img.offset_of(chk.site_addrs[0])
    data[off] ^= 0xFF
    corrupt.write_bytes(data)
    doc2 = json.loads(inspect("--json", str(corrupt)).stdout)
    bad = next(s for s in doc2["sites"] if int(s["address"], 16) == chk.site_addrs[0])
    assert bad["state"] == "unknown/corrupt" and bad["matches"] == []


def test_text_output_is_deterministic_and_readable(built: dict[str, Path]) -> None:
    a, b = inspect(str(built["xen"])), inspect(str(built["xen"]))
    assert a.returncode == 0 and a.stdout == b.stdout
    lines = a.stdout.splitlines()
    assert lines[0].endswith("patched for xen")
    assert any("irq_disable  10 bytes  [xen]  fn_0+0x" in line for line in lines)
    assert any(line.strip().startswith("* xen") and "gs:" in line for line in lines)
    assert any(line.strip() == "lguest     (no body)" for line in lines)
    assert "summary:" in lines
    j1 = inspect("--json", str(built["xen"])).stdout
    assert j1 == inspect("--json", str(built["xen"])).stdout


def test_without_debug_info_or_symbols(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    si.build_fast(str(path), 20, 32, symbols=False)
    doc = json.loads(inspect("--json", str(path)).stdout)
    assert doc["machine"] == "i386"
    assert all(s["line"] is None for s in doc["sites"])
    assert not any((s["symbol"] or "").startswith("fn_") for s in doc["sites"])


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "x"
    bad.write_bytes(b"\x7fELF" + bytes(60))
    r = inspect(str(bad))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
