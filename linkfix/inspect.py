"""`linkfix inspect`: every site, where it is, what it holds, and what it could hold.

For each site: address, symbol+offset (.symtab), file:line (DWARF line
programs, when the image has them), op, size, current state (the alternative
whose spliced bytes the site holds now, or "unknown/corrupt") and every
alternative disassembled as it would sit at the site. Then a summary per op
and backend. Output is sorted by address and fully deterministic.
"""

from __future__ import annotations

import bisect
import io
import json
from dataclasses import dataclass

from linkfix import fixups, image, layout, tables
from linkfix.errors import BadInput
from linkfix.splice import Splicer


@dataclass
class LineTable:
    """Address -> (file, line) from DWARF line programs, looked up with bisect."""

    addrs: list[int]
    rows: list[tuple[str, int] | None]  # None marks the end of a sequence

    def lookup(self, addr: int) -> str | None:
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0 or self.rows[i] is None:
            return None
        name, line = self.rows[i]  # type: ignore[misc]
        return f"{name}:{line}"


def line_table(img: image.Image) -> LineTable | None:
    if img.section(".debug_line") is None:
        return None
    from elftools.elf.elffile import ELFFile

    try:
        dwarf = ELFFile(io.BytesIO(img.data)).get_dwarf_info()
        rows: list[tuple[int, int, tuple[str, int] | None]] = []
        for n, cu in enumerate(dwarf.iter_CUs()):
            prog = dwarf.line_program_for_CU(cu)
            if prog is None:
                continue
            files = prog.header["file_entry"]
            base = 0 if prog.header["version"] >= 5 else 1
            for entry in prog.get_entries():
                st = entry.state
                if st is None:
                    continue
                if st.end_sequence:
                    rows.append((st.address, n, None))
                    continue
                idx = st.file - base
                name = files[idx].name.decode("utf-8", "replace") \
                    if 0 <= idx < len(files) else "?"
                rows.append((st.address, n, (name, st.line)))
    except Exception as exc:  # noqa: BLE001 - pyelftools raises many types on bad DWARF
        raise BadInput(img.path, f"unreadable DWARF line information: {exc}") from None
    rows.sort(key=lambda r: (r[0], r[2] is not None, r[1]))
    return LineTable([r[0] for r in rows], [r[2] for r in rows])


def collect(path: str) -> dict:
    img = image.load(path)
    t = tables.load(img)
    chk = tables.check_records(t)
    sp = Splicer(t, chk)
    lines = line_table(img)
    bits = img.bits
    order = sorted(range(t.n_sites), key=chk.site_addrs.__getitem__)
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
            "line": lines.lookup(s) if lines else None,
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
