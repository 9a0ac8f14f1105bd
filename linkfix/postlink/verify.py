"""`linkfix verify`: does every site hold exactly what the selection implies?

The expected bytes come from the same splicing code `linkfix patch` uses,
applied to a buffer holding the image's bytes over the sites' span (an
anonymous mapping: no copy of the whole image, and no per-site objects beyond
what `patch` holds). Without selection options the selection is the image's
own state record (`target`/`op_state`, docs/FORMAT.md): an image as linked
must hold the generic call at every site, a patched one what the last
`linkfix patch` wrote. Each differing site is one stderr line, streamed.
"""

from __future__ import annotations

import mmap
import operator
import sys

from linkfix import progress
from linkfix.errors import VerifyMismatch
from linkfix.postlink import image, recognise, report, selection, tables
from linkfix.postlink.splice import Splicer, effective

_CHUNK = 1 << 24
_BATCH = 4096  # mismatch lines per write


def run(args) -> int:  # noqa: ANN001 - argparse namespace
    path = args.image
    if progress.verbose(args):
        print(progress.command_line())
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
    expected = _span_copy(img, t, chk)
    try:
        eff = sp.apply(expected, sel.per_op)
        if not recognise.same_sites(sp, expected, img.data):
            bad = _report_mismatches(t, sp, expected, sel.per_op)
            raise VerifyMismatch(path, f"{bad} of {progress.plural(t.n_sites, 'site')} differ "
                                       "from the selection "
                                       f"({sel.source}: {t.alt_name(sel.target)})")
    finally:
        expected.close()
    for line in warnings:
        print(line, file=sys.stderr)
    progress.finish(args, "VERIFY", path, lambda: [
        f"  selection {t.alt_name(sel.target)} ({sel.source}): "
        f"{'the site matches' if t.n_sites == 1 else f'all {t.n_sites} sites match'}",
        *report.op_stats(t, chk, eff)])
    return 0


def _site_offsets(t: tables.Tables, chk: tables.Checked) -> tuple[list[int] | None, bytes]:
    """Every site's length by record, and its file offset when the sites lie in
    several segments (else None: one subtraction maps them all)."""
    lens = chk.site_lens
    if chk.exec_seg is not None:
        return None, lens
    img = t.image
    offs = [img.offset_of(s, n) for s, n in zip(chk.site_addrs, lens, strict=True)]
    assert all(o is not None for o in offs)  # validated by check_records
    return offs, lens  # type: ignore[return-value]


def _span_copy(img: image.Image, t: tables.Tables, chk: tables.Checked) -> mmap.mmap:
    """A buffer the image's size holding the image's bytes from the first site to the
    end of the last: what `apply` writes the expected sites into and `same_sites`
    compares. The rest is never read, so it is not copied (an anonymous mapping's
    untouched pages cost no memory)."""
    buf = mmap.mmap(-1, max(1, len(img.data)))
    sites = chk.site_addrs
    if not sites:
        return buf
    offs, lens = _site_offsets(t, chk)
    seg = chk.exec_seg
    if offs is None:
        assert seg is not None
        d = seg.vaddr - seg.offset
        lo, hi = min(sites) - d, max(map(operator.add, sites, lens)) - d
    else:
        lo, hi = min(offs), max(map(operator.add, offs, lens))
    src = memoryview(img.data)
    try:
        for at in range(lo, hi, _CHUNK):
            end = min(hi, at + _CHUNK)
            buf[at:end] = src[at:end]
    finally:
        src.release()
    return buf


def _report_mismatches(t: tables.Tables, sp: Splicer, expected: mmap.mmap,
                       per_op: tuple[int, ...]) -> int:
    """Print one stderr line per site that differs (written in batches); their number."""
    chk, img = sp.chk, sp.img
    path = img.path
    offs, lens = _site_offsets(t, chk)
    seg = chk.exec_seg
    d = seg.vaddr - seg.offset if seg is not None else 0
    src = img.data
    bad = 0
    batch: list[str] = []
    for i, (s, n) in enumerate(zip(chk.site_addrs, lens, strict=True)):
        off = s - d if offs is None else offs[i]
        want = expected[off:off + n]
        got = src[off:off + n]
        if want != got:
            bad += 1
            sh = sp.shape_of(i)
            k = effective(sh, per_op[sh.op])
            batch.append(f"linkfix: {path}: site {s:#x} ({t.op_name(sh.op)}): expected "
                         f"{t.alt_name(k)} {want.hex()}, found {bytes(got).hex()}\n")
            if len(batch) >= _BATCH:
                sys.stderr.write("".join(batch))
                batch.clear()
    sys.stderr.write("".join(batch))
    return bad
