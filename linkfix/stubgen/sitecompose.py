"""A site's whole assembler text, composed from the modules that own its parts.

sitetext.py writes the site and its record, kernelsite.py (linux profile) what
objtool and the kernel's alternatives see of it, and written.py the variant that
holds one backend's bytes as linked (gen-stubs --written).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from linkfix.stubgen import kernelsite, written
from linkfix.stubgen.opmodel import OpModel
from linkfix.stubgen.sitetext import branch_site_lines, op_site_lines, repl_lines
from linkfix.stubgen.spec import Spec


def site_text(spec: Spec, m: OpModel, uid: str, esc: Callable[[str], str]) -> list[str]:
    """An op site's assembler lines: sitetext.py's, then kernelsite.py's (linux). A
    written site (written.py) holds its backend's bytes, in as many lines."""
    lines = op_site_lines(m, uid, esc)
    if spec.profile.linux:
        lines += kernelsite.op_site_lines(replace(spec, profile=replace(
            spec.profile, written=None)), m, uid)
    if spec.profile.written is None:
        return lines
    alt = written.held(spec, m)
    held = None if alt is None else repl_lines(f".Llf_s_{uid}", alt.code, alt.fields,
                                               spec.arch.word)
    mine = op_site_lines(m, uid, esc, held)
    if spec.profile.linux:
        mine += kernelsite.op_site_lines(spec, m, uid)
    return written.pad_lines(spec, mine, len(lines), f"op '{m.op.name}'")


def branch_text(spec: Spec, k: int) -> list[str]:
    """A branch site's assembler lines, as site_text() composes an op site's."""
    plain = replace(spec, profile=replace(spec.profile, written=None))
    lines = branch_site_lines(spec, k)
    if spec.profile.linux:
        lines += kernelsite.branch_site_lines(plain)
    if spec.profile.written is None:
        return lines
    mine = branch_site_lines(spec, k, written.branch_bytes(spec, k), written=True)
    if spec.profile.linux:
        mine += kernelsite.branch_site_lines(spec)
    return written.pad_lines(spec, mine, len(lines), f"branch site of backend {k}")
