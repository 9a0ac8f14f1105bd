"""Assemble every body: syntax errors early, exact lengths, machine code for bodycheck.

Two assemblers, two jobs:

* keystone assembles each body in a worker process with a time limit (some
  inputs make it hang). It is a fast, per-body syntax check. It needs symbols
  replaced by numbers and numeric local labels renamed, and it encodes some
  forms differently from GNU as (`%gs:sym` as RIP-relative, `mov sym, %eax` as
  a 64-bit moffs, `mov $sym, %rax` as movabs), so its lengths are only
  informational.
* GNU as, the assembler that builds the kernel, assembles all bodies once
  more, each in its own section, with the real symbols left undefined. Its
  section sizes are the body lengths gen-stubs uses, and a body is rejected
  only when GNU as rejects it (keystone lacks some instructions, such as
  endbr64 and sysretq).

GNU as is the `as` found on PATH, resolved once (find_assembler): the path
gen-stubs runs is the path its cache is keyed by, with that program's
`--version`. Heavy modules (multiprocessing, subprocess, keystone, elftools,
and linkfix's body checks) are imported only when something is assembled, so
the cache can ask which assembler is in use without paying for them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (a cached run's cost)
if TYPE_CHECKING:
    from linkfix.arch import Arch
    from linkfix.stubgen.body import Body
    from linkfix.stubgen.bodycheck import Reloc

KS_TIMEOUT = 5.0  # seconds for one body; a well-formed body takes microseconds
PLACEHOLDER = "0x12345678"
MAX_BODY = 255  # the `len` field of an alternative is a u8

_SYM_TOKEN = re.compile(r"(?<![%\w.])([A-Za-z_.][A-Za-z0-9_.$]*)")


class MeasureError(ValueError):
    """A body GNU as rejects: `key` is (op, backend), message is the assembler's."""

    def __init__(self, key: tuple[str, str], message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


@dataclass(frozen=True)
class Measured:
    code: bytes  # GNU as encoding; relocated fields hold the assembler's addend (or 0)
    relocs: tuple[Reloc, ...]  # the object's relocations in this body
    ks_length: int | None  # keystone's length of the placeholder form; None if it failed
    ks_note: str | None  # why keystone failed, when it did

    @property
    def length(self) -> int:
        return len(self.code)


# ---------------------------------------------------------------- keystone


def keystone_source(statements: tuple[str, ...] | list[str]) -> str:
    """The body with symbols replaced by numbers and numeric labels named, for keystone."""
    from linkfix.stubgen.body import is_label, rename_labels

    out: list[str] = []
    for st in rename_labels(statements, lambda n: f"lf_l{n}"):
        if is_label(st) or st.startswith("."):
            out.append(st)
            continue
        parts = st.split(None, 1)
        mnemonic, operands = parts[0], (parts[1] if len(parts) > 1 else "")
        # A branch to a far numeric target makes keystone pick rel32, as GNU as does
        # for an external symbol; any other symbol becomes a 32-bit number.
        operands = _SYM_TOKEN.sub(
            lambda m: m.group(0) if m.group(0).startswith("lf_l") else PLACEHOLDER, operands)
        out.append(f"{mnemonic} {operands}".rstrip())
    return "; ".join(out)


def _ks_worker(conn, mode64: bool, texts: list[str]) -> None:  # type: ignore[no-untyped-def]
    from keystone import KS_ARCH_X86, KS_MODE_32, KS_MODE_64, KS_OPT_SYNTAX_ATT, Ks, KsError

    ks = Ks(KS_ARCH_X86, KS_MODE_64 if mode64 else KS_MODE_32)
    ks.syntax = KS_OPT_SYNTAX_ATT
    for i, text in enumerate(texts):
        conn.send((i, "start", None))
        try:
            encoding, count = ks.asm(text, 0)
            conn.send((i, "ok", bytes(encoding or b"")))
        except KsError as exc:
            conn.send((i, "err", str(exc)))
    conn.close()


def keystone_assemble(arch: Arch, texts: list[str],
                      timeout: float = KS_TIMEOUT) -> list[tuple[str, bytes | str | None]]:
    """Assemble each text with keystone in a worker process; a hang costs `timeout`.

    Returns one (status, value) per text: ("ok", bytes), ("err", message) or
    ("timeout", None).
    """
    import multiprocessing

    results: list[tuple[str, bytes | str | None]] = []
    ctx = multiprocessing.get_context("fork")
    todo = list(texts)
    while len(results) < len(texts):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_ks_worker, args=(child, arch.elf_class == 64, todo),
                           daemon=True)
        proc.start()
        child.close()
        base = len(results)
        hung = False
        try:
            while len(results) < len(texts):
                if not parent.poll(timeout):
                    hung = True
                    break
                try:
                    _, status, value = parent.recv()
                except EOFError:
                    hung = True  # the worker died (keystone crashed)
                    break
                if status != "start":
                    results.append((status, value))
        finally:
            if hung or proc.is_alive():
                proc.kill()
            proc.join()
            parent.close()
        if hung:
            results.append(("timeout", None))
        todo = texts[len(results):]
        if len(results) == base and not hung:
            break
    return results


# ---------------------------------------------------------------- GNU as


def _gas_source(arch: Arch, bodies: list[tuple[str, ...]]) -> tuple[str, dict[int, int]]:
    """One assembly file, body i in section .lfb.i; returns the text and line -> body."""
    lines = [".code64" if arch.elf_class == 64 else ".code32"]
    owner: dict[int, int] = {}
    for i, statements in enumerate(bodies):
        lines.append(f'.section .lfb.{i},"ax",@progbits')
        for st in statements:
            lines.append(st)
            owner[len(lines)] = i
    lines.append("")
    return "\n".join(lines), owner


_GAS_MSG = re.compile(r"^[^:]*:(\d+): (Error|Fatal error): (.*)$")


def _section_code(elf, i: int) -> tuple[bytes, tuple[Reloc, ...]]:  # type: ignore[no-untyped-def]
    """Body i's bytes and relocations (REL addends read from the field)."""
    from linkfix.stubgen.bodycheck import Reloc

    sec = elf.get_section_by_name(f".lfb.{i}")
    if sec is None:
        return b"", ()
    data = sec.data()
    relocs: list[Reloc] = []
    for name in (f".rela.lfb.{i}", f".rel.lfb.{i}"):
        rsec = elf.get_section_by_name(name)
        if rsec is None:
            continue
        symtab = elf.get_section(rsec["sh_link"])
        for r in rsec.iter_relocations():
            sym = symtab.get_symbol(r["r_info_sym"])
            off = r["r_offset"]
            if r.is_RELA():
                addend = r["r_addend"]
            else:
                addend = int.from_bytes(data[off:off + 4], "little", signed=True)
            relocs.append(Reloc(off, r["r_info_type"], sym.name, addend))
    return data, tuple(relocs)


def find_assembler() -> str | None:
    """The absolute path of the `as` on PATH (what running "as" would run), or None."""
    for d in os.get_exec_path():
        path = os.path.abspath(os.path.join(d, "as"))
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def assembler_version(path: str) -> str | None:
    """`path --version`'s output (C locale), or None if it cannot be run or fails.

    Spawned directly: importing subprocess would cost an unchanged gen-stubs run
    more than the assembler's start-up does.
    """
    env = dict(os.environ, LC_ALL="C")
    r, w = os.pipe()
    try:
        pid = os.posix_spawn(path, [path, "--version"], env, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, w, 1),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
    except OSError:
        os.close(r)
        return None
    finally:
        os.close(w)
    chunks: list[bytes] = []
    try:
        with os.fdopen(r, "rb") as out:
            while chunk := out.read(65536):
                chunks.append(chunk)
    finally:
        _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        return None
    return b"".join(chunks).decode(errors="replace")


def gas_assemble(arch: Arch, keys: list[tuple[str, str]], bodies: list[tuple[str, ...]],
                 assembler: str | None = None) -> list[tuple[bytes, tuple[Reloc, ...]]]:
    """Assemble the bodies with GNU as (`assembler`, default the `as` on PATH); their
    code, or MeasureError for the first bad one."""
    if not bodies:
        return []
    import subprocess
    import tempfile

    from elftools.elf.elffile import ELFFile

    gas = assembler or find_assembler()
    if gas is None:
        raise MeasureError(keys[0], "GNU as not found (install binutils)")
    source, owner = _gas_source(arch, bodies)
    with tempfile.TemporaryDirectory(prefix="linkfix-measure-") as tmp:
        src = os.path.join(tmp, "bodies.s")
        obj = os.path.join(tmp, "bodies.o")
        with open(src, "w") as f:
            f.write(source)
        flag = "--64" if arch.elf_class == 64 else "--32"
        try:
            proc = subprocess.run([gas, flag, "-o", obj, src], capture_output=True, text=True)
        except FileNotFoundError:
            raise MeasureError(keys[0], "GNU as not found (install binutils)") from None
        if proc.returncode != 0:
            first: tuple[int, str] | None = None
            for line in proc.stderr.splitlines():
                m = _GAS_MSG.match(line)
                if m and int(m.group(1)) in owner:
                    i = owner[int(m.group(1))]
                    if first is None or i < first[0]:
                        first = (i, m.group(3).rstrip("."))
            if first is None:
                raise MeasureError(keys[0], "GNU as failed: " + " ".join(proc.stderr.split()))
            raise MeasureError(keys[first[0]], first[1])
        with open(obj, "rb") as f:
            elf = ELFFile(f)
            out = [_section_code(elf, i) for i in range(len(bodies))]
    return out


# ---------------------------------------------------------------- both


def measure(arch: Arch, items: list[tuple[tuple[str, str], Body]],
            assembler: str | None = None) -> dict[tuple[str, str], Measured]:
    """Measure every body; keys are (op, backend). Raises MeasureError.

    `assembler`: GNU as to run (default: the `as` on PATH).
    """
    texts = [keystone_source(body.statements) for _, body in items]
    ks = keystone_assemble(arch, texts) if items else []
    code = gas_assemble(arch, [k for k, _ in items], [b.statements for _, b in items],
                        assembler)
    out: dict[tuple[str, str], Measured] = {}
    for (key, _body), (status, value), (c, relocs) in zip(items, ks, code, strict=True):
        if len(c) > MAX_BODY:
            raise MeasureError(key, f"body is {len(c)} bytes; at most {MAX_BODY} fit a site")
        if status == "ok":
            assert isinstance(value, bytes)
            out[key] = Measured(code=c, relocs=relocs, ks_length=len(value), ks_note=None)
        elif status == "timeout":
            out[key] = Measured(code=c, relocs=relocs, ks_length=None,
                                ks_note=f"keystone did not finish within {KS_TIMEOUT:g} s")
        else:
            out[key] = Measured(code=c, relocs=relocs, ks_length=None,
                                ks_note=f"keystone: {value}")
    return out


