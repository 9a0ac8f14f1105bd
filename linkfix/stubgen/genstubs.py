"""`linkfix gen-stubs SPEC -o OUTDIR`: validate an op spec and render the stubs.

Everything is validated and rendered in memory first; only then is OUTDIR
created and the files written: all or none (every changed file is staged as a
temporary file before the first is renamed into place), and only those whose
bytes changed, so a bad spec or a full disk leaves no partial output behind.
The cache (OUTDIR/.linkfix.cache) is not one of the outputs: it is written after
they are all in place, and only then, so a failed run leaves the previous cache,
which records the previous outputs, still in place.

A run whose spec, toolchain and outputs are those the cache (gencache.py)
recorded only repeats what that run printed: nothing is parsed, assembled or
rendered, and the heavy modules are never imported (they are imported in
generate(), not here).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from linkfix.errors import BadInput
from linkfix.fileio import read_regular, write_all_if_changed

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (a cached run's cost)
if TYPE_CHECKING:
    from linkfix.stubgen import body as bodymod
    from linkfix.stubgen import opmodel
    from linkfix.stubgen.gencache import Probe, Report
    from linkfix.stubgen.spec import Spec


def call_targets(body: bodymod.Body) -> set[str]:
    """The symbols gen-stubs itself made this body call (thunks, or direct callees)."""
    return {st.split()[1] for st in body.statements if st.startswith("call ")}


def generate(spec_path: str, raw: bytes | None = None, cache: Probe | None = None,
             written: str | None = None
             ) -> tuple[Spec, list[opmodel.OpModel], dict[str, bytes]]:
    """Validate, measure and check the spec; return the rendered files.

    `raw`: the spec's bytes, when already read; `cache`: measurements to reuse,
    and the assembler to run for the others; `written`: the backend whose bytes
    every site holds as linked (written.py), or None.
    """
    from linkfix.stubgen import body as bodymod
    from linkfix.stubgen import bodycheck, opmodel, render
    from linkfix.stubgen.gencache import body_key
    from linkfix.stubgen.measure import MeasureError, measure
    from linkfix.stubgen.spec import load, loads

    spec = load(spec_path) if raw is None else loads(raw, spec_path)
    if written is not None:
        from dataclasses import replace

        from linkfix.stubgen.written import check_backend

        check_backend(spec, written)
        spec = replace(spec, profile=replace(spec.profile, written=written))
    arch = spec.arch
    parsed: dict[str, dict[str, bodymod.Body]] = {}
    items: list[tuple[tuple[str, str], bodymod.Body]] = []
    for op in spec.ops:
        parsed[op.name] = {}
        for backend in op.bodies:
            try:
                body = bodymod.parse(arch, op, backend, spec.profile.linux)
            except bodymod.BodyError as exc:
                raise BadInput(spec_path, f"op '{op.name}': backend '{backend}': {exc}") from None
            parsed[op.name][backend] = body
            items.append(((op.name, backend), body))
    keys = [body_key(b.statements) for _, b in items]
    # One body that may depend on its place in the measuring file: measure all afresh.
    reuse = cache.measured(arch.name) if cache is not None and None not in keys else {}
    todo = [item for item, k in zip(items, keys, strict=True) if k not in reuse]
    try:
        fresh = measure(arch, todo, cache.assembler if cache is not None else None)
    except MeasureError as exc:
        op_name, backend = exc.key
        raise BadInput(spec_path, f"op '{op_name}': backend '{backend}': body does not "
                                  f"assemble for {arch.name}: {exc.message}") from None
    measured = {key: fresh[key] if key in fresh else reuse[k]
                for (key, _b), k in zip(items, keys, strict=True)}
    if cache is not None:
        cache.status += f"; {len(items) - len(todo)} of {len(items)} bodies reused"

    models: list[opmodel.OpModel] = []
    for op in spec.ops:
        allowed = set(bodymod.site_clobbers(arch, op))
        fields: dict[str, bodycheck.Checked] = {}
        for backend, body in parsed[op.name].items():
            meas = measured[(op.name, backend)]
            try:
                fields[backend] = bodycheck.check(arch, meas.code, meas.relocs, allowed,
                                                  call_targets(body))
            except bodycheck.BodyCheckError as exc:
                raise BadInput(spec_path, f"op '{op.name}': backend '{backend}': {exc}") from None
        models.append(opmodel.build_op(
            spec, op, parsed[op.name],
            {b: measured[(op.name, b)] for b in parsed[op.name]}, fields))
        if spec.profile.linux:
            from linkfix.stubgen import kernelsite

            kernelsite.check(spec, models[-1])
    return spec, models, render.render_all(spec, models)


def _talk(args: argparse.Namespace) -> tuple[bool, bool]:
    """progress.verbose(args) and progress.quiet(args), importing linkfix.progress only
    when -v or V=1 can make the run verbose (an unchanged run imports next to nothing)."""
    if getattr(args, "verbose", False) or os.environ.get("V") == "1":
        from linkfix import progress
        return progress.verbose(args), progress.quiet(args)
    return False, bool(getattr(args, "quiet", False))


def _spec_bytes(path: str) -> bytes | None:
    """The spec's bytes; None if it cannot be read (spec.load then says why)."""
    try:
        return read_regular(path)
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    verbose, quiet = _talk(args)  # -v, or V=1 from make (an explicit -q wins)
    if verbose:
        from linkfix import progress
        print(progress.command_line())
    outdir = args.output
    written = getattr(args, "written", None)
    raw = _spec_bytes(args.spec)
    cache: Probe | None = None
    if raw is not None and not getattr(args, "no_cache", False):
        from linkfix.stubgen import gencache
        # A written build's outputs differ from the ordinary ones: its own key.
        key = raw if written is None else raw + b"\0written=" + written.encode()
        cache = gencache.probe(outdir, key)
        if cache is not None and cache.up_to_date(outdir):
            assert cache.record is not None
            # Nothing to write: the outputs are in place, as after a run that found
            # them unchanged (a signal while printing is then no failure).
            write_all_if_changed({})
            _print(args, cache.record.report, verbose, quiet, 0, len(cache.record.outputs),
                   cache)
            return 0
    spec, models, files = generate(args.spec, raw, cache, written)
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise BadInput(outdir, "output exists and is not a directory")
    created = not os.path.exists(outdir)
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as exc:
        raise BadInput(outdir, f"cannot create output directory: {exc.strerror}") from None
    try:
        # All files or none: a full disk must not leave a header from one spec
        # next to thunks from another.
        changed = [os.path.basename(p) for p in write_all_if_changed(
            {os.path.join(outdir, name): data for name, data in files.items()})]
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(outdir)
        raise
    rep = _report(spec, models)
    if cache is not None:
        _save(cache, spec.arch.name, models, files, rep)
    _print(args, rep, verbose, quiet, len(changed), len(files), cache)
    return 0


def _report(spec: Spec, models: list[opmodel.OpModel]) -> Report:
    from linkfix.stubgen.gencache import Report

    notes = tuple((m.op.name, b, note) for m in models for b in m.bodies
                  if (note := m.measured[b].ks_note))
    sizes = tuple(
        f"  {m.op.name}: site {m.site_len} bytes, clobbers {','.join(m.clobbers) or '-'}, "
        f"bodies {', '.join(f'{b}={m.measured[b].length}' for b in m.bodies)}"
        for m in models)
    return Report(notes, sizes, len(spec.ops), len(spec.backends))


def _save(cache: Probe, arch: str, models: list[opmodel.OpModel], files: dict[str, bytes],
          rep: Report) -> None:
    from linkfix.stubgen.gencache import body_key

    bodies = {}
    for m in models:
        for b, body in m.bodies.items():
            key = body_key(body.statements)
            if key is not None:
                bodies[key] = m.measured[b]
    why = cache.save(arch, bodies, files, rep)
    if why is not None:
        cache.status += f"; {cache.path} not written: {why}"


def _print(args: argparse.Namespace, rep: Report, verbose: bool, quiet: bool, n_written: int,
           n_files: int, cache: Probe | None) -> None:
    for op, b, note in rep.notes:
        # A keystone hang is worth a word even though GNU as accepted the body.
        if verbose or "did not finish" in note:
            print(f"linkfix: {args.spec}: warning: op '{op}': backend '{b}': "
                  f"{note}; GNU as assembled it", file=sys.stderr)
    if verbose:
        for line in rep.sizes:
            print(line)
        print(f"  cache: {cache.status} ({cache.path})" if cache is not None
              else "  cache: not used")
    if not quiet:
        print(f"  GEN     {args.output} ({rep.n_ops} ops, {rep.n_backends} backends, "
              f"{n_written} of {n_files} files updated)")
