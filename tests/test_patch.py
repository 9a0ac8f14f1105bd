"""`linkfix patch` on synthetic images: selection, output, state record, CLI contract."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import synthimage as si

from linkfix import image, layout, tables
from linkfix.cli import main
from linkfix.padding import pad


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
        spans.append((off, t.shape(i).site_len))
    return img.data, spans


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
    # Every site now holds the chosen body (or generic when the op has none), padded
    # with exactly one instruction.
    t = tables.load(image.load(str(out)))
    assert t.meta.patched == 1
    assert t.meta.target == (0 if target == "generic" else synth.backends.index(target) + 1)
    k = t.meta.target
    img = image.load(str(out))
    for site in synth.sites:
        alt = site.bodies[k] or site.bodies[0]
        got = img.read(site.addr, site.length)
        assert got is not None
        if alt[1] == 0:
            assert got == pad(site.length)
        elif alt[2] & layout.FLAG_CALL or alt[2] & layout.FLAG_JMP:
            opcode = got[0]
            assert opcode == (0xE8 if alt[2] & layout.FLAG_CALL else 0xE9)
            dest = site.addr + 5 + int.from_bytes(got[1:5], "little", signed=True)
            body = img.read(alt[0], 5)
            assert body is not None
            assert dest == alt[0] + 5 + int.from_bytes(body[1:5], "little", signed=True)
            assert got[5:] == pad(site.length - 5)
    rc, _, err = cli("verify", "-q", str(out))
    assert rc == 0, err


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
    s = si.build_fast(str(path), 50, 64, section_names=False, empty_body_zero=True)
    out = tmp_path / "out"
    rc, _, err = cli("patch", str(path), "-o", str(out), "--target", "native")
    assert rc == 0, err
    img = image.load(str(out))
    assert img.section(layout.SITES_SECTION) is None
    site = next(x for x in s.sites if x.op == 0)  # irq_disable: native is cli
    assert img.read(site.addr, site.length) == b"\xfa" + pad(site.length - 1)


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
