"""Properties of `linkfix patch` over random synthetic images (hypothesis + unicorn).

* re-targeting: patch(patch(orig, A), B) == patch(orig, B), byte for byte;
* idempotence: patching again for the same selection changes nothing;
* only sites and the state record change;
* semantics: a spliced site does what its body did in .linkfix.repl: run under
  unicorn, both reach the same destination (the first fetch outside the code)
  with the same registers, the same data memory and the same stack (a pushed
  return address compared relative to the code it returns into).
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

from linkfix import image, layout, tables
from linkfix.cli import main

KINDS = sorted(si.BODY_LEN)
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
        # A rel8 jump out of the body needs room to widen: give the op a long body.
        if any(k in ("jz8_out", "jmp8_out") for k in bodies.values()) and \
                not any(si.BODY_LEN[k][1] >= 8 for k in bodies.values()):
            bodies[draw(st.sampled_from([b for b in si.BACKENDS if
                                         bodies.get(b) not in ("jz8_out", "jmp8_out")]
                                        or ["native"]))] = "rip_movl"
        ops.append(si.SynthOp(f"op{j}", bodies))
    return tuple(ops)


@st.composite
def images(draw: st.DrawFn) -> dict:
    ops = draw(synth_ops())
    bits = draw(st.sampled_from([64, 32]))
    n = draw(st.integers(1, 24))
    site_ops = draw(st.lists(st.integers(0, len(ops) + len(si.BACKENDS) - 1),
                             min_size=n, max_size=n))
    return {"ops": ops, "bits": bits, "site_ops": site_ops,
            "gap": draw(st.integers(0, 3)), "zero": draw(st.booleans())}


def build(tmp: Path, spec: dict, name: str = "vmlinux") -> si.Synth:
    return si.build_fast(str(tmp / name), len(spec["site_ops"]), spec["bits"], ops=spec["ops"],
                         site_ops=spec["site_ops"], gap=spec["gap"],
                         empty_body_zero=spec["zero"])


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
        body_addr, body_len, _flags = site.bodies[k]  # type: ignore[misc]
        regs = regs_for(spec["bits"], rng)
        ref = machine.run(body_addr, body_len, regs)
        got = machine.run(site.addr, site.length, regs)
        where = f"site {site.addr:#x} op {site.op} alternative {k}"
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

OUT_OF_BODY = ["jmp8_out", "jz8_out", "call", "rip_movl", "jz_in", "gs_movb"]


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


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(OUT_OF_BODY), bits=st.sampled_from([64, 32]),
       delta=st.one_of(st.integers(-700, 700), st.integers(-0x7FFF0000, 0x7FFF0000)))
def test_relocate_keeps_every_target(kind: str, bits: int, delta: int) -> None:
    from linkfix import fixups

    if kind == "rip_movl" and bits == 32:
        kind = "gs_movb"
    b = 0x80000000 if bits == 64 else 0x00100000
    s = (b - delta) % 2**32
    env = si.Env(var_x=0x600000, var_y=0x600010, callee=0x40100000, dispatch={}, test={},
                 true={})
    body = si.encode(kind, b, bits, env)
    code = fixups.analyze(body, bits)
    before = _targets(body, b, bits)
    try:
        new = fixups.relocate(code, body, delta, room=16, bits=bits)
    except fixups.FixupError as exc:
        # Only when some fixed target is out of a rel32's reach from the site.
        assert "does not fit in 32 bits" in str(exc) and bits == 64
        assert any(t is not None and not b <= t <= b + len(body) and abs(t - s) > 2**31 - 16
                   for _m, t in before)
        return
    after = _targets(new, s, bits)
    assert [m for m, _ in before] == [m for m, _ in after] or len(new) > len(body)
    for (_m0, t0), (_m1, t1) in zip(before, after, strict=True):
        if t0 is None:
            assert t1 is None
        elif b <= t0 <= b + len(body):
            # Inside the body (or its end): the same place in the copy.
            assert t1 is not None and t1 - s == (t0 - b if t0 < b + len(body) else len(new))
        else:
            assert t1 == t0
    widened = len(new) != len(body)
    if kind in ("jmp8_out", "jz8_out"):
        # Widened exactly when the rel8 would not reach.
        assert widened == (not -128 <= 3 + delta - 2 <= 127 if kind == "jmp8_out"
                           else not -128 <= 5 + delta - 4 <= 127)
    else:
        assert not widened


def test_a_copy_unlike_what_gen_stubs_assembled_is_refused(tmp_path: Path) -> None:
    """A body copy whose bytes (outside its relocated fields) differ from the digest in
    the header is refused, naming the site, even when only that one copy differs."""
    ops = (si.SynthOp("irq_disable", {"native": "cli", "xen": "gs_movb", "lguest": "rip_movl"}),)
    synth = si.build_fast(str(tmp_path / "vmlinux"), 6, 64, ops=ops, site_ops=[0] * 6)
    data = bytearray(Path(synth.path).read_bytes())
    img = image.load(synth.path)
    xen = synth.sites[3].bodies[2]
    lguest = synth.sites[4].bodies[3]
    assert xen is not None and lguest is not None
    data[img.offset_of(xen[0]) + 8] = 0x7F  # movb $0x7f instead of $1
    data[img.offset_of(lguest[0]) + 6] = 0x55  # movl $0x55 instead of $0
    Path(synth.path).write_bytes(data)
    for target, site in (("xen", synth.sites[3]), ("lguest", synth.sites[4])):
        out = tmp_path / target
        err_buf = io.StringIO()
        with contextlib.redirect_stderr(err_buf):
            assert main(["patch", synth.path, "-o", str(out), "--target", target]) == 2
        err = err_buf.getvalue()
        assert f"site {site.addr:#x} (irq_disable): alternative {target}: body " in err
        assert "does not match the digest gen-stubs recorded" in err
        assert not out.exists()
    # The native body of the same sites is intact: that target still patches.
    assert run("patch", synth.path, "-o", str(tmp_path / "native"), "--target", "native") == 0
