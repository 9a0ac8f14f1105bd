"""One-instruction padding, shared by gen-stubs (linked sites) and patch.

Both sides must produce the same bytes so that patching a site back to its
generic alternative reproduces the image as linked.
"""

from __future__ import annotations

_NOP8 = bytes.fromhex("0f1f840000000000")

# Index n holds the n-byte long NOP (the encodings GNU as and Linux use).
NOPS: tuple[bytes, ...] = (
    b"",
    bytes.fromhex("90"),
    bytes.fromhex("6690"),
    bytes.fromhex("0f1f00"),
    bytes.fromhex("0f1f4000"),
    bytes.fromhex("0f1f440000"),
    bytes.fromhex("660f1f440000"),
    bytes.fromhex("0f1f8000000000"),
    _NOP8,
    b"\x2e" + _NOP8,
    b"\x66\x2e" + _NOP8,
    b"\x66\x66\x2e" + _NOP8,
)

MAX_NOP = len(NOPS) - 1
INT3 = 0xCC


def pad(n: int) -> bytes:
    """Return `n` bytes that execute as a single instruction (plus unreachable INT3s)."""
    if n < 0:
        raise ValueError(f"negative padding {n}")
    if n <= MAX_NOP:
        return NOPS[n]
    if n - 2 <= 127:
        return bytes((0xEB, n - 2)) + bytes([INT3]) * (n - 2)
    return b"\xe9" + (n - 5).to_bytes(4, "little") + bytes([INT3]) * (n - 5)


_CACHE: dict[int, bytes] = {}


def pad_cached(n: int) -> bytes:
    """`pad(n)`, memoised for the per-site loop."""
    got = _CACHE.get(n)
    if got is None:
        got = _CACHE[n] = pad(n)
    return got
