"""`linkfix patch`: splice the selected alternative into every site of a linked image.

The output is the input's bytes with only the sites, the state record in
`.linkfix.meta` and (for `ld --emit-relocs` images) the relocation slots the
sites own changed; it is written atomically with the input's mode, after every
record has been validated and every site computed. See docs/PATCH.md.
"""

from __future__ import annotations

import os
import sys

from linkfix import layout, progress
from linkfix.errors import BadInput
from linkfix.fileio import write_patched_copy
from linkfix.postlink import image, recognise, relocs, report, selection, tables
from linkfix.postlink.splice import Splicer


def op_state(t: tables.Tables, chk: tables.Checked, per_op: tuple[int, ...],
             eff: dict[int, int]) -> list[int]:
    """Alternative in place at every site of each op (the request when it has no sites)."""
    state = list(per_op)
    for op, k in eff.items():
        state[op] = k
    return state


def run(args) -> int:  # noqa: ANN001 - argparse namespace
    src = args.image
    dst = src if args.in_place else args.output
    if not args.in_place and _same_file(src, dst):
        raise BadInput(src, "output is the input; use --in-place to patch it in place")
    try:
        mode = os.stat(src).st_mode
    except OSError as exc:
        raise BadInput(src, f"cannot read: {exc.strerror}") from None
    if progress.verbose(args):
        print(progress.command_line())
    img = image.load(src)
    t = tables.load(img)
    sel = selection.resolve(t.meta, args.target, args.op, args.policy, src)
    chk = tables.check_records(t)
    warnings = selection.check_explicit(sel, t.meta, chk.present_by_op(), src,
                             getattr(args, "strict", False))
    sp = Splicer(t, chk)
    now = selection.from_state(t.meta)
    result: dict[str, object] = {}

    def edit(out) -> None:  # noqa: ANN001 - the output's writable mapping
        # Every site must hold what the state record says before it is rewritten
        # (checked in the same pass; a refusal discards the copy).
        try:
            eff = sp.apply(out, sel.per_op, current=now.per_op)
        except recognise.NotRecognised as e:
            raise recognise.refusal(t, sp, e, "state record") from None
        result["relocs"] = relocs.update(sp, eff, out, now.per_op)
        state = op_state(t, chk, sel.per_op, eff)
        state_at = t.meta_region.offset + layout.STATE_OFFSET
        out[state_at:state_at + 4 + len(state)] = layout.encode_state(
            sel.target, 1, state, t.meta.names_check())
        result["eff"] = eff

    write_patched_copy(src, dst, mode, edit)
    n_relocs = result["relocs"]
    eff = result["eff"]
    for line in warnings:
        print(line, file=sys.stderr)
    progress.finish(args, "LINKFIX", dst, lambda: [
        f"  target {t.alt_name(sel.target)} ({sel.source}); "
        f"{n_relocs} relocation slot(s) rewritten", *report.op_stats(t, chk, eff)])
    sys.stdout.flush()
    return 0


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
