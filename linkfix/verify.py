"""`linkfix verify`: does every site hold exactly what the selection implies?

The expected bytes come from the same splicing code `linkfix patch` uses,
applied to a copy of the image. Without selection options the selection is
the image's own state record (`target`/`op_state`, docs/FORMAT.md): an image
as linked must hold the generic call at every site, a patched one what the
last `linkfix patch` wrote.
"""

from __future__ import annotations

import sys

from linkfix import image, recognise, report, selection, tables
from linkfix.errors import VerifyMismatch
from linkfix.splice import Splicer, effective


def run(args) -> int:  # noqa: ANN001 - argparse namespace
    path = args.image
    if report.verbose(args):
        print(report.command_line())
    img = image.load(path)
    t = tables.load(img)
    if selection.has_selection(args):
        sel = selection.resolve(t.meta, args.target, args.op, args.policy, path,
                                base=selection.from_state(t.meta))
    else:
        sel = selection.from_state(t.meta)
    chk = tables.check_records(t)
    warnings = selection.check_explicit(sel, t.meta, chk.present_by_op(), path,
                             getattr(args, "strict", False))
    sp = Splicer(t, chk)
    expected = bytearray(img.data)
    eff = sp.apply(expected, sel.per_op)
    if not recognise.same_sites(sp, expected, img.data):
        bad = 0
        for i, s in enumerate(chk.site_addrs):
            sh = sp.shape_of(i)
            off = img.offset_of(s, sh.site_len)
            assert off is not None
            want = expected[off:off + sh.site_len]
            got = img.data[off:off + sh.site_len]
            if want != got:
                bad += 1
                k = effective(sh, sel.per_op[sh.op])
                print(f"linkfix: {path}: site {s:#x} ({t.op_name(sh.op)}): expected "
                      f"{t.alt_name(k)} {bytes(want).hex()}, found {got.hex()}", file=sys.stderr)
        raise VerifyMismatch(path, f"{bad} of {report.plural(t.n_sites, 'site')} differ from "
                                   "the selection "
                                   f"({sel.source}: {t.alt_name(sel.target)})")
    for line in warnings:
        print(line, file=sys.stderr)
    report.finish(args, "VERIFY", path, lambda: [
        f"  selection {t.alt_name(sel.target)} ({sel.source}): "
        f"{'the site matches' if t.n_sites == 1 else f'all {t.n_sites} sites match'}",
        *report.op_stats(t, chk, eff)])
    return 0
