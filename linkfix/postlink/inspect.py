"""`linkfix inspect`: every site, where it is, what it holds, and what it could hold.

For each site: address, symbol+offset (.symtab), file:line (DWARF, when the
image has it: where the site's inline function was called, else the line
program's row), op, size, current state (the alternative whose spliced bytes
the site holds now, or "unknown/corrupt") and every alternative disassembled
as it would sit at the site. Then a summary per op and backend. Output is
sorted by address, deterministic, and streamed: text, one JSON document
(`--json`) or JSON Lines (`--jsonl`); `--summary` prints the totals only;
`--site` and `--op` choose the sites.

The parts: inspect_sites.py (validation, filters, every alternative's bytes
from the splicer patch uses), inspect_disasm.py (one capstone decode per
distinct layout of bytes), inspect_out.py (the formats, the output file),
inspect_dwarf.py (source lines).
"""

from __future__ import annotations

from linkfix.postlink import inspect_sites
from linkfix.postlink.inspect_dwarf import site_functions, site_lines
from linkfix.postlink.inspect_out import WRITERS, Sink
from linkfix.postlink.inspect_sites import Listing

__all__ = ["collect", "run", "site_functions", "site_lines"]


def collect(path: str) -> Listing:
    """The image read and validated; every site listed (until filters choose)."""
    return inspect_sites.load(path)


def run(args) -> int:  # noqa: ANN001 - argparse namespace
    lst = collect(args.image)
    inspect_sites.select(lst, args.site, args.op)
    # Every check that can refuse the input happens before the first line is printed.
    inspect_sites.compute(lst, lines=not args.summary)
    form = "jsonl" if args.jsonl else "json" if args.json else "text"
    with Sink(args.output, args.image) as out:
        WRITERS[form](lst, out, args.summary)
    return 0
