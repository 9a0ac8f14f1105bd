"""`linkfix patch` on synthetic images: selection, output, state record, CLI contract."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import synthimage as si

from linkfix import layout
from linkfix.cli import main
from linkfix.postlink import image, tables
from linkfix.stubgen.sitefill import nop_fill


def cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run linkfix in-process; returns (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.environ.get("V")
    if env and "V" in env:
        os.environ["V"] = env["V"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(argv))
    finally:
        if old is None:
            os.environ.pop("V", None)
        else:
            os.environ["V"] = old
    return rc, out.getvalue(), err.getvalue()


def proc(*argv: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linkfix", *argv], capture_output=True,
                          text=True, **kw)


@pytest.fixture(scope="module", params=[64, 32])
def synth(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> si.Synth:
    path = tmp_path_factory.mktemp(f"synth{request.param}") / "vmlinux"
    return si.build_fast(str(path), 300, request.param, seed=request.param)


def read_sites(path: str) -> tuple[bytes, list[tuple[int, int]]]:
    img = image.load(path)
    t = tables.load(img)
    chk = tables.check_records(t)
    spans = []
    for i, s in enumerate(chk.site_addrs):
        off = img.offset_of(s, 1)
        spans.append((off, chk.shape_of(i).site_len))
    return img.data, spans


def alt_kind(synth: si.Synth, site: si.SiteInfo, k: int) -> str:
    """The body kind of alternative k of an op site ("generic" for k = 0)."""
    return "generic" if k == 0 else synth.ops[site.op].bodies[synth.backends[k - 1]]


def pcrel_fields(synth: si.Synth, site: si.SiteInfo, k: int) -> list[tuple[int, int]]:
    """(pos, target) of every PC-relative field of the stored copy of an op site's
    alternative k, as synthimage recorded them for the link."""
    op = synth.ops[site.op]
    d = si.kind_digest(alt_kind(synth, site, k), synth.bits, site.op, op.name, synth.env,
                       site_len=site.length)
    return [(pos, link.target) for (pos, size), link in zip(d.fields, d.links, strict=True)
            if link.pcrel and link.target is not None and size == 4]


def expected_site(synth: si.Synth, site: si.SiteInfo, k: int, img: image.Image | None = None
                  ) -> bytes:
    """The exact bytes `site` holds patched to alternative k (k must have a body), from
    format 3's rule alone: a branch site's jump is `e9` to its recorded target; any other
    alternative is the op's one stored copy (the whole site), each 32-bit PC-relative field
    at pos re-aimed to hold `target - site - pos`. Cross-checked against the body
    assembled at the site's own address."""
    addr, n, flags = site.bodies[k]  # type: ignore[misc]
    assert n == site.length
    if flags & layout.FLAG_JMP:
        return b"\xe9" + struct.pack("<I", (addr - site.addr - 5) & 0xFFFFFFFF)
    img = img or image.load(synth.path)
    copy = img.read(addr, n)
    assert copy is not None and len(copy) == n
    out = bytearray(copy)
    if site.op < len(synth.ops):
        for pos, target in pcrel_fields(synth, site, k):
            # The copy's field is aimed from the copy's own address.
            assert struct.unpack_from("<I", copy, pos)[0] == (target - addr - pos) & 0xFFFFFFFF
            struct.pack_into("<I", out, pos, (target - site.addr - pos) & 0xFFFFFFFF)
        assert bytes(out) == si.finished(alt_kind(synth, site, k), synth.bits, n, synth.env,
                                         site.addr, site.op)
    else:
        assert bytes(out) == nop_fill(5)  # a branch site's "false": the one stored 5-byte NOP
    return bytes(out)


def state_span(path: str) -> tuple[int, int]:
    img = image.load(path)
    t = tables.load(img)
    return t.meta_region.offset + layout.STATE_OFFSET, 4 + len(t.meta.ops)


def changed_outside(a: bytes, b: bytes, spans: list[tuple[int, int]]) -> list[int]:
    assert len(a) == len(b)
    allowed = bytearray(len(a))
    for off, n in spans:
        allowed[off:off + n] = b"\1" * n
    return [i for i in range(len(a)) if a[i] != b[i] and not allowed[i]]


@pytest.mark.parametrize("target", ["native", "xen", "lguest", "generic"])
def test_patch_changes_only_sites_and_state(synth: si.Synth, tmp_path: Path, target: str) -> None:
    out = tmp_path / "out"
    rc, stdout, err = cli("patch", synth.path, "-o", str(out), "--target", target)
    assert rc == 0, err
    assert stdout == f"  LINKFIX {out}\n"
    before, spans = read_sites(synth.path)
    after = out.read_bytes()
    assert changed_outside(before, after, [*spans, state_span(synth.path)]) == []
    # Every site now holds the chosen alternative (or generic when the op has none),
    # byte for byte.
    t = tables.load(image.load(str(out)))
    assert t.meta.patched == 1
    assert t.meta.target == (0 if target == "generic" else synth.backends.index(target) + 1)
    k = t.meta.target
    img = image.load(str(out))
    kinds = set()
    for site in synth.sites:
        kk = k if site.bodies[k] is not None else 0
        got = img.read(site.addr, site.length)
        assert got == expected_site(synth, site, kk, img), (hex(site.addr), site.op, kk)
        kinds.add((site.kind, kk))
    assert {kind for kind, _k in kinds} == {layout.KIND_OP, layout.KIND_BRANCH}
    rc, _, err = cli("verify", "-q", str(out))
    assert rc == 0, err


@pytest.mark.parametrize("target", ["native", "xen", "lguest", "generic"])
def test_every_site_of_an_op_gets_its_one_copy(synth: si.Synth, tmp_path: Path,
                                               target: str) -> None:
    """Format 3 stores one copy per op and alternative: after patching, every site of an
    op holds the same bytes as that copy except its PC-relative fields, which each hold
    `target - site - pos` (so field + site address is the same at every site)."""
    out = tmp_path / "out"
    assert cli("patch", synth.path, "-o", str(out), "--target", target)[0] == 0
    img = image.load(str(out))
    k = 0 if target == "generic" else synth.backends.index(target) + 1
    by_op: dict[int, list[si.SiteInfo]] = {}
    for site in synth.sites:
        if site.op < len(synth.ops):
            by_op.setdefault(site.op, []).append(site)
    shared = 0
    for op, sites in by_op.items():
        kk = k if sites[0].bodies[k] is not None else 0
        addr, n, _flags = sites[0].bodies[kk]  # type: ignore[misc]
        assert all(x.bodies[kk] == sites[0].bodies[kk] for x in sites)  # one copy per op
        copy = img.read(addr, n)
        assert copy is not None
        fields = [pos for pos, _t in pcrel_fields(synth, sites[0], kk)]

        def masked(code: bytes, fields: list[int] = fields) -> bytes:
            b = bytearray(code)
            for pos in fields:
                b[pos:pos + 4] = bytes(4)
            return bytes(b)

        aims = set()
        for x in sites:
            got = img.read(x.addr, x.length)
            assert got is not None and len(got) == n
            assert masked(got) == masked(copy), (op, hex(x.addr))
            aims.add(tuple((struct.unpack_from("<i", got, pos)[0] + x.addr + pos) & 0xFFFFFFFF
                           for pos in fields))
        assert aims == {tuple((struct.unpack_from("<i", copy, pos)[0] + addr + pos)
                              & 0xFFFFFFFF for pos in fields)}
        if fields and len(sites) > 1:
            shared += 1
            assert len({img.read(x.addr, x.length) for x in sites}) == len(sites)
    assert shared or target == "native"  # some op's sites differ only in their fields


def test_a_site_unlike_its_state_record_is_refused(synth: si.Synth, tmp_path: Path) -> None:
    """patch rewrites a site only when it holds exactly what the state record implies:
    one byte changed at one site, inside a re-aimed PC-relative field or outside it, in
    every op (one, two or no fields; branch sites), is refused naming that site, and
    verify reports it."""
    mid = tmp_path / "mid"
    assert cli("patch", synth.path, "-o", str(mid), "--target", "xen")[0] == 0
    base = mid.read_bytes()
    img = image.load(str(mid))
    names = synth.op_names
    xen = synth.backends.index("xen") + 1
    first: dict[int, si.SiteInfo] = {}
    for site in synth.sites:
        first.setdefault(site.op, site)
    assert len(first) == len(names)
    n_tried = 0
    for op, site in sorted(first.items()):
        k = xen if site.bodies[xen] is not None else 0
        want = expected_site(synth, site, k, img)
        assert img.read(site.addr, site.length) == want
        if site.op < len(synth.ops):
            fields = [pos for pos, _t in pcrel_fields(synth, site, k)]
        else:
            fields = [1] if site.bodies[k][2] & layout.FLAG_JMP else []  # type: ignore[index]
        where = [fields[-1] + 3] if fields else []
        where.append(next(j for j in range(site.length)
                          if not any(p <= j < p + 4 for p in fields)))
        for j in where:
            data = bytearray(base)
            off = img.offset_of(site.addr, site.length)
            assert off is not None
            data[off + j] ^= 0x10
            bad = tmp_path / f"bad-{op}-{j}"
            bad.write_bytes(data)
            out = tmp_path / "out"
            rc, _, err = cli("patch", str(bad), "-o", str(out), "--target", "native")
            got = bytes(data[off:off + site.length]).hex()
            alt = "generic" if k == 0 else "xen"
            assert (rc, err) == (2, f"linkfix: {bad}: site {site.addr:#x} ({names[op]}): holds "
                                    f"{got}, not the {alt} bytes {want.hex()} its state record "
                                    "implies; refusing to overwrite bytes linkfix does not "
                                    "recognise\n"), (names[op], j)
            assert not out.exists()
            rc, _, err = cli("verify", str(bad))
            assert rc == 3 and f"site {site.addr:#x} ({names[op]}): expected {alt} " \
                f"{want.hex()}, found {got}" in err
            n_tried += 1
    assert n_tried > len(first)


def test_generic_restores_the_linked_sites(synth: si.Synth, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("patch", synth.path, "-o", str(a), "--target", "xen")[0] == 0
    assert cli("patch", str(a), "-o", str(b), "--target", "generic")[0] == 0
    orig = Path(synth.path).read_bytes()
    back = b.read_bytes()
    where = state_span(synth.path)
    assert changed_outside(orig, back, [where]) == []


def test_retarget_equals_direct_patch(synth: si.Synth, tmp_path: Path) -> None:
    direct = {}
    for target in ("native", "xen", "lguest", "generic"):
        p = tmp_path / f"d-{target}"
        assert cli("patch", synth.path, "-o", str(p), "--target", target)[0] == 0
        direct[target] = p.read_bytes()
    for first in ("native", "xen", "lguest", "generic"):
        mid = tmp_path / f"m-{first}"
        assert cli("patch", synth.path, "-o", str(mid), "--target", first)[0] == 0
        for second in ("native", "xen", "lguest", "generic"):
            out = tmp_path / f"r-{first}-{second}"
            assert cli("patch", str(mid), "-o", str(out), "--target", second)[0] == 0
            assert out.read_bytes() == direct[second], (first, second)


def test_in_place_keeps_mode_and_equals_output(synth: si.Synth, tmp_path: Path) -> None:
    copy = tmp_path / "vmlinux"
    copy.write_bytes(Path(synth.path).read_bytes())
    copy.chmod(0o751)
    ref = tmp_path / "ref"
    assert cli("patch", synth.path, "-o", str(ref), "--target", "lguest")[0] == 0
    rc, stdout, _ = cli("patch", str(copy), "--in-place", "--target", "lguest")
    assert rc == 0
    assert stdout == f"  LINKFIX {copy}\n"
    assert copy.read_bytes() == ref.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o751
    assert stat.S_IMODE(ref.stat().st_mode) == stat.S_IMODE(os.stat(synth.path).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".linkfix-")]


def test_op_override_policy_and_precedence(synth: si.Synth, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('target = "xen"\n[ops]\nirq_disable = "native"\nsave_fl = "lguest"\n')
    out = tmp_path / "out"
    rc, _, err = cli("patch", synth.path, "-o", str(out), "--policy", str(policy),
                     "--op", "save_fl=native", "--op", "backend_is(xen)=generic")
    assert rc == 0, err
    t = tables.load(image.load(str(out)))
    state = dict(zip(t.meta.ops, t.meta.op_state, strict=True))
    native, xen, lguest = 1, 2, 3
    assert t.meta.target == xen
    assert state["irq_disable"] == native  # policy [ops]
    assert state["save_fl"] == native  # command line beats the policy
    assert state["irq_enable"] == xen  # policy target
    assert state["quiet"] == xen
    assert state["nothing"] == 0  # no xen body: generic
    assert state["backend_is(native)"] == xen  # branch pseudo-ops follow the target
    assert state["backend_is(xen)"] == 0  # ... unless named
    del lguest
    rc, _, err = cli("verify", "-q", str(out))
    assert rc == 0, err
    rc, _, err = cli("verify", "-q", str(out), "--policy", str(policy),
                     "--op", "save_fl=native", "--op", "backend_is(xen)=generic")
    assert rc == 0, err
    # --target beats the policy's target.
    out2 = tmp_path / "out2"
    assert cli("patch", synth.path, "-o", str(out2), "--policy", str(policy),
               "--target", "lguest")[0] == 0
    t2 = tables.load(image.load(str(out2)))
    assert t2.meta.target == 3
    assert dict(zip(t2.meta.ops, t2.meta.op_state, strict=True))["irq_disable"] == native


def test_verbose_and_quiet(synth: si.Synth, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, stdout, _ = cli("patch", synth.path, "-o", str(out), "--target", "xen", "-q")
    assert (rc, stdout) == (0, "")
    rc, stdout, _ = cli("patch", synth.path, "-o", str(out), "--target", "xen", "-v")
    lines = stdout.splitlines()
    assert lines[0].startswith("linkfix ")
    assert lines[1] == f"  LINKFIX {out}"
    assert any(line.startswith("  irq_disable: ") and "xen" in line for line in lines)
    assert lines[-1] == f"  total: {len(synth.sites)} sites"
    rc, stdout2, _ = cli("patch", synth.path, "-o", str(out), "--target", "xen",
                         env={"V": "1"})
    assert stdout2.splitlines()[1:] == lines[1:]


def test_tables_found_by_symbols_without_section_names(tmp_path: Path) -> None:
    path = tmp_path / "stripped"
    s = si.build_fast(str(path), 50, 64, section_names=False)
    out = tmp_path / "out"
    rc, _, err = cli("patch", str(path), "-o", str(out), "--target", "native")
    assert rc == 0, err
    img = image.load(str(out))
    assert img.section(layout.SITES_SECTION) is None
    site = next(x for x in s.sites if x.op == 0)  # irq_disable: native is cli
    assert img.read(site.addr, site.length) == b"\xfa" + nop_fill(site.length - 1)
    for x in s.sites:
        k = 1 if x.bodies[1] is not None else 0
        assert img.read(x.addr, x.length) == expected_site(s, x, k, img)


@pytest.mark.parametrize("argv,message", [
    ([], "no target: give --target"),
    (["--target", "kvm"], "unknown backend 'kvm'"),
    (["--target", "xen", "--op", "frob=xen"], "unknown op 'frob'"),
    (["--target", "xen", "--op", "irq_disable"], "expected OP=BACKEND"),
    (["--target", "xen", "--op", "irq_disable=kvm"], "unknown backend 'kvm'"),
    (["--target", "xen", "--op", "irq_disable=xen", "--op", "irq_disable=native"],
     "--op irq_disable=native: op 'irq_disable' is given more than once"),
    # `nothing` has no xen body: with --strict an error (else a warning, below).
    (["--target", "native", "--op", "nothing=xen", "--strict"],
     "--op nothing=xen: op 'nothing' has no body for backend 'xen'; its sites keep the "
     "generic call, which runs the backend selected at boot"),
    (["--target", "xen", "-v", "-q"], "not allowed with argument"),
])
def test_selection_errors(synth: si.Synth, tmp_path: Path, argv: list[str], message: str) -> None:
    out = tmp_path / "out"
    r = proc("patch", synth.path, "-o", str(out), *argv)
    assert r.returncode == 2
    assert message in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not out.exists()


def test_op_without_a_body_is_a_warning(synth: si.Synth, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = proc("patch", synth.path, "-o", str(out), "--target", "native", "--op", "nothing=xen")
    assert r.returncode == 0, r.stderr
    assert r.stderr == (f"linkfix: {synth.path}: warning: --op nothing=xen: op 'nothing' has "
                        "no body for backend 'xen'; its sites keep the generic call, which "
                        "runs the backend selected at boot\n")
    r = proc("verify", str(out))
    assert r.returncode == 0, r.stderr  # the state record says generic for those sites


def test_policy_errors(synth: si.Synth, tmp_path: Path) -> None:
    out = tmp_path / "out"
    bad = tmp_path / "bad.toml"
    for text, message in [('target = "kvm"\n', "unknown backend 'kvm'"),
                          ("target = [\n", "not valid TOML"),
                          ('target="xen"\n[ops]\nfrob = "xen"\n', "unknown op 'frob'"),
                          ('[ops]\nirq_disable = "native"\n', "no target"),
                          ('colour = "blue"\n', "unknown policy keys")]:
        bad.write_text(text)
        r = proc("patch", synth.path, "-o", str(out), "--policy", str(bad))
        assert r.returncode == 2, text
        assert message in r.stderr, (text, r.stderr)
        assert (synth.path if message == "no target" else str(bad)) in r.stderr
        assert not out.exists()


def test_output_equal_to_input_is_refused(synth: si.Synth, tmp_path: Path) -> None:
    copy = tmp_path / "vmlinux"
    copy.write_bytes(Path(synth.path).read_bytes())
    before = copy.stat().st_mtime_ns
    r = proc("patch", str(copy), "-o", str(copy), "--target", "xen")
    assert r.returncode == 2
    assert "--in-place" in r.stderr
    r = subprocess.run([sys.executable, "-m", "linkfix", "patch", "vmlinux", "-o",
                        "./vmlinux", "--target", "xen"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 2
    assert copy.stat().st_mtime_ns == before


def test_summary_counts_one_site(tmp_path: Path) -> None:
    one = si.build_fast(str(tmp_path / "one"), 1, 64, site_ops=[0])
    rc, stdout, err = cli("patch", one.path, "-o", str(tmp_path / "out"), "--target", "xen",
                          "-v")
    assert rc == 0, err
    lines = stdout.splitlines()
    assert lines[-1] == "  total: 1 site"
    assert any(line.startswith("  irq_disable: 1 site (") for line in lines)
