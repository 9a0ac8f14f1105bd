"""Verbose statistics of patch and verify: how many sites of each op got which alternative."""

from __future__ import annotations

from collections import Counter

from linkfix.postlink.tables import Checked, Tables
from linkfix.progress import plural


def op_stats(t: Tables, chk: Checked, eff: dict[int, int]) -> list[str]:
    """One line per op with sites: how many sites got which alternative, and the bytes."""
    per: dict[int, Counter[int]] = {}
    size: Counter[int] = Counter()
    for op, count in chk.shape_counts().items():
        sh = chk.shapes[op]
        per.setdefault(op, Counter())[eff.get(op, 0)] += count
        size[op] += sh.site_len * count
    lines = []
    for op in sorted(per):
        alts = ", ".join(f"{t.alt_name(k)} {n}" for k, n in sorted(per[op].items()))
        lines.append(f"  {t.op_name(op)}: {plural(sum(per[op].values()), 'site')} ({alts}); "
                     f"{size[op]} bytes")
    lines.append(f"  total: {plural(t.n_sites, 'site')}")
    return lines
