"""The binary layout of linkfix's tables (docs/FORMAT.md), for writers and readers."""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"LINKFIX\0"
VERSION = 1

META_SECTION = ".linkfix.meta"
SITES_SECTION = ".linkfix.sites"
REPL_SECTION = ".linkfix.repl"

KIND_OP = 0
KIND_BRANCH = 1

FLAG_PRESENT = 0x1
FLAG_CALL = 0x2
FLAG_JMP = 0x4

GENERIC = 0  # alternative index of the dispatch call

# magic, version, machine, n_ops, n_backends, site_rec_size, names_size, spec_hash,
# target, patched, reserved
META_FIXED = struct.Struct("<8sHHHHHHIBBH")
META_STATE_OFFSET = META_FIXED.size  # 28
assert META_STATE_OFFSET == 28

SITE_HEAD = struct.Struct("<iHBB")  # site, op, site_len, kind
ALT = struct.Struct("<iBBH")  # body, len, flags, reserved


def site_rec_size(n_backends: int) -> int:
    return SITE_HEAD.size + ALT.size * (n_backends + 1)


def site_struct(n_backends: int) -> struct.Struct:
    """One struct for a whole site record: head then n_backends+1 alternatives."""
    return struct.Struct("<iHBB" + "iBBH" * (n_backends + 1))


def branch_op_name(backend: str) -> str:
    return f"backend_is({backend})"


@dataclass(frozen=True)
class Meta:
    machine: int
    backends: tuple[str, ...]  # backend 1..n; index 0 (generic) is implicit
    ops: tuple[str, ...]  # real ops then one branch pseudo-op per backend
    spec_hash: int
    target: int = 0
    patched: int = 0
    op_state: tuple[int, ...] = ()

    @property
    def n_real_ops(self) -> int:
        return len(self.ops) - len(self.backends)

    def names_blob(self) -> bytes:
        return b"".join(n.encode() + b"\0" for n in (*self.backends, *self.ops))

    def encode(self) -> bytes:
        names = self.names_blob()
        state = self.op_state or (0,) * len(self.ops)
        head = META_FIXED.pack(
            MAGIC, VERSION, self.machine, len(self.ops), len(self.backends),
            site_rec_size(len(self.backends)), len(names), self.spec_hash,
            self.target, self.patched, 0,
        )
        out = head + bytes(state) + names
        return out + b"\0" * (-len(out) % 4)


def encode_state(target: int, patched: int, op_state: list[int] | tuple[int, ...]) -> bytes:
    """The bytes of the state record, written at META offset 24 onwards."""
    return bytes((target, patched, 0, 0)) + bytes(op_state)


STATE_OFFSET = 24
