"""Turn --target / --op / --policy into one alternative per op.

Precedence: an `--op NAME=B` on the command line beats the policy's `[ops]`
entry, which beats the target (`--target`, else the policy's `target`). Branch
pseudo-ops `backend_is(b)` follow the target like every other op unless named
explicitly. Backend `generic` is alternative 0, the dispatch call.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass

from linkfix.errors import BadInput
from linkfix.fileio import read_regular
from linkfix.layout import Meta


@dataclass(frozen=True)
class Selection:
    target: int  # backend index for the state record's `target` byte
    per_op: tuple[int, ...]  # requested alternative for every op (before "no body" fallback)
    source: str  # how it was chosen, for messages
    explicit: tuple[tuple[int, int, str], ...] = ()  # (op, alternative, where) named one by one


def backend_index(meta: Meta, name: str, where: str, path: str | None) -> int:
    if name == "generic":
        return 0
    if name in meta.backends:
        return meta.backends.index(name) + 1
    known = ", ".join(("generic", *meta.backends))
    raise BadInput(path, f"{where}: unknown backend '{name}' (known: {known})")


def _op_index(meta: Meta, name: str, where: str, path: str | None) -> int:
    if name in meta.ops:
        return meta.ops.index(name)
    raise BadInput(path, f"{where}: unknown op '{name}' (known: {', '.join(meta.ops)})")


def _load_policy(path: str) -> tuple[str | None, dict[str, str]]:
    try:
        doc = tomllib.loads(read_regular(path).decode("utf-8"))
    except OSError as exc:
        raise BadInput(path, f"cannot read policy: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise BadInput(path, f"policy is not UTF-8 (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(path, f"policy is not valid TOML: {exc}") from None
    unknown = set(doc) - {"target", "ops"}
    if unknown:
        raise BadInput(path, f"unknown policy keys: {', '.join(sorted(unknown))} "
                             "(expected 'target' and an [ops] table)")
    target = doc.get("target")
    if target is not None and not isinstance(target, str):
        raise BadInput(path, "policy 'target' must be a string")
    ops = doc.get("ops", {})
    if not isinstance(ops, dict) or not all(isinstance(v, str) for v in ops.values()):
        raise BadInput(path, "policy [ops] must map op names to backend name strings")
    return target, ops


def has_selection(args: object) -> bool:
    return bool(getattr(args, "target", None) or getattr(args, "op", None)
                or getattr(args, "policy", None))


def resolve(meta: Meta, target: str | None, op_args: list[str], policy: str | None,
            image_path: str | None, base: Selection | None = None) -> Selection:
    """The per-op choice; raises BadInput for unknown names or a missing target.

    Without a target (from --target or the policy), `base` (verify: the image's
    state record) supplies it and the --op/[ops] entries change only their ops.
    """
    pol_target: str | None = None
    pol_ops: dict[str, str] = {}
    if policy:
        pol_target, pol_ops = _load_policy(policy)
    pol = []
    for name, backend in pol_ops.items():
        where = f"policy [ops] {name}"
        pol.append((_op_index(meta, name, where, policy), backend_index(meta, backend, where,
                                                                         policy)))
    if target is not None:
        tgt_name, src = target, "--target"
    elif pol_target is not None:
        tgt_name, src = pol_target, f"{policy}: target"
    elif base is not None and (op_args or pol):
        tgt_name, src = None, f"{base.source} with --op/[ops]"
    else:
        raise BadInput(image_path, "no target: give --target BACKEND (or 'generic'), or a "
                                   "--policy file with target = \"BACKEND\"")
    if tgt_name is None:
        assert base is not None
        tgt = base.target
        per_op = list(base.per_op)
    else:
        if target is not None:
            tgt = backend_index(meta, tgt_name, "--target", image_path)
        else:  # the message names the policy file once, as FILE
            tgt = backend_index(meta, tgt_name, "policy target", policy)
        per_op = [tgt] * len(meta.ops)
    explicit = []
    for i, k in pol:
        per_op[i] = k
        explicit.append((i, k, f"policy [ops] {meta.ops[i]}"))
    seen: set[int] = set()
    for arg in op_args:
        name, eq, backend = arg.rpartition("=")
        if not eq or not name or not backend:
            raise BadInput(image_path, f"--op {arg}: expected OP=BACKEND")
        i = _op_index(meta, name, f"--op {arg}", image_path)
        if i in seen:
            raise BadInput(image_path, f"--op {arg}: op '{name}' is given more than once")
        seen.add(i)
        per_op[i] = backend_index(meta, backend, f"--op {arg}", image_path)
        explicit.append((i, per_op[i], f"--op {arg}"))
    return Selection(tgt, tuple(per_op), src, tuple(explicit))


def check_explicit(sel: Selection, meta: Meta, present: dict[int, int],
                   path: str | None, strict: bool) -> list[str]:
    """An op named on its own should have a body for the backend it is given.

    `present[op]` is the bit mask of alternatives the op's sites carry. Without
    a body the sites keep the generic call, which runs whatever backend the
    kernel selected at boot, not the one asked for: with `strict` an error,
    else a warning line the command prints once it has succeeded (a failure
    stays one line).
    """
    warnings = []
    for op, k, where in sel.explicit:
        if k and op in present and not present[op] >> k & 1:
            message = (f"{where}: op '{meta.ops[op]}' has no body for backend "
                       f"'{meta.backends[k - 1]}'; its sites keep the generic call, which "
                       "runs the backend selected at boot")
            if strict:
                raise BadInput(path, message)
            warnings.append(f"linkfix: {path}: warning: {message}")
    return warnings


def from_state(meta: Meta) -> Selection:
    """The selection recorded in the image's state record (what `patch` last wrote)."""
    state = meta.op_state or (0,) * len(meta.ops)
    return Selection(meta.target, tuple(state), "state record")
