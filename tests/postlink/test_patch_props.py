"""Properties of `linkfix patch` over random synthetic images (hypothesis + unicorn).

* re-targeting: patch(patch(orig, A), B) == patch(orig, B), byte for byte;
* idempotence: patching again for the same selection changes nothing;
* only sites and the state record change;
* exact bytes: every site holds its op's one stored copy, each PC-relative field
  re-aimed from the site (format 3), as the state record says;
* targets: decoded, a spliced site reaches every address its copy reaches;
* semantics: a spliced site does what its copy does in .linkfix.repl: run under
  unicorn, both reach the same destination (the first fetch outside the code)
  with the same registers, the same data memory and the same stack (a pushed
  return address compared relative to the code it returns into); a branch
  site's jump reaches its recorded target with nothing else changed.
"""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import synthimage as si
from emulate import Machine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_patch import expected_site

from linkfix import layout
from linkfix.cli import main
from linkfix.postlink import image, tables
from linkfix.stubgen.sitefill import nop_fill

# Format 3 refuses a stored copy with a rel8 branch leaving it (no widening, tested
# below); synthimage's jmp8_out/jz8_out, padded to the site, would jump into the
# padding's NOPs, which is not code.
KINDS = sorted(k for k in si.BODY_LEN if k not in ("jmp8_out", "jz8_out"))
TARGETS = ("generic", "native", "xen", "lguest")


def run(*argv: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(list(argv))


@st.composite
def synth_ops(draw: st.DrawFn) -> tuple[si.SynthOp, ...]:
    n = draw(st.integers(1, 4))
    ops = []
    for j in range(n):
        bodies = {}
        for b in si.BACKENDS:
            kind = draw(st.sampled_from([*KINDS, None]))
            if kind is not None:
                bodies[b] = kind
        ops.append(si.SynthOp(f"op{j}", bodies))
    return tuple(ops)


@st.composite
def images(draw: st.DrawFn) -> dict:
    ops = draw(synth_ops())
    bits = draw(st.sampled_from([64, 32]))
    n = draw(st.integers(1, 24))
    site_ops = draw(st.lists(st.integers(0, len(ops) + len(si.BACKENDS) - 1),
                             min_size=n, max_size=n))
    return {"ops": ops, "bits": bits, "site_ops": site_ops, "gap": draw(st.integers(0, 3))}


def build(tmp: Path, spec: dict, name: str = "vmlinux") -> si.Synth:
    return si.build_fast(str(tmp / name), len(spec["site_ops"]), spec["bits"], ops=spec["ops"],
                         site_ops=spec["site_ops"], gap=spec["gap"])


def selection_args(draw: st.DrawFn, ops: tuple[si.SynthOp, ...]) -> list[str]:
    args = ["--target", draw(st.sampled_from(TARGETS))]
    # An op named on its own gets a backend it has a body for (else patch refuses:
    # test_patch.py::test_selection_errors); branch ops have one for every backend.
    choices = {o.name: ["generic", *o.bodies] for o in ops}
    choices.update({layout.branch_op_name(b): list(TARGETS) for b in si.BACKENDS})
    for name in draw(st.lists(st.sampled_from(sorted(choices)), max_size=3, unique=True)):
        args += ["--op", f"{name}={draw(st.sampled_from(choices[name]))}"]
    return args


SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@SETTINGS
@given(spec=images(), data=st.data())
def test_retarget_idempotence_and_diff(tmp_path_factory, spec: dict, data: st.DataObject) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    synth = build(tmp, spec)
    orig = Path(synth.path).read_bytes()
    sel_a = selection_args(data.draw, spec["ops"])
    sel_b = selection_args(data.draw, spec["ops"])
    a, ab, b, bb = (tmp / x for x in ("a", "ab", "b", "bb"))
    assert run("patch", synth.path, "-o", str(a), *sel_a) == 0
    assert run("patch", str(a), "-o", str(ab), *sel_b) == 0
    assert run("patch", synth.path, "-o", str(b), *sel_b) == 0
    assert run("patch", str(b), "-o", str(bb), *sel_b) == 0
    assert ab.read_bytes() == b.read_bytes()
    assert bb.read_bytes() == b.read_bytes()
    assert run("verify", str(b), *sel_b) == 0
    assert run("verify", str(b)) == 0  # against its own state record
    # Only site bytes and the state record differ from the original.
    img = image.load(synth.path)
    t = tables.load(img)
    allowed = bytearray(len(orig))
    for site in synth.sites:
        off = img.offset_of(site.addr)
        allowed[off:off + site.length] = b"\1" * site.length
    st_off = t.meta_region.offset + layout.STATE_OFFSET
    allowed[st_off:st_off + 4 + len(t.meta.ops)] = b"\1" * (4 + len(t.meta.ops))
    new = b.read_bytes()
    assert all(allowed[i] for i in range(len(orig)) if orig[i] != new[i])
    # Byte-exact: every site holds the alternative the state record names, and that is
    # the one its op's selection asks for, or generic when the op has no such body.
    t_b = tables.load(image.load(str(b)))
    wanted = _requested(sel_b, spec["ops"])
    img_b = image.load(str(b))
    for site in synth.sites:
        name = t_b.meta.ops[site.op]
        k = t_b.meta.op_state[site.op]
        req = wanted[name]
        assert k == (req if site.bodies[req] is not None else 0), (name, k, req)
        assert img_b.read(site.addr, site.length) == expected_site(synth, site, k, img_b)


def _requested(args: list[str], ops: tuple[si.SynthOp, ...]) -> dict[str, int]:
    """Op name -> the alternative the selection arguments ask for."""
    index = {name: k for k, name in enumerate(TARGETS)}
    target = index[args[1]]
    out = {o.name: target for o in ops}
    out.update({layout.branch_op_name(b): target for b in si.BACKENDS})
    for j in range(2, len(args), 2):
        name, backend = args[j + 1].split("=")
        out[name] = index[backend]
    return out


def regs_for(bits: int, rng: random.Random) -> dict[str, int]:
    names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9") if bits == 64 \
        else ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp")
    regs = {n: rng.choice([0, rng.getrandbits(32)]) for n in names}
    regs["eflags"] = 0x2 | rng.choice([0, 0x1, 0x40, 0x200, 0x241])
    return regs


@SETTINGS
@given(spec=images(), target=st.sampled_from(TARGETS), seed=st.integers(0, 2**32 - 1))
def test_spliced_sites_behave_like_their_bodies(tmp_path_factory, spec: dict, target: str,
                                                seed: int) -> None:
    tmp = tmp_path_factory.mktemp("emu")
    synth = build(tmp, spec)
    out = tmp / "patched"
    assert run("patch", synth.path, "-o", str(out), "--target", target) == 0
    img = image.load(str(out))
    machine = Machine(img, synth.data)
    k_req = TARGETS.index(target)
    rng = random.Random(seed)
    word = 8 if spec["bits"] == 64 else 4
    for site in synth.sites:
        k = k_req if site.bodies[k_req] is not None else 0
        body_addr, body_len, flags = site.bodies[k]  # type: ignore[misc]
        regs = regs_for(spec["bits"], rng)
        where = f"site {site.addr:#x} op {site.op} alternative {k}"
        assert body_len == site.length, where  # a stored copy is the whole site
        if flags & layout.FLAG_JMP:
            # A branch site's jump (no stored copy): straight to its recorded target,
            # nothing else touched (the reference runs nothing).
            ref = machine.run(body_addr, 0, regs)
            got = machine.run(site.addr, site.length, regs)
            assert got.exit == body_addr, where
            assert (got.regs, got.memory, got.stack) == (ref.regs, ref.memory, ref.stack), where
            continue
        ref = machine.run(body_addr, body_len, regs)
        got = machine.run(site.addr, site.length, regs)
        fell_ref = ref.exit == body_addr + body_len
        fell_got = got.exit == site.addr + site.length
        assert fell_ref == fell_got, where
        if not fell_ref:
            assert ref.exit == got.exit, where
        assert ref.regs == got.regs, where
        assert ref.memory == got.memory, where
        if ref.stack != got.stack:
            # Only a return address may differ, and only by where the code ran.
            sp = ref.regs["rsp" if spec["bits"] == 64 else "esp"] - machine.stack
            assert ref.stack[:sp] == got.stack[:sp], where
            assert ref.stack[sp + word:] == got.stack[sp + word:], where
            assert machine.word(ref.stack, sp) - body_addr == \
                machine.word(got.stack, sp) - site.addr, where


# -- the general (decoding) path ---------------------------------------------------------------

def _targets(code: bytes, at: int, bits: int) -> list[tuple[str, int | None]]:
    """(mnemonic, absolute branch/RIP target) for each instruction of `code` placed at `at`."""
    import capstone
    from capstone.x86 import X86_OP_MEM, X86_REG_RIP

    cs = capstone.Cs(capstone.CS_ARCH_X86,
                     capstone.CS_MODE_64 if bits == 64 else capstone.CS_MODE_32)
    cs.detail = True
    out = []
    for ins in cs.disasm(code, at):
        target = None
        if capstone.CS_GRP_BRANCH_RELATIVE in ins.groups:
            target = ins.operands[0].imm & ((1 << bits) - 1)
        for op in ins.operands:
            if op.type == X86_OP_MEM and op.mem.base == X86_REG_RIP:
                target = ins.address + ins.size + op.mem.disp
        out.append((ins.mnemonic, target))
    return out


@SETTINGS
@given(spec=images(), target=st.sampled_from(TARGETS))
def test_spliced_sites_keep_every_target(tmp_path_factory, spec: dict, target: str) -> None:
    """Decoded by capstone, every patched site is its copy's instructions, and each
    reaches what the copy reaches: a branch or RIP-relative operand leaving the copy
    the same absolute address, one inside it the same offset in the site."""
    tmp = tmp_path_factory.mktemp("targets")
    synth = build(tmp, spec)
    out = tmp / "patched"
    assert run("patch", synth.path, "-o", str(out), "--target", target) == 0
    img = image.load(str(out))
    bits = spec["bits"]
    k_req = TARGETS.index(target)
    for site in synth.sites:
        k = k_req if site.bodies[k_req] is not None else 0
        addr, n, flags = site.bodies[k]  # type: ignore[misc]
        got = img.read(site.addr, site.length)
        assert got is not None
        after = _targets(got, site.addr, bits)
        where = f"site {site.addr:#x} op {site.op} alternative {k}"
        if flags & layout.FLAG_JMP:
            assert after == [("jmp", addr)], where
            continue
        copy = img.read(addr, n)
        assert copy is not None
        before = _targets(copy, addr, bits)
        assert [m for m, _ in before] == [m for m, _ in after], where
        assert sum(len(ins.bytes) for ins in _insns(got, bits)) == site.length, where
        for (_m, t0), (_m1, t1) in zip(before, after, strict=True):
            if t0 is None:
                assert t1 is None, where
            elif addr <= t0 <= addr + n:
                assert t1 is not None and t1 - site.addr == t0 - addr, where
            else:
                assert t1 == t0, where


def _insns(code: bytes, bits: int) -> list:
    import capstone

    cs = capstone.Cs(capstone.CS_ARCH_X86,
                     capstone.CS_MODE_64 if bits == 64 else capstone.CS_MODE_32)
    return list(cs.disasm(code, 0))


def _with_kind(monkeypatch, kind: str, code: bytes, fields=None) -> None:  # noqa: ANN001
    """Teach synthimage a body kind `kind` assembling to `code`, its digest recording
    `fields` ((pos, size) PC-relative, no target) when given."""
    encode, digest = si.encode, si.kind_digest

    def enc(k: str, at: int, bits: int, env: si.Env) -> bytes:
        return code if k == kind else encode(k, at, bits, env)

    def kd(k: str, bits: int, op: int = 0, op_name: str = "", env: si.Env | None = None,
           symbolic: bool = False, site_len: int = 0) -> layout.BodyDigest:
        if k == kind and fields is not None:
            return layout.body_digest(code + nop_fill(site_len - len(code)), fields,
                                      tuple(layout.Link(True) for _ in fields))
        return digest(k, bits, op, op_name, env, symbolic, site_len)

    monkeypatch.setitem(si.BODY_LEN, kind, (len(code), len(code)))
    monkeypatch.setattr(si, "encode", enc)
    monkeypatch.setattr(si, "kind_digest", kd)


def test_rel8_branch_leaving_a_copy_is_refused(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Format 3 never widens: a stored copy whose rel8 branch leaves it is refused, every
    target, whether or not the header records that field; a rel8 branch to the copy's end
    (its fall-through) is kept, byte for byte, at every site."""
    cases = [("far", b"\xeb\x7f", None, "its PC-relative fields [(1, 1)] are not the "
              "relocated fields the header records []"),
             ("back", b"\x90\x74\x80", None, "its PC-relative fields [(2, 1)] are not the "
              "relocated fields the header records []"),
             ("recorded", b"\xeb\x7f", ((1, 1),), "a branch or displacement leaving the copy "
              "is not 32 bits (gen-stubs never stores one)")]
    for bits in (64, 32):
        for name, code, fields, message in cases:
            with monkeypatch.context() as mp:
                _with_kind(mp, "rel8", code, fields)
                ops = (si.SynthOp("op0", {"native": "rel8", "xen": "cli"}),)
                synth = si.build_fast(str(tmp_path / f"{name}{bits}"), 4, bits, ops=ops,
                                      site_ops=[0, 0, 1, 0])
                copy = Path(synth.path).read_bytes()[
                    image.load(synth.path).offset_of(synth.sites[0].bodies[1][0]):][:5]
            assert copy == code + nop_fill(5 - len(code))
            for target in ("native", "xen", "generic"):
                out = tmp_path / f"out-{name}{bits}-{target}"
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    assert main(["patch", synth.path, "-o", str(out), "--target", target]) == 2
                assert err.getvalue() == (f"linkfix: {synth.path}: .linkfix.meta: op op0 "
                                          f"alternative native: copy {copy.hex()}: {message}\n")
                assert not out.exists()
        with monkeypatch.context() as mp:
            _with_kind(mp, "rel8", b"\xeb\x03", None)  # jmp to the end of the 5-byte copy
            ops = (si.SynthOp("op0", {"native": "rel8", "xen": "cli"}),)
            synth = si.build_fast(str(tmp_path / f"end{bits}"), 4, bits, ops=ops,
                                  site_ops=[0, 0, 1, 0])
        out = tmp_path / f"end{bits}.native"
        assert run("patch", synth.path, "-o", str(out), "--target", "native") == 0
        img = image.load(str(out))
        for site in synth.sites:
            if site.op == 0:
                assert img.read(site.addr, 5) == b"\xeb\x03" + nop_fill(3)


def test_a_copy_unlike_what_gen_stubs_assembled_is_refused(tmp_path: Path) -> None:
    """The one stored copy of an alternative, shared by all its op's sites, whose bytes
    (outside its relocated fields) differ from the digest in the header is refused,
    naming the op and alternative, before anything is written, whatever the selection;
    the same image with the copy intact patches."""
    ops = (si.SynthOp("irq_disable", {"native": "cli", "xen": "gs_movb", "lguest": "rip_movl"}),)
    synth = si.build_fast(str(tmp_path / "vmlinux"), 6, 64, ops=ops, site_ops=[0] * 6)
    clean = Path(synth.path).read_bytes()
    img = image.load(synth.path)
    xen = synth.sites[3].bodies[2]
    lguest = synth.sites[4].bodies[3]
    assert xen is not None and lguest is not None
    assert all(x.bodies[2] == xen and x.bodies[3] == lguest for x in synth.sites)
    for backend, copy, at, value in (("xen", xen, 8, 0x7F),  # movb $0x7f instead of $1
                                     ("lguest", lguest, 6, 0x55)):  # movl $0x55 instead of $0
        data = bytearray(clean)
        off = img.offset_of(copy[0], copy[1])
        assert off is not None and data[off + at] != value
        data[off + at] = value
        bad = tmp_path / f"bad-{backend}"
        bad.write_bytes(data)
        for target in ("xen", "lguest", "native", "generic"):
            out = tmp_path / f"{backend}-{target}"
            err_buf = io.StringIO()
            with contextlib.redirect_stderr(err_buf):
                assert main(["patch", str(bad), "-o", str(out), "--target", target]) == 2
            err = err_buf.getvalue()
            assert err.startswith(f"linkfix: {bad}: .linkfix.meta: op irq_disable alternative "
                                  f"{backend}: copy {bytes(data[off:off + copy[1]]).hex()} "
                                  "does not match the digest gen-stubs recorded"), err
            assert err.count("\n") == 1
            assert not out.exists()
    out = tmp_path / "native"
    assert run("patch", synth.path, "-o", str(out), "--target", "native") == 0
    assert run("verify", str(out)) == 0
