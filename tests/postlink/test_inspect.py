"""`linkfix inspect`: sites with symbol, file:line, state and every alternative."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import synthimage as si

from linkfix import cli
from linkfix.postlink import image, tables

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
    # Format 3 stores every alternative as the whole site; the header records how
    # much of it is body (9 bytes of gs store), the rest is padding (a NOP).
    assert alts["xen"]["body_len"] == 9
    assert alts["xen"]["bytes"].startswith("65c60425") and len(alts["xen"]["bytes"]) == 20
    assert alts["lguest"]["asm"][0].startswith("mov dword ptr [rip + ")
    irq_enable = sites[1]
    assert irq_enable["alternatives"]["lguest"] is None
    summary = doc["summary"]
    assert summary["irq_disable"]["sites"] == 2
    assert summary["irq_disable"]["bytes"] == 2 * 10
    # two 10-byte sites: the 5-byte call, cli, the 9-byte gs store, the 10-byte store
    assert summary["irq_disable"]["padding"] == {"generic": 10, "native": 18, "xen": 2,
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


# -- streaming formats, summary, filters ------------------------------------------------------


def lf(*argv: str) -> subprocess.CompletedProcess[str]:
    """`linkfix inspect ARGV` in this process (the CLI's own entry, output captured)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["inspect", *argv])
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def _jsonl(*argv: str) -> list[dict]:
    r = lf("--jsonl", *argv)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def _site_rows(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "type"} for row in rows
            if row["type"] == "site"]


def _text_blocks(text: str) -> dict[int, list[str]]:
    """Text output: site address -> its lines (the header line and one per alternative)."""
    out: dict[int, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines()[1:]:
        if line == "summary:":
            break
        if line.startswith("0x"):
            current = out.setdefault(int(line.split()[0], 16), [])
        assert current is not None
        current.append(line)
    return out


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """build_fast images big enough for the whole-table splicing path (filters of a few
    sites take the per-site one), patched and not, 64- and 32-bit."""
    work = tmp_path_factory.mktemp("fast")
    out = {}
    for bits in (64, 32):
        path = work / f"img{bits}"
        si.build_fast(str(path), 1500, bits, seed=bits)
        out[f"orig{bits}"] = path
        for target in ("xen", "lguest"):
            dst = work / f"img{bits}.{target}"
            r = subprocess.run([sys.executable, "-m", "linkfix", "patch", str(path), "-o",
                                str(dst), "--target", target, "-q"], capture_output=True,
                               text=True)
            assert r.returncode == 0, r.stderr
            out[f"{target}{bits}"] = dst
    return out


def test_jsonl_agrees_with_json_and_text(built: dict[str, Path], fast: dict[str, Path]) -> None:
    for path in (built["orig"], built["xen"], fast["lguest64"], fast["xen32"]):
        rows = _jsonl(str(path))
        doc = json.loads(lf("--json", str(path)).stdout)
        sites = _site_rows(rows)
        assert sites == doc["sites"]
        kinds = [row["type"] for row in rows]
        n = len(sites)
        assert kinds[:n] == ["site"] * n and kinds[-1] == "image"
        assert set(kinds[n:-1]) == {"op", "backend"}
        summary = {r["op"]: {k: r[k] for k in ("sites", "bytes", "padding")}
                   for r in rows if r["type"] == "op"}
        assert summary == doc["summary"]
        assert {r["backend"]: {"padding": r["padding"]} for r in rows
                if r["type"] == "backend"} == doc["backend_summary"]
        image_row = rows[-1]
        assert image_row["sites"] == image_row["image_sites"] == n
        assert {k: image_row[k] for k in ("image", "machine", "backends", "patched", "target",
                                           "op_state")} == \
            {k: doc[k] for k in ("image", "machine", "backends", "patched", "target", "op_state")}
        text = lf(str(path)).stdout
        blocks = _text_blocks(text)
        assert list(blocks) == [int(s["address"], 16) for s in sites]
        for site in sites:
            head, *alts = blocks[int(site["address"], 16)]
            assert f"  {site['op']}  {site['size']} bytes  [{site['state']}]" in head
            for line, (name, alt) in zip(alts, site["alternatives"].items(), strict=True):
                assert line[4:].startswith(name)
                if alt is None:
                    assert line.endswith("(no body)")
                elif "error" in alt:
                    assert f"(cannot be placed: {alt['error']})" in line
                else:
                    assert line[2] == ("*" if name in site["matches"] else " ")
                    assert line.endswith(" " + "; ".join(alt["asm"]))


def test_every_listing_is_the_disassembly_of_the_spliced_bytes(fast: dict[str, Path]) -> None:
    # Decoded once per layout, yet exactly capstone's listing of each site's own bytes,
    # which are exactly what `patch` would write there.
    from linkfix.postlink import fixups
    from linkfix.postlink.splice import Splicer

    for key in ("orig64", "lguest64", "orig32", "xen32"):
        path = fast[key]
        img = image.load(str(path))
        t = tables.load(img)
        chk = tables.check_records(t)
        sp = Splicer(t, chk)
        index = {a: i for i, a in enumerate(chk.site_addrs)}
        sites = _site_rows(_jsonl(str(path)))
        assert len(sites) == t.n_sites
        for site in sites:
            s = int(site["address"], 16)
            i = index[s]
            off = img.offset_of(s, site["size"])
            current = bytes(img.data[off:off + site["size"]])
            assert site["bytes"] == current.hex()
            matches = []
            for k, (name, alt) in enumerate(site["alternatives"].items()):
                if not sp.shape_of(i).alts[k].present:
                    assert alt is None
                    continue
                want, body_len = sp.placed(i, k)
                assert alt == {"body_len": body_len, "bytes": want.hex(),
                               "asm": fixups.disassemble(want, img.bits, s)}
                if want == current:
                    matches.append(name)
            assert site["matches"] == matches


def test_layouts_render_like_capstone_at_any_address_and_field_value() -> None:
    # A layout is decoded once; sites with other addresses and field values (branch
    # targets, RIP displacements; small, negative, wrapping, a rel16 that capstone
    # reads unsigned) must still read exactly as capstone reads them.
    import random
    import struct

    from linkfix.postlink.inspect_disasm import Decoder, LayoutCache

    rng = random.Random(7)
    bodies = {64: ["e8 00000000 0f1f00", "eb 00 9090", "74 00", "0f84 00000000", "e2 00",
                   "67 e3 00", "c7 f8 00000000", "f2 e9 00000000", "c7 05 00000000 01000000",
                   "48 8d 05 00000000", "ff 25 00000000", "8b 05 00000000 90 e8 00000000",
                   "65 c6 04 25 00000000 01", "0f0b ff"],
              32: ["e8 00000000", "eb 00 90", "66 e9 0000", "66 e8 0000", "e3 00",
                   "c6 05 00000000 01", "0f84 00000000 90"]}
    formats = {1: "<b", 2: "<h", 4: "<i"}
    for bits, codes in bodies.items():
        dec = Decoder(bits)
        mask = (1 << bits) - 1
        for shape, code in enumerate(codes):
            cache = LayoutCache(dec)
            first = bytes.fromhex(code.replace(" ", ""))
            lay = cache.layouts[cache.add(shape, 0, first, 0x401000, 0)]
            for _ in range(150):
                want = bytearray(first)
                for pos, size in lay.fields:
                    v = rng.choice([0, 1, 9, 10, -1, -9, -10,
                                    rng.randrange(-(1 << (8 * size - 1)), 1 << (8 * size - 1))])
                    struct.pack_into(formats[size], want, pos, v)
                s = rng.choice([rng.randrange(64), rng.randrange(1 << 32),
                                0xFFFFFFFF81000000 + rng.randrange(1 << 20),
                                (1 << 32) - rng.randrange(1, 64)]) & mask
                w = bytes(want)
                lid = cache.find(cache.entries(shape, 0), w)
                assert lid >= 0, (code, w.hex())  # the same key: no new decode
                truth = fixups_listing(w, bits, s)
                assert cache.layouts[lid].text(w, s) == "; ".join(truth), (code, w.hex(), hex(s))
                assert json.loads("[" + cache.layouts[lid].json(w, s) + "]") == truth


def fixups_listing(code: bytes, bits: int, s: int) -> list[str]:
    from linkfix.postlink import fixups
    return fixups.disassemble(code, bits, s)


def test_summary_totals_equal_the_full_listing(fast: dict[str, Path],
                                               built: dict[str, Path]) -> None:
    for path in (fast["xen64"], built["xen"]):
        doc = json.loads(lf("--json", str(path)).stdout)
        counts: dict[str, dict] = {}
        for site in doc["sites"]:
            c = counts.setdefault(site["op"], {"sites": 0, "bytes": 0, "padding": {}})
            c["sites"] += 1
            c["bytes"] += site["size"]
            for name, alt in site["alternatives"].items():
                if alt is not None and "error" not in alt:
                    c["padding"][name] = c["padding"].get(name, 0) + site["size"] - \
                        alt["body_len"]
        assert doc["summary"] == counts
        short = json.loads(lf("--json", "--summary", str(path)).stdout)
        assert "sites" not in short and short["summary"] == counts
        assert short["backend_summary"] == doc["backend_summary"]
        rows = _jsonl("--summary", str(path))
        assert {r["type"] for r in rows} == {"op", "backend", "image"}
        text = lf("--summary", str(path)).stdout.splitlines()
        full = lf(str(path)).stdout.splitlines()
        assert text[0] == full[0] and text[1] == "summary:"
        assert text[1:] == full[full.index("summary:"):]
        for op, c in counts.items():
            assert f"  {op}: {c['sites']} sites, {c['bytes']} bytes; padding: " in \
                "\n".join(text)


def test_filters_select_exactly_the_named_sites(fast: dict[str, Path]) -> None:
    path = str(fast["xen64"])
    full = _site_rows(_jsonl(path))
    blocks = _text_blocks(lf(path).stdout)
    img = image.load(path)
    by_addr = {int(s["address"], 16): s for s in full}

    def listed(*argv: str) -> list[dict]:
        got = _site_rows(_jsonl(path, *argv))
        text = lf(path, *argv).stdout
        # The per-site path of a small selection lists them as the whole-table path does.
        assert _text_blocks(text) == {int(s["address"], 16): blocks[int(s["address"], 16)]
                                      for s in got}
        assert got == [by_addr[int(s["address"], 16)] for s in got]
        return got

    assert listed("--op", "twofield") == [s for s in full if s["op"] == "twofield"]
    two = listed("--op", "twofield", "--op", "backend_is(xen)")
    assert two == [s for s in full if s["op"] in ("twofield", "backend_is(xen)")]
    a, b = full[7], full[400]
    assert listed("--site", b["address"], "--site", a["address"]) == [a, b]
    inside = f"{int(a['address'], 16) + a['size'] - 1:#x}"  # any byte of the site names it
    assert listed("--site", inside) == [a]
    assert listed("--site", a["symbol"]) == [a]  # symbol+offset, as listed
    fn = a["symbol"].split("+")[0]
    assert not next(x for x in img.symbols if x.name == fn).size  # a label: its sites are
    under = [s for s in full if s["symbol"].split("+")[0] == fn]  # those listed under it
    assert len(under) > 1 and listed("--site", fn) == under
    assert listed("--site", fn, "--op", a["op"]) == \
        [s for s in listed("--site", fn) if s["op"] == a["op"]]
    head = lf(path, "--site", a["address"]).stdout.splitlines()[0]
    assert head.endswith(f"1 of {len(full)} sites, backends native, xen, lguest; "
                         "patched for xen")
    summary = _jsonl(path, "--op", "twofield", "--summary")
    assert [r["op"] for r in summary if r["type"] == "op"] == ["twofield"]
    assert summary[-1]["sites"] == sum(s["op"] == "twofield" for s in full)


def test_bad_filters_refuse_in_one_line(fast: dict[str, Path], tmp_path: Path) -> None:
    path = str(fast["orig64"])
    first = _site_rows(_jsonl(path, "--op", "irq_disable"))[0]
    gap = int(first["address"], 16) - 1  # the byte before a site (sites are 1 byte apart)
    out = tmp_path / "listing"
    for argv, message in [
        (["--op", "nosuch"], "--op nosuch: no such op (known: irq_disable, "),
        (["--site", "no_such_symbol"], "--site no_such_symbol: no symbol 'no_such_symbol'"),
        (["--site", "no_such_symbol+0x4"], "--site no_such_symbol+0x4: no symbol "
                                           "'no_such_symbol'"),
        (["--site", "fn_0+zz"], "--site fn_0+zz: bad offset 'zz'"),
        (["--site", f"{gap:#x}"], f"--site {gap:#x}: no site at {gap:#x}"),
        (["--site", "0x10"], "--site 0x10: no site at 0x10"),
        (["--site", "_start"], "--site _start: symbol _start"),
    ]:
        for form in ([], ["--jsonl"], ["--json", "--summary"]):
            r = lf(path, *form, *argv, "-o", str(out))
            assert r.returncode == 2 and r.stdout == "", (argv, r.stderr)
            assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
            assert r.stderr.startswith(f"linkfix: {path}: {message}"), r.stderr
            assert not out.exists() and list(tmp_path.iterdir()) == []
    r = inspect(path, "--site", "nowhere")  # the real command line: one line, exit 2
    assert r.returncode == 2 and r.stdout == "" and r.stderr == \
        f"linkfix: {path}: --site nowhere: no symbol 'nowhere' (and not a hex address)\n"


def test_patched_and_corrupt_sites_show_their_current_state(fast: dict[str, Path],
                                                            tmp_path: Path) -> None:
    orig = _site_rows(_jsonl(str(fast["orig64"])))
    patched = _site_rows(_jsonl(str(fast["lguest64"])))
    assert all(s["state"] == "generic" for s in orig)
    for before, after in zip(orig, patched, strict=True):
        want = "lguest" if before["alternatives"]["lguest"] is not None else "generic"
        assert after["state"] == want
        assert after["bytes"] == after["alternatives"][want]["bytes"]
        assert want in after["matches"]
        # What could be placed does not depend on what is there now.
        assert before["alternatives"] == after["alternatives"]
    # Corrupt one site of each kind of state: it is unknown, the others unchanged.
    data = bytearray(fast["lguest64"].read_bytes())
    img = image.load(str(fast["lguest64"]))
    hit = [patched[3], patched[10]]
    for site in hit:
        off = img.offset_of(int(site["address"], 16))
        data[off] ^= 0x55
    bad = tmp_path / "corrupt"
    bad.write_bytes(data)
    got = _site_rows(_jsonl(str(bad)))
    for a, b in zip(patched, got, strict=True):
        if a in hit:
            assert b["state"] == "unknown/corrupt" and b["matches"] == []
        else:
            assert a == b
    text = lf(str(bad)).stdout
    assert text.count("[unknown/corrupt]") == 2


def test_streamed_output_is_identical_between_runs(fast: dict[str, Path], tmp_path: Path) -> None:
    path = str(fast["xen32"])
    for form in ([], ["--json"], ["--jsonl"], ["--summary"], ["--op", "twofield", "--jsonl"]):
        a = inspect(path, *form)
        b = subprocess.run([sys.executable, "-m", "linkfix", "inspect", path, *form],
                           capture_output=True, text=True, env={**os.environ,
                                                                "PYTHONHASHSEED": "77"})
        assert a.returncode == 0 and a.stdout == b.stdout, form
        out = tmp_path / "out.txt"
        r = lf(path, *form, "-o", str(out))
        assert r.returncode == 0 and r.stdout == ""
        assert out.read_text() == a.stdout
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary left


def test_output_file_is_never_the_image(fast: dict[str, Path]) -> None:
    path = str(fast["orig32"])
    before = fast["orig32"].read_bytes()
    r = inspect(path, "-o", path)
    assert r.returncode == 2 and r.stderr == f"linkfix: {path}: output is the input image\n"
    assert fast["orig32"].read_bytes() == before


def _swap_records(src: Path, dst: Path) -> None:
    """`src` with op records 1 and the last of its op swapped, and the first and last
    branch records, each still naming its own site: the same sites, listed by records
    out of address order."""
    import struct

    from linkfix import layout
    img = image.load(str(src))
    t = tables.load(img)
    chk = tables.check_records(t)
    data = bytearray(img.data)
    ops = chk.site_ops
    last = next(j for j in range(chk.n_op - 1, 1, -1) if ops[j] == ops[1])
    n_br = t.n_sites - chk.n_op
    assert n_br >= 2
    for r, size, words, (i, j) in ((t.sites_region, layout.SITE_REC_SIZE, (0,), (1, last)),
                                   (t.branches_region, layout.BRANCH_REC_SIZE,
                                    (0, 4, 8, 16, 20), (0, n_br - 1))):
        a = bytearray(data[r.offset + i * size:r.offset + (i + 1) * size])
        b = bytearray(data[r.offset + j * size:r.offset + (j + 1) * size])
        delta = (j - i) * size  # each word holds its target less its own address
        for w in words:
            struct.pack_into("<i", a, w, struct.unpack_from("<i", a, w)[0] - delta)
            struct.pack_into("<i", b, w, struct.unpack_from("<i", b, w)[0] + delta)
        data[r.offset + j * size:r.offset + (j + 1) * size] = a
        data[r.offset + i * size:r.offset + (i + 1) * size] = b
    dst.write_bytes(data)


def test_blocks_and_record_order_change_nothing(fast: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The listing is streamed in blocks (records read, sites spliced, sites listed),
    # branch sites merged among the op sites by address; records out of address order
    # take the sorted path. None of it shows in the output.
    from linkfix.postlink import inspect_sites, records, splice
    forms = ([], ["--jsonl"], ["--summary"], ["--op", "twofield", "--jsonl"])
    for key in ("xen64", "orig32"):
        path = fast[key]
        want = [lf(str(path), *form).stdout for form in forms]
        swapped = tmp_path / f"{key}.swapped"
        _swap_records(path, swapped)
        chk = tables.check_records(tables.load(image.load(str(swapped))))
        assert not chk.op_sorted and not chk.br_sorted
        got = [lf(str(swapped), *form).stdout.replace(str(swapped), str(path))
               for form in forms]
        assert got == want, key
        with monkeypatch.context() as m:
            m.setattr(inspect_sites, "_BLOCK", 7)
            m.setattr(records, "_READ_BLOCK", 5)
            m.setattr(splice, "_BLOCK", 3)
            assert [lf(str(path), *form).stdout for form in forms] == want, key
            got = [lf(str(swapped), *form).stdout.replace(str(swapped), str(path))
                   for form in forms]
            assert got == want, key
        for p in (path, swapped):  # and patched alike: verify finds every site as listed
            out = tmp_path / f"{p.name}.lguest"
            assert cli.main(["patch", str(p), "-o", str(out), "--target", "lguest",
                             "-q"]) == 0
            assert cli.main(["verify", str(out), "-q"]) == 0
        a, b = (lf("--jsonl", str(tmp_path / f"{p.name}.lguest")).stdout for p in
                (path, swapped))
        assert a == b.replace(str(tmp_path / f"{swapped.name}.lguest"),
                              str(tmp_path / f"{path.name}.lguest"))


def test_checked_columns_are_compact(fast: dict[str, Path]) -> None:
    # A million sites must not cost a million int objects (some 40 bytes each): the
    # columns patch and inspect share are arrays and bytes.
    from array import array

    chk = tables.check_records(tables.load(image.load(str(fast["orig64"]))))
    assert isinstance(chk.site_addrs, array) and chk.site_addrs.typecode == "Q"
    assert isinstance(chk.gens, array) and isinstance(chk.yeses, array)
    assert isinstance(chk.site_ops, bytes) and isinstance(chk.site_lens, bytes)
    assert len(chk.site_addrs) == len(chk.site_ops) == len(chk.site_lens) == \
        chk.n_op + len(chk.gens)
