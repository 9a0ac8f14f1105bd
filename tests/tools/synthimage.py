"""Synthetic linked images carrying real linkfix tables (docs/FORMAT.md).

Two generators, one catalogue of bodies:

* `build_fast`: a pure-Python ELF writer (ELF64 x86-64 or ELF32 i386, ET_EXEC)
  for 10 to 1,000,000 sites, used by the property tests and by bench/.
* `build_asm`: a .S file with hand-written records, assembled with gcc and
  linked with GNU ld (optionally `--emit-relocs` or `-pie`), for correctness
  against the real toolchain.

Body kinds (`BODIES`): cli, sti, pushf_pop, gs_movb (absolute), rip_movl
(RIP-relative on x86-64, absolute on i386), call (rel32 to a function), jz_in (a
jz rel8 inside the body), jmp8_out (a jmp rel8 out of the body: needs
widening), jz8_out (jcc rel8 out of the body), empty.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
from dataclasses import dataclass, field

from linkfix import layout
from linkfix.stubgen.sitefill import nop_fill

BASE64 = 0x400000
BASE32 = 0x8048000
PAGE = 0x1000

# kind -> length on (64-bit, 32-bit)
BODY_LEN = {
    "cli": (1, 1), "sti": (1, 1), "pushf_pop": (2, 2), "gs_movb": (9, 8),
    "rip_movl": (10, 10), "call": (5, 5), "jz_in": (5, 5), "jmp8_out": (2, 2),
    "jz8_out": (4, 4), "empty": (0, 0), "abs2": (11, 10), "rip_call": (15, 15),
}
# Bytes a body kind needs after it in .linkfix.repl (its out-of-body jump target).
BODY_TAIL = {"jmp8_out": 2, "jz8_out": 2}
BODY_FLAGS = {"call": layout.FLAG_CALL}


@dataclass(frozen=True)
class SynthOp:
    name: str
    bodies: dict[str, str]  # backend -> body kind; a missing backend has no body


BACKENDS = ("native", "xen", "lguest")

DEFAULT_OPS = (
    SynthOp("irq_disable", {"native": "cli", "xen": "gs_movb", "lguest": "rip_movl"}),
    SynthOp("irq_enable", {"native": "sti", "xen": "call"}),
    SynthOp("save_fl", {"native": "pushf_pop", "xen": "call", "lguest": "jz_in"}),
    SynthOp("twofield", {"native": "pushf_pop", "xen": "rip_call", "lguest": "jz_in"}),
    SynthOp("nothing", {"native": "empty", "lguest": "jz_in"}),
    SynthOp("quiet", {"native": "empty", "xen": "cli"}),
)


@dataclass
class Env:
    """Addresses bodies refer to."""

    var_x: int  # byte written by gs_movb
    var_y: int  # dword written by rip_movl
    callee: int  # target of call bodies
    dispatch: dict[int, int]  # op -> dispatch function
    test: dict[int, int]  # backend -> run-time test (branch site alternative 0)
    true: dict[int, int]  # backend -> "true" label


def encode(kind: str, at: int, bits: int, env: Env) -> bytes:
    """Machine code of a body kind placed at address `at`."""
    def rel32(target: int, end: int) -> bytes:
        return struct.pack("<i", target - end)

    if kind == "cli":
        return b"\xfa"
    if kind == "sti":
        return b"\xfb"
    if kind == "pushf_pop":
        return b"\x9c\x58"
    if kind == "gs_movb":
        if bits == 64:
            return b"\x65\xc6\x04\x25" + struct.pack("<I", env.var_x) + b"\x01"
        return b"\x65\xc6\x05" + struct.pack("<I", env.var_x) + b"\x01"
    if kind == "rip_movl":
        if bits == 64:
            return b"\xc7\x05" + rel32(env.var_y, at + 10) + b"\0\0\0\0"
        return b"\xc7\x05" + struct.pack("<I", env.var_y) + b"\0\0\0\0"
    if kind == "call":
        return b"\xe8" + rel32(env.callee, at + 5)
    if kind == "jz_in":
        return b"\x85\xc0\x74\x01\xfa"  # test %eax,%eax; jz 1f; cli; 1:
    if kind == "jmp8_out":
        return b"\xeb\x01"  # to at+3, past the tail's first byte
    if kind == "jz8_out":
        return b"\x85\xc0\x74\x01"  # to at+5
    if kind == "empty":
        return b""
    if kind == "rip_call":  # rip_movl then call: two fields
        return encode("rip_movl", at, bits, env) + encode("call", at + 10, bits, env)
    if kind == "abs2":  # movl $xen_vcpu_mask, lguest_irq_enabled: two absolute fields
        prefix = b"\xc7\x04\x25" if bits == 64 else b"\xc7\x05"
        return prefix + struct.pack("<II", env.var_y, env.var_x)
    raise ValueError(kind)


def body_len(kind: str, bits: int) -> int:
    return BODY_LEN[kind][0 if bits == 64 else 1]


def site_len(op: SynthOp, bits: int, generic_len: int = 5) -> int:
    return max([generic_len] + [body_len(k, bits) for k in op.bodies.values()])


@dataclass
class SiteInfo:
    addr: int
    op: int
    length: int
    kind: int
    # per alternative: (address of its stored copy, copy length, flags); a branch
    # site's jumps: (target, 5, flags)
    bodies: list[tuple[int, int, int] | None]


@dataclass
class Synth:
    path: str
    bits: int
    backends: tuple[str, ...]
    ops: tuple[SynthOp, ...]
    sites: list[SiteInfo]
    env: Env
    text: tuple[int, int]  # [start, end) of .text
    data: tuple[int, int]  # [start, end) of .data
    segments: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    # (vaddr, offset, filesz, memsz, flags)

    @property
    def op_names(self) -> list[str]:
        return [o.name for o in self.ops] + [layout.branch_op_name(b) for b in self.backends]


# Per body kind and word size: (position, size, PC-relative, symbol, addend) of every
# field the link fills in: what gen-stubs would mask in the digest and record.
_FIELDS = {
    ("gs_movb", 64): ((4, 4, False, "xen_vcpu_mask", 0),),
    ("gs_movb", 32): ((3, 4, False, "xen_vcpu_mask", 0),),
    ("rip_movl", 64): ((2, 4, True, "lguest_irq_enabled", -8),),
    ("rip_movl", 32): ((2, 4, False, "lguest_irq_enabled", 0),),
    ("call", 64): ((1, 4, True, "callee", -4),),
    ("call", 32): ((1, 4, True, "callee", -4),),
    ("rip_call", 64): ((2, 4, True, "lguest_irq_enabled", -8), (11, 4, True, "callee", -4)),
    ("rip_call", 32): ((2, 4, False, "lguest_irq_enabled", 0), (11, 4, True, "callee", -4)),
    ("abs2", 64): ((3, 4, False, "lguest_irq_enabled", 0), (7, 4, False, "xen_vcpu_mask", 0)),
    ("abs2", 32): ((2, 4, False, "lguest_irq_enabled", 0), (6, 4, False, "xen_vcpu_mask", 0)),
}


def _value(env: Env, symbol: str, op: int) -> int:
    return {"xen_vcpu_mask": env.var_x, "lguest_irq_enabled": env.var_y,
            "callee": env.callee}.get(symbol, env.dispatch.get(op, 0))


def finished(kind: str, bits: int, site_len: int, env: Env, at: int, op: int = 0) -> bytes:
    """The stored copy of a body kind at address `at`: the whole site, padding included."""
    if kind == "generic":
        code = b"\xe8" + struct.pack("<i", env.dispatch.get(op, 0) - (at + 5))
    elif kind == "generic_indirect":
        code = b"\xff\x15" + struct.pack("<I", env.callee)
    else:
        code = encode(kind, at, bits, env)
    return code + nop_fill(site_len - len(code))


def kind_digest(kind: str, bits: int, op: int = 0, op_name: str = "", env: Env | None = None,
                symbolic: bool = False, site_len: int = 0) -> layout.BodyDigest:
    """The digest of a body kind's copy finished to `site_len` bytes; its fields' targets
    from `env` (build_fast), or as assembler expressions (`symbolic`), or placeholders."""
    zero = Env(0, 0, 0, {}, {}, {})
    if kind == "branch":  # the jmp to a branch site's own label: nothing to record
        return layout.body_digest(b"\xe9" + bytes(4), ((1, 4),), (layout.Link(True),))
    if kind == "generic":
        code = b"\xe8" + bytes(4)
        specs: tuple = ((1, 4, True, f"__lf_dispatch_{op_name}", -4),)
    elif kind == "generic_indirect":
        code = b"\xff\x15" + bytes(4)
        specs = ((2, 4, False, "lf_ptr", 0),)
    else:
        code = encode(kind, 0, bits, zero)
        specs = _FIELDS.get((kind, bits), ())
    code += nop_fill(max(0, site_len - len(code)))
    links = []
    for _pos, _size, pcrel, sym, addend in specs:
        if symbolic:
            links.append(layout.Link(pcrel, expr=f"{sym}{addend:+d}"))
        else:
            target = (_value(env, sym, op) + addend) if env is not None else 0
            links.append(layout.Link(pcrel, target=target & ((1 << bits) - 1)))
    return layout.body_digest(code, tuple((p, n) for p, n, *_ in specs), tuple(links))


def alt_flags(kind: str) -> int:
    return layout.FLAG_PRESENT | (layout.FLAG_CALL if kind in ("generic", "call") else 0)


def meta_for(bits: int, backends: tuple[str, ...], ops: tuple[SynthOp, ...],
             indirect_generic: bool = False, env: Env | None = None,
             symbolic: bool = False, addrs: dict[tuple[int, int], int] | None = None
             ) -> layout.Meta:
    """The header; copies at `addrs[(op, k)]` (build_fast) or labels `lf_c_<op>_<k>`."""
    names = tuple(o.name for o in ops) + tuple(layout.branch_op_name(b) for b in backends)
    rows = []

    def entry(op: int, k: int, kind: str, digest: layout.BodyDigest) -> layout.AltEntry:
        flags = alt_flags(kind)
        if kind == "generic_indirect":
            flags = layout.FLAG_PRESENT | layout.FLAG_CALL
        n = 6 if kind == "generic_indirect" else 5 if kind == "generic" else body_len(kind, bits)
        if addrs is not None:
            return layout.AltEntry(flags, digest, addr=addrs.get((op, k), 0), body_len=n)
        return layout.AltEntry(flags, digest, label=f"lf_c_{op}_{k}", body_len=n)

    for j, op in enumerate(ops):
        L = site_len(op, bits, 6 if indirect_generic else 5)
        g = "generic_indirect" if indirect_generic else "generic"
        row = [entry(j, 0, g, kind_digest(g, bits, j, op.name, env, symbolic, L))]
        for k, b in enumerate(backends, start=1):
            if b not in op.bodies:
                row.append(layout.ABSENT_ALT)
            else:
                kind = op.bodies[b]
                row.append(entry(j, k, kind, kind_digest(kind, bits, j, op.name, env, symbolic,
                                                         L)))
        rows.append(tuple(row))
    jmp = layout.AltEntry(layout.FLAG_PRESENT | layout.FLAG_JMP, kind_digest("branch", bits),
                          body_len=5)
    nop5 = layout.body_digest(nop_fill(5), ())
    n_real = len(ops)
    for b in range(1, len(backends) + 1):
        row = [jmp]
        for k in range(1, len(backends) + 1):
            if k == b:
                row.append(jmp)
            elif addrs is not None:
                row.append(layout.AltEntry(layout.FLAG_PRESENT, nop5,
                                           addr=addrs.get((n_real + b - 1, k), 0)))
            else:
                row.append(layout.AltEntry(layout.FLAG_PRESENT, nop5, label="lf_c_nop5"))
        rows.append(tuple(row))
    return layout.Meta(machine=62 if bits == 64 else 3, backends=backends, ops=names,
                       spec_hash=0x5EED1234, alts=tuple(rows))


def choose_ops(n: int, ops: tuple[SynthOp, ...], n_branch: int, rng: random.Random
               ) -> list[int]:
    """A reproducible op index per site; indices >= len(ops) are branch sites."""
    total = len(ops)
    return [rng.randrange(total) if rng.random() >= n_branch else
            total + rng.randrange(len(BACKENDS)) for _ in range(n)]


# -- the pure-Python ELF writer ------------------------------------------------------------


def build_fast(path: str, n_sites: int, bits: int = 64, *, ops: tuple[SynthOp, ...] = DEFAULT_OPS,
               backends: tuple[str, ...] = BACKENDS, seed: int = 0, branch_share: float = 0.1,
               site_ops: list[int] | None = None, gap: int = 1, symbols: bool = True,
               section_names: bool = True) -> Synth:
    """Write an ET_EXEC image with `n_sites` sites; returns what was placed where.

    `site_ops` fixes the op of every site (indices >= len(ops) are branch sites
    backend_is(backends[i - len(ops)])). `section_names=False` renames the
    linkfix sections so that only the __linkfix_* symbols find the tables.
    """
    rng = random.Random(seed)
    if site_ops is None:
        site_ops = choose_ops(n_sites, ops, branch_share, rng)
    n_sites = len(site_ops)
    nb = len(backends)
    n_real = len(ops)
    w64 = bits == 64
    base = BASE64 if w64 else BASE32
    meta = meta_for(bits, backends, ops, addrs={})

    # .text: dispatch functions, callee, branch tests and "true" labels, then the sites.
    text_addr = base + PAGE
    text = bytearray()

    def stub(code: bytes) -> int:
        at = text_addr + len(text)
        text.extend(code + b"\xcc" * (-len(code) % 16))
        return at

    dispatch = {op: stub(b"\xc3") for op in range(n_real)}
    callee = stub(b"\xb8\x34\x12\x00\x00\xc3")  # mov $0x1234,%eax; ret
    test = {b: stub(b"\x90\xc3") for b in range(1, nb + 1)}
    true = {b: stub(b"\x90\x90\xc3") for b in range(1, nb + 1)}
    fn_syms: list[tuple[str, int, int]] = [("_start", text_addr, 0)]

    lens = [site_len(ops[o], bits) if o < n_real else 5 for o in site_ops]
    n_op_sites = sum(1 for o in site_ops if o < n_real)
    n_br = n_sites - n_op_sites
    text_sites_at = text_addr + len(text)
    text_size = len(text) + sum(lens) + gap * n_sites
    ro_addr = _align(text_addr + text_size, PAGE)
    meta_addr = ro_addr
    sites_addr = _align(meta_addr + meta.size(), 8)
    branches_addr = sites_addr + layout.SITE_REC_SIZE * n_op_sites
    repl_addr = branches_addr + layout.BRANCH_REC_SIZE * n_br
    copy_lens = [(j, k, site_len(op, bits)) for j, op in enumerate(ops)
                 for k, b in enumerate(("generic", *backends)) if k == 0 or b in op.bodies]
    repl_size = sum(n for _j, _k, n in copy_lens) + 5
    data_addr = _align(repl_addr + repl_size, PAGE) + PAGE
    env = Env(var_x=data_addr, var_y=data_addr + 8, callee=callee, dispatch=dispatch,
              test=test, true=true)

    # One stored copy per op and alternative, and one 5-byte NOP for branches' "false".
    repl = bytearray()
    addrs: dict[tuple[int, int], int] = {}
    for j, k, n in copy_lens:
        kind = "generic" if k == 0 else ops[j].bodies[backends[k - 1]]
        addrs[(j, k)] = at = repl_addr + len(repl)
        repl += finished(kind, bits, n, env, at, j)
    nop5_at = repl_addr + len(repl)
    repl += nop_fill(5)
    for b in range(1, nb + 1):
        for k in range(1, nb + 1):
            if k != b:
                addrs[(n_real + b - 1, k)] = nop5_at
    assert len(repl) == repl_size, (len(repl), repl_size)

    text.extend(bytes(text_size - len(text)))
    sites_blob = bytearray(layout.SITE_REC_SIZE * n_op_sites)
    branches_blob = bytearray(layout.BRANCH_REC_SIZE * n_br)
    infos: list[SiteInfo] = []
    at = text_sites_at
    n_op = n_b = 0
    for i, o in enumerate(site_ops):
        L = lens[i]
        t_off = at - text_addr
        alts: list[tuple[int, int, int] | None] = []
        if o < n_real:
            rec_addr = sites_addr + n_op * layout.SITE_REC_SIZE
            layout.SITE.pack_into(sites_blob, n_op * layout.SITE_REC_SIZE, at - rec_addr, o, L,
                                  layout.op_check(o))
            n_op += 1
            kinds = ["generic"] + [ops[o].bodies.get(b) for b in backends]
            for k, kind in enumerate(kinds):
                alts.append(None if kind is None else (addrs[(o, k)], L, alt_flags(kind)))
            text[t_off:t_off + L] = b"\xe8" + struct.pack("<i", dispatch[o] - (at + 5)) + \
                nop_fill(L - 5)
        else:
            b = o - n_real + 1
            rec_addr = branches_addr + n_b * layout.BRANCH_REC_SIZE
            layout.BRANCH.pack_into(branches_blob, n_b * layout.BRANCH_REC_SIZE, at - rec_addr,
                                    test[b] - (rec_addr + 4), true[b] - (rec_addr + 8), o, b,
                                    layout.KIND_BRANCH, test[b] - (rec_addr + 16),
                                    true[b] - (rec_addr + 20))
            n_b += 1
            jmp = layout.FLAG_PRESENT | layout.FLAG_JMP
            alts.append((test[b], 5, jmp))
            for k in range(1, nb + 1):
                alts.append((true[b], 5, jmp) if k == b else (nop5_at, 5, layout.FLAG_PRESENT))
            text[t_off:t_off + L] = b"\xe9" + struct.pack("<i", test[b] - (at + 5))
        for g_i in range(gap):
            text[t_off + L + g_i] = 0x90
        if symbols and i % 8 == 0:
            fn_syms.append((f"fn_{i // 8}", at, 0))
        infos.append(SiteInfo(at, o, L, 0 if o < n_real else 1, alts))
        at += L + gap

    data = bytearray(64)
    bss_size = 64

    # File layout mirrors the address layout (offset = vaddr - base).
    ro_end = repl_addr + repl_size
    image = bytearray(data_addr - base + len(data))
    image[text_addr - base:text_addr - base + len(text)] = text
    meta = meta_for(bits, backends, ops, env=env, addrs=addrs)  # with the real targets
    meta_bytes = meta.encode(meta_addr, (sites_addr, branches_addr, branches_addr, repl_addr,
                                         repl_addr, ro_end))
    image[meta_addr - base:meta_addr - base + len(meta_bytes)] = meta_bytes
    image[sites_addr - base:sites_addr - base + len(sites_blob)] = sites_blob
    image[branches_addr - base:branches_addr - base + len(branches_blob)] = branches_blob
    image[repl_addr - base:repl_addr - base + len(repl)] = repl
    image[data_addr - base:data_addr - base + len(data)] = data

    names = (layout.META_SECTION, layout.SITES_SECTION, layout.BRANCHES_SECTION,
             layout.REPL_SECTION) if section_names else \
        (".rodata.a", ".rodata.b", ".rodata.c", ".rodata.d")
    sections = [
        (".text", 1, 0x6, text_addr, text_addr - base, len(text), 16),
        (names[0], 1, 0x2, meta_addr, meta_addr - base, len(meta_bytes), 4),
        (names[1], 1, 0x2, sites_addr, sites_addr - base, len(sites_blob), 4),
        (names[2], 1, 0x2, branches_addr, branches_addr - base, len(branches_blob), 4),
        (names[3], 1, 0x2, repl_addr, repl_addr - base, len(repl), 1),
        (".data", 1, 0x3, data_addr, data_addr - base, len(data), 8),
        (".bss", 8, 0x3, data_addr + len(data), len(image), bss_size, 8),
    ]
    symlist = list(fn_syms)
    symlist += [
        ("__linkfix_meta_start", meta_addr, 0),
        ("__linkfix_meta_end", meta_addr + len(meta_bytes), 0),
        ("__linkfix_sites_start", sites_addr, 0),
        ("__linkfix_sites_end", sites_addr + len(sites_blob), 0),
        ("__linkfix_branches_start", branches_addr, 0),
        ("__linkfix_branches_end", branches_addr + len(branches_blob), 0),
        ("__linkfix_repl_start", repl_addr, 0), ("__linkfix_repl_end", ro_end, 0),
        ("xen_vcpu_mask", env.var_x, 1), ("lguest_irq_enabled", env.var_y, 4),
        ("callee", callee, 0),
    ]
    symlist += [(f"__lf_dispatch_{ops[o].name}", a, 0) for o, a in dispatch.items()]
    segments = [
        (base, 0, text_addr - base + len(text), text_addr - base + len(text), 5),
        (ro_addr, ro_addr - base, ro_end - ro_addr, ro_end - ro_addr, 4),
        (data_addr, data_addr - base, len(data), len(data) + bss_size, 6),
    ]
    _finish_elf(image, bits, segments, sections, symlist, text_addr)
    with open(path, "wb") as f:
        f.write(image)
    os.chmod(path, 0o755)
    return Synth(path, bits, backends, ops, infos, env, (text_addr, text_addr + len(text)),
                 (data_addr, data_addr + len(data) + bss_size), segments)


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _finish_elf(image: bytearray, bits: int, segments: list, sections: list, symlist: list,
                entry: int) -> None:
    """Append .symtab/.strtab/.shstrtab and the section headers; write ELF and program headers."""
    w64 = bits == 64
    strtab = bytearray(b"\0")
    syms = bytearray()
    sym_fmt = struct.Struct("<IBBHQQ" if w64 else "<IIIBBH")
    syms += bytes(sym_fmt.size)
    text_index = 1
    for name, value, size in symlist:
        name_off = len(strtab)
        strtab += name.encode() + b"\0"
        shndx = _shndx_for(value, sections)
        info = (1 << 4) | (2 if name.startswith("fn_") or name.startswith("__lf") else 0)
        if w64:
            syms += sym_fmt.pack(name_off, info, 0, shndx or text_index, value, size)
        else:
            syms += sym_fmt.pack(name_off, value, size, info, 0, shndx or text_index)
    shstr = bytearray(b"\0")
    all_secs = list(sections) + [
        (".symtab", 2, 0, 0, 0, len(syms), 8),
        (".strtab", 3, 0, 0, 0, len(strtab), 1),
        (".shstrtab", 3, 0, 0, 0, 0, 1),
    ]
    sym_i = len(sections) + 1
    offs = []
    image.extend(bytes(-len(image) % 8))
    offs.append(len(image))
    image += syms
    offs.append(len(image))
    image += strtab
    name_offs = []
    for s in all_secs:
        name_offs.append(len(shstr))
        shstr += s[0].encode() + b"\0"
    offs.append(len(image))
    image += shstr
    image.extend(bytes(-len(image) % 8))
    shoff = len(image)
    sh_fmt = struct.Struct("<IIQQQQIIQQ" if w64 else "<IIIIIIIIII")
    image += bytes(sh_fmt.size)
    for i, (name, typ, flags, addr, off, size, align) in enumerate(all_secs):
        link = info = ent = 0
        if name == ".symtab":
            off, link, info, ent = offs[0], sym_i + 1, 1, sym_fmt.size
        elif name == ".strtab":
            off = offs[1]
        elif name == ".shstrtab":
            off, size = offs[2], len(shstr)
        image += sh_fmt.pack(name_offs[i], typ, flags, addr, off, size, link, info, align, ent)
    ph_fmt = struct.Struct("<IIQQQQQQ" if w64 else "<IIIIIIII")
    ehsize = 64 if w64 else 52
    phoff = ehsize
    for j, (vaddr, off, filesz, memsz, flags) in enumerate(segments):
        if w64:
            ph = ph_fmt.pack(1, flags, off, vaddr, vaddr, filesz, memsz, PAGE)
        else:
            ph = ph_fmt.pack(1, off, vaddr, vaddr, filesz, memsz, flags, PAGE)
        image[phoff + j * ph_fmt.size:phoff + (j + 1) * ph_fmt.size] = ph
    ident = b"\x7fELF" + bytes((2 if w64 else 1, 1, 1)) + bytes(9)
    if w64:
        hdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, shoff, 0, ehsize,
                                  ph_fmt.size, len(segments), sh_fmt.size, len(all_secs) + 1,
                                  len(all_secs))
    else:
        hdr = ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, entry, phoff, shoff, 0, ehsize,
                                  ph_fmt.size, len(segments), sh_fmt.size, len(all_secs) + 1,
                                  len(all_secs))
    image[:len(hdr)] = hdr


def _shndx_for(value: int, sections: list) -> int:
    for i, (_n, _t, _f, addr, _o, size, _a) in enumerate(sections):
        if addr <= value < addr + size or (value == addr + size and size):
            return i + 1
    return 0xFFF1  # SHN_ABS


# -- the gcc/ld path -------------------------------------------------------------------------

_ASM_BODY = {
    64: {
        "cli": "cli", "sti": "sti", "pushf_pop": "pushf; pop %rax",
        "gs_movb": "movb $1, %gs:xen_vcpu_mask",
        "rip_movl": "movl $0, lguest_irq_enabled(%rip)",
        "call": "call callee", "jz_in": "test %eax, %eax; jz 1f; cli; 1:",
        "jmp8_out": "jmp 2f; int3; 2:", "jz8_out": "test %eax, %eax; jz 2f; int3; 2:",
        "empty": "", "abs2": "movl $xen_vcpu_mask, lguest_irq_enabled",
        "rip_call": "movl $0, lguest_irq_enabled(%rip); call callee",
    },
    32: {
        "cli": "cli", "sti": "sti", "pushf_pop": "pushf; pop %eax",
        "gs_movb": "movb $1, %gs:xen_vcpu_mask",
        "rip_movl": "movl $0, lguest_irq_enabled",
        "call": "call callee", "jz_in": "test %eax, %eax; jz 1f; cli; 1:",
        "jmp8_out": "jmp 2f; int3; 2:", "jz8_out": "test %eax, %eax; jz 2f; int3; 2:",
        "empty": "", "abs2": "movl $xen_vcpu_mask, lguest_irq_enabled",
        "rip_call": "movl $0, lguest_irq_enabled; call callee",
    },
}


def _copy_lines(label: str, kind: str, bits: int, L: int, op_name: str,
                indirect_generic: bool) -> list[str]:
    """A stored copy in assembler: the body as GAS would write it, then its padding."""
    if kind == "generic":
        text, n = (("call *lf_ptr", 6) if indirect_generic else
                   (f"call __lf_dispatch_{op_name}", 5))
    else:
        text, n = _ASM_BODY[bits][kind], body_len(kind, bits)
    lines = [f"{label}:"] + [f"  {x.strip()}" for x in text.split(";") if x.strip()]
    fill = nop_fill(L - n)
    if fill:
        lines.append("  .byte " + ", ".join(str(x) for x in fill))
    return lines


def asm_source(site_ops: list[int], bits: int, ops: tuple[SynthOp, ...] = DEFAULT_OPS,
               backends: tuple[str, ...] = BACKENDS, indirect_generic: bool = False) -> str:
    """A GAS source with sites, records and stored copies written by hand per FORMAT.md.

    `indirect_generic` (i386 only) makes the generic alternative `call *lf_ptr`, an
    absolute address: linkfix refuses such a generic (it must be a direct call).
    """
    generic_len = 6 if indirect_generic else 5
    n_real = len(ops)
    nb = len(backends)
    meta = meta_for(bits, backends, ops, indirect_generic, symbolic=True)
    lines = [
        "# generated by tests/tools/synthimage.py",
        # Bounds of this object's own tables: the image has only these.
        '.section .linkfix.sites,"a"', ".balign 4", "lf_sites_start:",
        '.section .linkfix.branches,"a"', ".balign 4", "lf_branches_start:",
        '.section .linkfix.repl,"a"', "lf_repl_start:",
        '.section .linkfix.meta,"a"', ".balign 4",
        *layout.meta_asm_lines(meta, ("lf_sites_start", "lf_sites_end", "lf_branches_start",
                                      "lf_branches_end", "lf_repl_start", "lf_repl_end")),
        '.section .linkfix.repl,"a"',
    ]
    for j, op in enumerate(ops):
        L = site_len(op, bits, generic_len)
        lines += _copy_lines(f"lf_c_{j}_0", "generic", bits, L, op.name, indirect_generic)
        for k, b in enumerate(backends, start=1):
            if b in op.bodies:
                lines += _copy_lines(f"lf_c_{j}_{k}", op.bodies[b], bits, L, op.name, False)
    lines += ["lf_c_nop5:", "  .byte " + ", ".join(str(x) for x in nop_fill(5))]
    lines += [
        ".data", ".globl xen_vcpu_mask, lguest_irq_enabled",
        "xen_vcpu_mask: .quad 0", "lguest_irq_enabled: .quad 0",
        "lf_ptr: " + (".quad callee" if bits == 64 else ".long callee"),
        ".text", ".globl _start", "_start:", "  hlt",
        "callee:", "  mov $0x1234, %eax", "  ret",
    ]
    for op in ops:
        lines += [f".globl __lf_dispatch_{op.name}", f".type __lf_dispatch_{op.name},@function",
                  f"__lf_dispatch_{op.name}:", "  ret"]
    for b in range(1, nb + 1):
        lines += [f"lf_test_{b}:", "  nop", "  ret", f"lf_true_{b}:", "  nop", "  nop", "  ret"]
    for i, o in enumerate(site_ops):
        if i % 8 == 0:
            lines += [f".globl fn_{i // 8}", f".type fn_{i // 8},@function", f"fn_{i // 8}:"]
        if o < n_real:
            op = ops[o]
            L = site_len(op, bits, generic_len)
            lines.append("661: call *lf_ptr" if indirect_generic else
                         f"661: call __lf_dispatch_{op.name}")
            if L > generic_len:
                lines.append("  .byte " + ", ".join(str(x) for x in nop_fill(L - generic_len)))
            lines += ['.pushsection .linkfix.sites,"a"', ".balign 4", "  .long 661b - .",
                      f"  .short {o}", f"  .byte {L}, {layout.op_check(o)}", ".popsection"]
        else:
            b = o - n_real + 1
            # Always the rel32 form (as would relax a near jmp to rel8).
            lines.append(f"661: {{disp32}} jmp lf_test_{b}")
            lines += ['.pushsection .linkfix.branches,"a"', ".balign 4", "  .long 661b - .",
                      f"  .long lf_test_{b} - .", f"  .long lf_true_{b} - .",
                      f"  .short {o}", f"  .byte {b}, 1", f"  .long lf_test_{b} - .",
                      f"  .long lf_true_{b} - .", ".popsection"]
        lines.append("  nop")  # code between sites
    lines += ['.section .linkfix.sites,"a"', "lf_sites_end:",
              '.section .linkfix.branches,"a"', "lf_branches_end:",
              '.section .linkfix.repl,"a"', "lf_repl_end:"]
    return "\n".join(x for x in lines if x != "") + "\n"


LDSCRIPT = """
SECTIONS
{
  . = %(base)s + SIZEOF_HEADERS;
  .text : { *(.text .text.*) }
  . = ALIGN(0x1000);
  .rodata : { *(.rodata .rodata.*) }
  .linkfix.meta : { __linkfix_meta_start = .; KEEP(*(.linkfix.meta)) __linkfix_meta_end = .; }
  .linkfix.sites : ALIGN(4) { __linkfix_sites_start = .; KEEP(*(.linkfix.sites))
                              __linkfix_sites_end = .; }
  .linkfix.branches : ALIGN(4) { __linkfix_branches_start = .; KEEP(*(.linkfix.branches))
                                 __linkfix_branches_end = .; }
  .linkfix.repl : { __linkfix_repl_start = .; KEEP(*(.linkfix.repl)) __linkfix_repl_end = .; }
  . = ALIGN(0x1000);
  .data : { *(.data .data.*) }
  .bss : { *(.bss .bss.*) }
}
"""


def build_asm(path: str, workdir: str, site_ops: list[int], bits: int = 64, *,
              ops: tuple[SynthOp, ...] = DEFAULT_OPS, backends: tuple[str, ...] = BACKENDS,
              emit_relocs: bool = False, pie: bool = False, indirect_generic: bool = False,
              debug: bool = False) -> str:
    """Assemble and link a synthetic image with gcc and GNU ld; returns the path."""
    os.makedirs(workdir, exist_ok=True)
    src = os.path.join(workdir, "synth.S")
    obj = os.path.join(workdir, "synth.o")
    lds = os.path.join(workdir, "synth.lds")
    with open(src, "w") as f:
        f.write(asm_source(site_ops, bits, ops, backends, indirect_generic))
    with open(lds, "w") as f:
        f.write(LDSCRIPT % {"base": "0x400000" if bits == 64 else "0x8048000"})
    m = "-m64" if bits == 64 else "-m32"
    subprocess.run(["gcc", m, *(["-g"] if debug else []), "-c", src, "-o", obj], check=True,
                   capture_output=True, text=True)
    cmd = ["ld", "-m", "elf_x86_64" if bits == 64 else "elf_i386", "-T", lds, "-o", path, obj]
    if emit_relocs:
        cmd.insert(1, "--emit-relocs")
    if pie:
        # ld's default script for -pie (an ET_DYN at 0; the linkfix sections become
        # orphans placed by name, without the __linkfix_* symbols).
        cmd = [cmd[0], "-pie", "--no-dynamic-linker", "-z", "notext", *cmd[1:3], "-o", path, obj]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return path
