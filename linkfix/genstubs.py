"""`linkfix gen-stubs SPEC -o OUTDIR`: validate an op spec and render the stubs.

Everything is validated and rendered in memory first; only then is OUTDIR
created and the files written: all or none (every changed file is staged as a
temporary file before the first is renamed into place), and only those whose
bytes changed, so a bad spec or a full disk leaves no partial output behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from linkfix import body as bodymod
from linkfix import bodycheck, opmodel, render, report
from linkfix.errors import BadInput
from linkfix.fileio import write_all_if_changed
from linkfix.measure import MeasureError, measure
from linkfix.spec import Spec, load


def call_targets(body: bodymod.Body) -> set[str]:
    """The symbols gen-stubs itself made this body call (thunks, or direct callees)."""
    return {st.split()[1] for st in body.statements if st.startswith("call ")}


def generate(spec_path: str) -> tuple[Spec, list[opmodel.OpModel], dict[str, bytes]]:
    """Validate, measure and check the spec; return the rendered files."""
    spec = load(spec_path)
    arch = spec.arch
    parsed: dict[str, dict[str, bodymod.Body]] = {}
    items: list[tuple[tuple[str, str], bodymod.Body]] = []
    for op in spec.ops:
        parsed[op.name] = {}
        for backend in op.bodies:
            try:
                body = bodymod.parse(arch, op, backend)
            except bodymod.BodyError as exc:
                raise BadInput(spec_path, f"op '{op.name}': backend '{backend}': {exc}") from None
            parsed[op.name][backend] = body
            items.append(((op.name, backend), body))
    try:
        measured = measure(arch, items)
    except MeasureError as exc:
        op_name, backend = exc.key
        raise BadInput(spec_path, f"op '{op_name}': backend '{backend}': body does not "
                                  f"assemble for {arch.name}: {exc.message}") from None

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
    return spec, models, render.render_all(spec, models)


def run(args: argparse.Namespace) -> int:
    verbose = report.verbose(args)  # -v, or V=1 from make (an explicit -q wins)
    if verbose:
        print(report.command_line())
    spec, models, files = generate(args.spec)
    outdir = args.output
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
        written = [os.path.basename(p) for p in write_all_if_changed(
            {os.path.join(outdir, name): data for name, data in files.items()})]
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(outdir)
        raise
    quiet = report.quiet(args)
    for m in models:
        for b in m.bodies:
            note = m.measured[b].ks_note
            # A keystone hang is worth a word even though GNU as accepted the body.
            if note and (verbose or "did not finish" in note):
                print(f"linkfix: {args.spec}: warning: op '{m.op.name}': backend '{b}': "
                      f"{note}; GNU as assembled it", file=sys.stderr)
    if verbose:
        for m in models:
            sizes = ", ".join(f"{b}={m.measured[b].length}" for b in m.bodies)
            clob = ",".join(m.clobbers) or "-"
            print(f"  {m.op.name}: site {m.site_len} bytes, clobbers {clob}, bodies {sizes}")
    if not quiet:
        print(f"  GEN     {outdir} ({len(spec.ops)} ops, {len(spec.backends)} backends, "
              f"{len(written)} of {len(files)} files updated)")
    return 0
