"""Regenerate the "Site sizes and clobbers" table of docs/SPEC.md from the sample specs.

    .venv/bin/python bench/site_table.py          # rewrite the table in docs/SPEC.md
    .venv/bin/python bench/site_table.py --check  # exit 1 if docs/SPEC.md is stale
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "SPEC.md"
SPECS = (ROOT / "sample_kernel/spec/x86_64.toml", ROOT / "sample_kernel/spec/i386.toml")
BEGIN = "<!-- site-table:begin (bench/site_table.py) -->"
END = "<!-- site-table:end -->"


def manifest(spec: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "linkfix", "gen-stubs", str(spec), "-o", out, "-q"],
                       check=True, cwd=ROOT)
        return json.loads((Path(out) / "linkfix.json").read_text())


def cell(body: dict | None) -> str:
    """The body, its length, where it runs and what its path executes."""
    if body is None:
        return "— (dispatch)"
    cost = f"{body['executed_insns']} insn, {body['executed_bytes']} B"
    if body["kind"] == "empty":
        return f"empty (0); {cost}"
    lines = (line.strip() for line in body["source"].splitlines())
    text = "; ".join(line for line in lines if line)
    where = {"ool": "out of line", "inline": "inline", "call": "call"}[body["placement"]]
    return f"`{text}` ({body['length']}); {where}, {cost}"


def table(m: dict) -> list[str]:
    backends = m["backends"]
    lines = [
        f"{m['arch']} (`{SPECS[0].parent.relative_to(ROOT)}/{m['arch']}.toml`):",
        "",
        "| op | args | returns | site bytes (budget) | site clobbers | "
        + " | ".join(backends) + " |",
        "|---|---|---|---|---|" + "---|" * len(backends),
    ]
    for op in m["ops"]:
        args = ", ".join(f"{a['type']} {a['name']} (%{a['reg']})" for a in op["args"]) or "—"
        clob = ", ".join(op["clobbers"]) or "none"
        cells = " | ".join(cell(op["bodies"].get(b)) for b in backends)
        lines.append(f"| {op['name']} | {args} | {op['returns'] or 'void'} | "
                     f"{op['site_size']} ({op['site_budget']}) | {clob} | {cells} |")
    return lines


def render() -> str:
    out = [BEGIN, ""]
    for spec in SPECS:
        out += table(manifest(spec)) + [""]
    out.append(END)
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"{DOC}: table markers missing", file=sys.stderr)
        return 1
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + render() + tail
    if args.check:
        return 0 if new == doc else 1
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
