"""`linkfix inspect`: every site, where it is, what it holds, and what it could hold.

For each site: address, symbol+offset (.symtab), file:line (DWARF, when the
image has it: where the site's inline function was called, else the line
program's row), op, size, current state (the alternative whose spliced bytes
the site holds now, or "unknown/corrupt") and every
alternative disassembled as it would sit at the site. Then a summary per op
and backend. Output is sorted by address and fully deterministic.
"""

from __future__ import annotations

import bisect
import io
import json
import mmap
import sys
from dataclasses import dataclass

from linkfix import fixups, image, layout, tables
from linkfix.errors import BadInput
from linkfix.splice import Splicer

SHF_COMPRESSED = 0x800
ELFCOMPRESS_ZSTD = 2  # pyelftools reads zlib (type 1) only
_CONSTANT_FORMS = frozenset({"DW_FORM_data1", "DW_FORM_data2", "DW_FORM_data4", "DW_FORM_data8",
                             "DW_FORM_udata", "DW_FORM_sdata", "DW_FORM_implicit_const"})

Where = tuple[str, int]  # file name, line


@dataclass
class LineTable:
    """Address -> (file, line) from DWARF line programs, looked up with bisect."""

    addrs: list[int]
    rows: list[Where | None]  # None marks the end of a sequence
    cus: list[int]  # the compilation unit (index) of each row

    def find(self, addr: int) -> tuple[int, Where] | None:
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0 or self.rows[i] is None:
            return None
        return self.cus[i], self.rows[i]  # type: ignore[return-value]

    def lookup(self, addr: int) -> str | None:
        found = self.find(addr)
        return None if found is None else f"{found[1][0]}:{found[1][1]}"


@dataclass(frozen=True)
class InlineCall:
    """An inlined instance of a site's function: where it was called from."""

    ranges: tuple[tuple[int, int], ...]
    depth: int  # nesting depth in the DIE tree: the deepest containing instance is innermost
    call: Where


def site_functions(meta: layout.Meta) -> frozenset[str]:
    """Names of linkfix.h's always-inline functions holding the sites (the op's own
    name; linkfix__backend_is_B for `backend_is(B)`): the line of a site is where
    one of them was called, not the asm statement inside the header."""
    names = set()
    for op in meta.ops:
        if op.startswith("backend_is(") and op.endswith(")"):
            names.add(f"linkfix__backend_is_{op[len('backend_is('):-1]}")
        else:
            names.add(op)
    return frozenset(names)


def site_lines(img: image.Image, addrs: list[int], functions: frozenset[str]
               ) -> dict[int, str]:
    """`file:line` of every site address DWARF knows: the call of the site's inline
    function when the site came from linkfix.h, else the line program's row (a site
    written in assembly)."""
    if img.section(".debug_line") is None:
        return {}
    if _zstd_compressed(img):
        from linkfix.cli import one_line

        print(one_line(f"linkfix: {img.path}: note: debug sections are zstd-compressed; "
                       f"source lines omitted"), file=sys.stderr)
        return {}
    from elftools.elf.elffile import ELFFile

    try:
        # A linked image's DWARF holds final addresses; its .rel[a].debug_* (kept by
        # ld --emit-relocs) must not be applied a second time.
        dwarf = ELFFile(_stream(img.data)).get_dwarf_info(relocate_dwarf_sections=False)
        cus = list(dwarf.iter_CUs())
        table, files = _line_table(dwarf, cus)
        found = {a: table.find(a) for a in addrs}
        wanted = sorted({f[0] for f in found.values() if f is not None})
        calls = {n: _inline_calls(dwarf, cus[n], files[n], functions) for n in wanted}
    except Exception as exc:  # noqa: BLE001 - pyelftools raises many types on bad DWARF
        raise BadInput(img.path, f"unreadable DWARF line information: {exc}") from None
    out = {}
    for a, f in found.items():
        if f is None:
            continue
        inner = [c for c in calls[f[0]] if any(lo <= a < hi for lo, hi in c.ranges)]
        name, line = max(inner, key=lambda c: c.depth).call if inner else f[1]
        out[a] = f"{name}:{line}"
    return out


def _stream(data: bytes | mmap.mmap) -> io.BufferedIOBase | mmap.mmap:
    """A file-like view of the image for pyelftools: a mapped image reads as it is
    (a copy of a kernel with its DWARF would cost as much memory again)."""
    return data if isinstance(data, mmap.mmap) else io.BytesIO(data)


def _zstd_compressed(img: image.Image) -> bool:
    for sec in img.sections:
        if sec.name.startswith(".debug_") and sec.flags & SHF_COMPRESSED and sec.size >= 4:
            head = img.data[sec.offset:sec.offset + 4]
            if len(head) == 4 and int.from_bytes(head, "little") == ELFCOMPRESS_ZSTD:
                return True
    return False


def _file_name(files: list, index: int, base: int) -> str:
    i = index - base
    return files[i].name.decode("utf-8", "replace") if 0 <= i < len(files) else "?"


def _line_table(dwarf, cus: list) -> tuple[LineTable, list[tuple[list, int]]]:  # noqa: ANN001
    """Every CU's line program rows, and its file table (with the index base: 1
    before DWARF 5, 0 from 5 on)."""
    rows: list[tuple[int, int, Where | None]] = []
    files: list[tuple[list, int]] = []
    for n, cu in enumerate(cus):
        prog = dwarf.line_program_for_CU(cu)
        if prog is None:
            files.append(([], 1))
            continue
        entries = prog.header["file_entry"]
        base = 0 if prog.header["version"] >= 5 else 1
        files.append((entries, base))
        for entry in prog.get_entries():
            st = entry.state
            if st is None:
                continue
            if st.end_sequence:
                rows.append((st.address, n, None))
                continue
            rows.append((st.address, n, (_file_name(entries, st.file, base), st.line)))
    rows.sort(key=lambda r: (r[0], r[2] is not None, r[1]))
    return (LineTable([r[0] for r in rows], [r[2] for r in rows], [r[1] for r in rows]),
            files)


def _inline_calls(dwarf, cu, files: tuple[list, int],  # noqa: ANN001
                  functions: frozenset[str]) -> list[InlineCall]:
    """Inlined instances of the site functions in `cu`, with their call sites."""
    top = cu.get_top_DIE()
    low = top.attributes.get("DW_AT_low_pc")
    cu_base = low.value if low is not None else 0
    out: list[InlineCall] = []
    stack = [(top, 0)]
    while stack:
        die, depth = stack.pop()
        if die.tag == "DW_TAG_inlined_subroutine":
            call = _site_call(die, files, functions)
            if call is not None:
                out.append(InlineCall(_die_ranges(dwarf, cu, die, cu_base), depth, call))
        stack.extend((child, depth + 1) for child in die.iter_children())
    return out


def _site_call(die, files: tuple[list, int], functions: frozenset[str]  # noqa: ANN001
               ) -> Where | None:
    attrs = die.attributes
    if "DW_AT_abstract_origin" not in attrs or "DW_AT_call_line" not in attrs:
        return None
    origin = die.get_DIE_from_attribute("DW_AT_abstract_origin")
    name = origin.attributes.get("DW_AT_name")
    if name is None or name.value.decode("utf-8", "replace") not in functions:
        return None
    index = attrs["DW_AT_call_file"].value if "DW_AT_call_file" in attrs else files[1]
    return _file_name(files[0], index, files[1]), attrs["DW_AT_call_line"].value


def _die_ranges(dwarf, cu, die, cu_base: int) -> tuple[tuple[int, int], ...]:  # noqa: ANN001
    """The address ranges of `die`: low_pc/high_pc or DW_AT_ranges."""
    attrs = die.attributes
    if "DW_AT_low_pc" in attrs and "DW_AT_high_pc" in attrs:
        lo = attrs["DW_AT_low_pc"].value
        high = attrs["DW_AT_high_pc"]
        return ((lo, lo + high.value if high.form in _CONSTANT_FORMS else high.value),)
    if "DW_AT_ranges" not in attrs:
        return ()
    lists = dwarf.range_lists()
    if lists is None:
        return ()
    base = cu_base
    out = []
    for entry in lists.get_range_list_at_offset(attrs["DW_AT_ranges"].value, cu=cu):
        if hasattr(entry, "base_address"):
            base = entry.base_address
        elif entry.is_absolute:
            out.append((entry.begin_offset, entry.end_offset))
        else:
            out.append((base + entry.begin_offset, base + entry.end_offset))
    return tuple(out)


def collect(path: str) -> dict:
    img = image.load(path)
    t = tables.load(img)
    chk = tables.check_records(t)
    sp = Splicer(t, chk)
    bits = img.bits
    order = sorted(range(t.n_sites), key=chk.site_addrs.__getitem__)
    lines = site_lines(img, list(chk.site_addrs), site_functions(t.meta))
    sites = []
    summary: dict[str, dict] = {}
    for i in order:
        s = chk.site_addrs[i]
        sh = sp.shape_of(i)
        L = sh.site_len
        off = img.offset_of(s, L)
        assert off is not None
        current = img.data[off:off + L]
        alts = {}
        matches = []
        op = t.op_name(sh.op)
        per_op = summary.setdefault(op, {"sites": 0, "bytes": 0, "padding": {}})
        per_op["sites"] += 1
        per_op["bytes"] += L
        for k, alt in enumerate(sh.alts):
            name = t.alt_name(k)
            if not alt.present:
                alts[name] = None
                continue
            try:
                want, body_len = sp.placed(i, k)
            except BadInput as exc:
                alts[name] = {"error": exc.message.split(": ", 1)[-1]}
                continue
            if want == current:
                matches.append(name)
            alts[name] = {
                "body_len": body_len,
                "bytes": want.hex(),
                "asm": fixups.disassemble(want, bits, s),
            }
            per_op["padding"][name] = per_op["padding"].get(name, 0) + L - body_len
        sites.append({
            "address": f"{s:#x}",
            "symbol": img.symbolize(s),
            "line": lines.get(s),
            "op": op,
            "kind": "branch" if sh.kind == layout.KIND_BRANCH else "op",
            "size": L,
            "bytes": current.hex(),
            "state": _state(t, sh, matches),
            "matches": matches,
            "alternatives": alts,
        })
    meta = t.meta
    summary = {op: summary[op] for op in meta.ops if op in summary}
    backends: dict[str, dict[str, int]] = {}
    for s_op in summary.values():
        for name, n in s_op["padding"].items():
            b = backends.setdefault(name, {"padding": 0})
            b["padding"] += n
    return {
        "image": path,
        "machine": "x86_64" if img.machine == image.EM_X86_64 else "i386",
        "backends": list(meta.backends),
        "patched": bool(meta.patched),
        "target": t.alt_name(meta.target),
        "op_state": {op: t.alt_name(k) for op, k in zip(meta.ops, meta.op_state, strict=True)},
        "sites": sites,
        "summary": summary,
        "backend_summary": backends,
    }


def _state(t: tables.Tables, sh: tables.Shape, matches: list[str]) -> str:
    """The alternative the site holds; when several have the same bytes (two empty
    bodies), the one the state record names."""
    if not matches:
        return "unknown/corrupt"
    recorded = t.meta.op_state[sh.op] if t.meta.op_state else 0
    name = t.alt_name(recorded if sh.alts[recorded].present else 0)
    return name if name in matches else matches[0]


def _text(doc: dict) -> str:
    out = [f"{doc['image']}: {doc['machine']}, {len(doc['sites'])} sites, "
           f"backends {', '.join(doc['backends'])}; "
           + (f"patched for {doc['target']}" if doc["patched"] else "not patched")]
    for site in doc["sites"]:
        where = " ".join(x for x in (site["symbol"], site["line"]) if x)
        out.append(f"{site['address']}  {site['op']}  {site['size']} bytes  "
                   f"[{site['state']}]" + (f"  {where}" if where else ""))
        for name, alt in site["alternatives"].items():
            if alt is None:
                out.append(f"    {name:<10} (no body)")
            elif "error" in alt:
                out.append(f"    {name:<10} (cannot be placed: {alt['error']})")
            else:
                mark = "*" if name in site["matches"] else " "
                out.append(f"  {mark} {name:<10} " + "; ".join(alt["asm"]))
    out.append("summary:")
    for op, s in doc["summary"].items():
        pads = ", ".join(f"{b} {n}" for b, n in s["padding"].items())
        out.append(f"  {op}: {s['sites']} sites, {s['bytes']} bytes; padding: {pads}")
    for name, b in doc["backend_summary"].items():
        out.append(f"  all ops for {name}: {b['padding']} padding bytes")
    return "\n".join(out)


def run(args) -> int:  # noqa: ANN001 - argparse namespace
    doc = collect(args.image)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(_text(doc))
    return 0
