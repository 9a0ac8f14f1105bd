"""Merge the result of a partial run into docs/BENCHMARKS.md (`bench/run.py --only P --merge`).

bench/report.py renders the whole file from one run. A merge takes the file a
partial run renders and, for each part that ran, replaces in the existing file

* the part's section (by its heading's number, OWNED),
* its rows in the summary table and its "Targets missed" bullets (by how their
  text begins, OWNED), kept where the old ones were,
* its block at the end of the command list (`# merged in later by CMD:`),

and adds a line under the title for each section saying it came later, from
which command. Everything else (the other sections, the machine, the chart) stays as
the run that wrote the file left it. A row of a part that ran which that run no
longer produces is dropped with the others of its part.
"""

from __future__ import annotations

from common import BenchError

# part -> (its section's heading prefix, how its summary rows and bullets begin)
OWNED: dict[str, tuple[str, tuple[str, ...]]] = {
    "ring0": ("## 1. ", ("Ring 0",)),
    "sites": ("## 2. ", ("User space",)),
    "pressure": ("## 3. ", ("Register pressure",)),
    "postlink": ("## 4. ", ("`linkfix patch`", "`linkfix inspect")),
    "padding": ("## 5. ", ()),
    "tables": ("## 6. ", ("Site record bytes",)),
    "genstubs": ("## 7. ", ("gen-stubs",)),
}
SUMMARY = "## Summary"
COMMANDS = "## Commands"
MISSED = "Targets missed, by how much and why:"
NOTE = "Merged in later: section "
BLOCK = "# merged in later by "


def _split(text: str) -> tuple[list[str], list[list[str]]]:
    """The lines before the first section, and each section (heading first)."""
    head: list[str] = []
    sections: list[list[str]] = []
    for line in text.rstrip("\n").split("\n"):
        if line.startswith("## "):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
        else:
            head.append(line)
    return head, sections


def _trimmed(section: list[str]) -> list[str]:
    """`section` ending in exactly one blank line."""
    end = len(section)
    while end and section[end - 1] == "":
        end -= 1
    return [*section[:end], ""]


def _find(sections: list[list[str]], prefix: str) -> int | None:
    return next((i for i, s in enumerate(sections) if s[0].startswith(prefix)), None)


def _owned(line: str, prefixes: tuple[str, ...]) -> bool:
    return any(line.startswith(f"| {p}") or line.startswith(f"* {p}") for p in prefixes)


def _replace_lines(old: list[str], new: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """`old` without its lines owned by `prefixes`, the owned lines of `new` where the
    first owned old line was (else at the end)."""
    kept = [line for line in old if not _owned(line, prefixes)]
    at = next((i for i, line in enumerate(old) if _owned(line, prefixes)), None)
    if at is None:
        return kept + new
    at -= sum(1 for line in old[:at] if _owned(line, prefixes))
    return kept[:at] + new + kept[at:]


def _summary(old: list[str], new: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """The summary section with the rows and bullets of `prefixes` taken from `new`."""
    def parts(sec: list[str]) -> tuple[list[str], list[str], list[str]]:
        table = [line for line in sec if line.startswith("| ")]
        bullets = [line for line in sec if line.startswith("* ")]
        return table[:2], table[2:], bullets

    head, rows, bullets = parts(old)
    _h, new_rows, new_bullets = parts(new)
    rows = _replace_lines(rows, [r for r in new_rows if _owned(r, prefixes)], prefixes)
    bullets = _replace_lines(bullets, [b for b in new_bullets if _owned(b, prefixes)],
                             prefixes)
    out = [SUMMARY, "", *head, *rows, ""]
    return out + ([MISSED, "", *bullets, ""] if bullets else [])


def _commands(old: list[str], new: list[str], command: str, live: set[str]) -> list[str]:
    """The command list with this command's block (replacing an earlier one of it), and
    without the blocks of commands no section comes from any more (not in `live`)."""
    fence = [i for i, line in enumerate(old) if line == "```"]
    if len(fence) < 2:
        raise BenchError("the command list of the existing BENCHMARKS.md is not fenced")
    body, out, skip = old[fence[0] + 1:fence[-1]], [], False
    for line in body:
        if line.startswith(BLOCK):
            cmd = line.removeprefix(BLOCK).removesuffix(":")
            skip = cmd == command or cmd not in live
        if not skip:
            out.append(line)
    new_fence = [i for i, line in enumerate(new) if line == "```"]
    added = new[new_fence[0] + 1:new_fence[-1]] if len(new_fence) >= 2 else []
    added = [line for line in added if not line.startswith(BLOCK)]
    return [*old[:fence[0] + 1], *out, f"{BLOCK}{command}:", *added, *old[fence[-1]:]]


def merge(old_text: str, new_text: str, parts: tuple[str, ...], command: str) -> str:
    """`old_text` with the sections, summary rows and commands of `parts` from `new_text`."""
    head, sections = _split(old_text)
    _new_head, new_sections = _split(new_text)
    prefixes = tuple(p for part in parts for p in OWNED[part][1])
    headings = []
    for part in parts:
        prefix = OWNED[part][0]
        j = _find(new_sections, prefix)
        if j is None:
            raise BenchError(f"the report has no section {prefix.strip()} for {part}")
        section = _trimmed(new_sections[j])
        headings.append(section[0].removeprefix("## "))
        i = _find(sections, prefix)
        if i is None:
            i = _find(sections, COMMANDS)
            sections.insert(len(sections) if i is None else i, section)
        else:
            sections[i] = section
    notes = [line for line in head if line.startswith(NOTE) and not any(
        line.startswith(f"{NOTE}{h}, by ") for h in headings)]
    notes += [f"{NOTE}{h}, by `{command}`." for h in headings]
    live = {n.rsplit(", by `", 1)[-1].removesuffix("`.") for n in notes}
    for name, fn in ((SUMMARY, lambda o, n: _summary(o, n, prefixes)),
                     (COMMANDS, lambda o, n: _commands(o, n, command, live))):
        i, j = _find(sections, name), _find(new_sections, name)
        if i is None or j is None:
            raise BenchError(f"no {name} in the existing BENCHMARKS.md or the report")
        sections[i] = _trimmed(fn(sections[i], new_sections[j]))
    rest: list[str] = []
    for line in head:  # the title lines, without the notes and the blank line after them
        if not line.startswith(NOTE) and not (line == "" and rest and rest[-1] == ""):
            rest.append(line)
    at = next((i for i, line in enumerate(rest) if line.startswith("![")), len(rest))
    lines = [*rest[:at], *notes, "", *rest[at:]]
    for s in sections:  # untouched ones verbatim
        lines += s
    return "\n".join(lines).rstrip() + "\n"
