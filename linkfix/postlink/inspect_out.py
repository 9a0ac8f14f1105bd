"""How `linkfix inspect` prints a listing: text, one JSON document, or JSON Lines.

Each is written site by site as it is rendered (nothing holds the whole
output), in address order. JSON is assembled from pre-escaped pieces: every
string from the image goes through json.dumps; the rest is numbers and hex.
The output goes to stdout, or to `-o FILE` through a temporary file renamed
into place when complete (fileio's rules: no partial file, ever).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import TextIO

from linkfix import fileio
from linkfix.errors import BadInput
from linkfix.postlink import image
from linkfix.postlink.inspect_sites import ABSENT, Listing, columns, totals

_BATCH = 4096  # lines of text per write
_JSON_BATCH = 256  # sites per write of JSON (a site is some 700 characters)
UNKNOWN = "unknown/corrupt"


# One listed site: address, shape index, current bytes, per alternative (layout id or
# ABSENT/UNPLACED, its bytes or why it cannot be placed), the alternatives it holds,
# its state, symbol+offset, file:line.
Site = tuple[int, int, bytes, list[tuple[int, bytes | str]], list[int], str,
             str | None, str | None]


def header(lst: Listing) -> dict[str, object]:
    t, meta = lst.t, lst.t.meta
    return {
        "image": lst.path,
        "machine": "x86_64" if lst.img.machine == image.EM_X86_64 else "i386",
        "backends": list(meta.backends),
        "patched": bool(meta.patched),
        "target": t.alt_name(meta.target),
        "op_state": {op: t.alt_name(k) for op, k in zip(meta.ops, meta.op_state, strict=True)},
    }


def sites(lst: Listing) -> Iterator[Site]:
    """Every listed site in address order, with its bytes for every alternative."""
    t, chk, img = lst.t, lst.chk, lst.img
    addrs = chk.site_addrs
    get_line = lst.lines.get
    src = img.data
    names = [t.alt_name(k) for k in range(t.n_alts)]
    state = t.meta.op_state
    preferred = []  # per shape: the alternative the state record names, if it has a body
    for sh in lst.shapes:
        rec = state[sh.op] if state and sh.op < len(state) else 0
        preferred.append(rec if rec < len(sh.present) and sh.present[rec] else 0)
    symbolize = img.symbolize
    sizes = [sh.size for sh in lst.shapes]
    shape_of = lst.shape_of
    seg = chk.exec_seg
    sdelta = seg.vaddr - seg.offset if seg is not None else None
    offset = lst.site_offset
    first = None  # the lowest file offset listed yet
    for block, cols in columns(lst):
        lo = hi = None
        per_k = [(k, c.ids, c.wants) for k, c in enumerate(cols)]
        for j, i in enumerate(block):
            n = shape_of[i]
            size = sizes[n]
            s = addrs[i]
            so = s - sdelta if sdelta is not None else offset(i)
            cur = src[so:so + size]
            lo = so if lo is None or so < lo else lo
            hi = so + size if hi is None or so + size > hi else hi
            wants: list[tuple[int, bytes | str]] = []
            matches = []
            for k, ids, col in per_k:
                lid = ids[j]
                want = col[j]
                if lid >= 0 and want == cur:
                    matches.append(k)
                wants.append((lid, want))
            if not matches:
                st = UNKNOWN
            else:
                p = preferred[n]
                st = names[p if p in matches else matches[0]]
            yield s, n, cur, wants, matches, st, symbolize(s), get_line(s)
        if lo is not None and hi is not None:
            # The block's pages are not looked at again. A fault may map a whole
            # large folio of the page cache, pages already handed back included: hand
            # back everything from the first listed site on.
            first = lo if first is None else min(first, lo)
            img.release(first, hi - first)


# -- text --------------------------------------------------------------------------------


def write_text(lst: Listing, out: TextIO, summary_only: bool) -> None:
    t = lst.t
    h = header(lst)
    count = f"{lst.n_listed} of {t.n_sites}" if lst.filtered else f"{t.n_sites}"
    out.write(f"{h['image']}: {h['machine']}, {count} sites, backends "
              f"{', '.join(t.meta.backends)}; "
              + (f"patched for {h['target']}" if h["patched"] else "not patched") + "\n")
    if not summary_only:
        names = [t.alt_name(k) for k in range(t.n_alts)]
        hit = [f"  * {name:<10} " for name in names]
        miss = [f"    {name:<10} " for name in names]
        absent = [f"    {name:<10} (no body)" for name in names]
        layouts = lst.cache.layouts  # type: ignore[union-attr]
        heads = [f"  {t.op_name(sh.op)}  {sh.size} bytes  [" for sh in lst.shapes]
        batch: list[str] = []
        add = batch.append
        for s, n, _cur, wants, matches, st, sym, line in sites(lst):
            where = f"  {sym} {line}" if sym and line else f"  {sym or line}" if sym or line \
                else ""
            add(f"{s:#x}{heads[n]}{st}]{where}")
            for k, (lid, want) in enumerate(wants):
                if lid >= 0:
                    add((hit if k in matches else miss)[k] + layouts[lid].text(want, s))
                elif lid == ABSENT:
                    add(absent[k])
                else:
                    add(f"{miss[k]}(cannot be placed: {want})")
            if len(batch) >= _BATCH:
                out.write("\n".join(batch) + "\n")
                batch.clear()
        if batch:
            out.write("\n".join(batch) + "\n")
    ops, backends = totals(lst)
    lines = ["summary:"]
    for op, tot in ops.items():
        pads = ", ".join(f"{t.alt_name(k)} {n}" for k, n in tot.padding.items())
        lines.append(f"  {t.op_name(op)}: {tot.sites} sites, {tot.bytes} bytes; padding: {pads}")
    for k, n in backends.items():
        lines.append(f"  all ops for {t.alt_name(k)}: {n} padding bytes")
    out.write("\n".join(lines) + "\n")


# -- JSON --------------------------------------------------------------------------------


def _jstr(text: str | None) -> str:
    """json.dumps of a string or None (its own C encoder, without the dispatch)."""
    return "null" if text is None else encode_basestring_ascii(text)


def _site_objects(lst: Listing, lead: str) -> Iterator[str]:
    """Each site as one line of JSON (`lead` opens the object)."""
    t = lst.t
    jnames = [_jstr(t.alt_name(k)) for k in range(t.n_alts)]
    nulls = [f"{name}: null" for name in jnames]
    jstate: dict[str, str] = {}
    jmatch: dict[tuple[int, ...], str] = {}
    layouts = lst.cache.layouts  # type: ignore[union-attr]
    opening: list[dict[int, str]] = [{} for _ in jnames]  # per k: layout id -> its opening
    kinds = [f'"op": {_jstr(t.op_name(sh.op))}, "kind": "{"branch" if sh.branch else "op"}", '
             f'"size": {sh.size}, "bytes": "' for sh in lst.shapes]
    for s, n, cur, wants, matches, st, sym, line in sites(lst):
        alts = []
        for k, (lid, want) in enumerate(wants):
            if lid >= 0:
                head = opening[k].get(lid)
                if head is None:
                    head = opening[k][lid] = \
                        f'{jnames[k]}: {{"body_len": {layouts[lid].body_len}, "bytes": "'
                alts.append(f'{head}{want.hex()}", "asm": '  # type: ignore[union-attr]
                            f'[{layouts[lid].json(want, s)}]}}')  # type: ignore[arg-type]
            elif lid == ABSENT:
                alts.append(nulls[k])
            else:
                alts.append(f'{jnames[k]}: {{"error": {_jstr(want)}}}')  # type: ignore[arg-type]
        m = tuple(matches)
        jm = jmatch.get(m)
        if jm is None:
            jm = jmatch[m] = "[" + ", ".join(jnames[k] for k in m) + "]"
        js = jstate.get(st)
        if js is None:
            js = jstate[st] = _jstr(st)
        yield (f'{lead}"address": "{s:#x}", "symbol": {_jstr(sym)}, "line": {_jstr(line)}, '
               f'{kinds[n]}{cur.hex()}", "state": {js}, "matches": {jm}, '
               f'"alternatives": {{{", ".join(alts)}}}}}')


def _summaries(lst: Listing) -> tuple[dict[str, object], dict[str, object]]:
    t = lst.t
    ops, backends = totals(lst)
    summary = {t.op_name(op): {"sites": tot.sites, "bytes": tot.bytes,
                               "padding": {t.alt_name(k): n for k, n in tot.padding.items()}}
               for op, tot in ops.items()}
    return summary, {t.alt_name(k): {"padding": n} for k, n in backends.items()}


def write_json(lst: Listing, out: TextIO, summary_only: bool) -> None:
    """One JSON document: the header's keys, "sites" (one site per line), the summaries."""
    head = header(lst)
    out.write("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()))
    if not summary_only:
        out.write(', "sites": [')
        batch: list[str] = []
        first = True
        for obj in _site_objects(lst, "{"):
            batch.append(obj)
            if len(batch) >= _JSON_BATCH:
                out.write(("\n" if first else ",\n") + ",\n".join(batch))
                first = False
                batch.clear()
        if batch:
            out.write(("\n" if first else ",\n") + ",\n".join(batch))
        out.write("\n]")
    summary, backend_summary = _summaries(lst)
    out.write(f',\n"summary": {json.dumps(summary)},\n'
              f'"backend_summary": {json.dumps(backend_summary)}}}\n')


def write_jsonl(lst: Listing, out: TextIO, summary_only: bool) -> None:
    """One JSON object per line: every site ("type": "site"), then one per op, one per
    alternative ("backend") and one for the image."""
    if not summary_only:
        batch: list[str] = []
        for obj in _site_objects(lst, '{"type": "site", '):
            batch.append(obj)
            if len(batch) >= _JSON_BATCH:
                out.write("\n".join(batch) + "\n")
                batch.clear()
        if batch:
            out.write("\n".join(batch) + "\n")
    summary, backend_summary = _summaries(lst)
    rows: list[dict[str, object]] = [{"type": "op", "op": op, **v}  # type: ignore[dict-item]
                                     for op, v in summary.items()]
    rows += [{"type": "backend", "backend": b, **v}  # type: ignore[dict-item]
             for b, v in backend_summary.items()]
    rows.append({"type": "image", **header(lst), "sites": lst.n_listed,
                 "image_sites": lst.t.n_sites})
    out.write("".join(json.dumps(r) + "\n" for r in rows))


WRITERS: dict[str, Callable[[Listing, TextIO, bool], None]] = {
    "text": write_text, "json": write_json, "jsonl": write_jsonl}


# -- where it goes -----------------------------------------------------------------------


class Sink:
    """stdout, or FILE written to a temporary file and renamed over FILE on success."""

    def __init__(self, path: str | None, image_path: str) -> None:
        self.path = path
        self.image_path = image_path
        self.tmp: str | None = None
        self.real = ""
        self.file: TextIO = sys.stdout

    def __enter__(self) -> TextIO:
        if self.path is None:
            return sys.stdout
        fileio.forget_commits()
        if _same_file(self.path, self.image_path):
            raise BadInput(self.path, "output is the input image")
        self.real = fileio.resolve_output(self.path)
        fileio.remove_stale(self.real)
        while True:
            tmp = fileio.temp_name(self.real)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise BadInput(self.path, f"cannot create output: {exc.strerror}") from None
        self.tmp = tmp
        self.file = open(fd, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        return self.file

    def __exit__(self, kind: type | None, exc: BaseException | None, _tb: object) -> None:
        if self.path is None:
            if kind is None:
                sys.stdout.flush()
            return
        assert self.tmp is not None
        try:
            if kind is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
        except OSError as err:
            fileio.discard(self.tmp)
            raise BadInput(self.path, f"cannot write output: {err.strerror}") from None
        except BaseException:
            fileio.discard(self.tmp)
            raise
        if kind is not None:
            fileio.discard(self.tmp)
            if isinstance(exc, OSError) and exc.strerror:
                raise BadInput(self.path, f"cannot write output: {exc.strerror}") from None
            return
        fileio.commit_all([fileio.Slot(self.path, self.real, self.tmp)])


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)
