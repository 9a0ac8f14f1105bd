"""gen-stubs' cache: what an earlier run measured and wrote, so an unchanged run does nothing.

The cache is one file in the output directory, `OUTDIR/.linkfix.cache`
(cache_path). It is not one of the outputs: it is written only after all of them
are in place (so it never records outputs a failed run did not write), and what it
records is checked against the files on disk before it is believed. It holds

* the key of the run that wrote it: a digest of everything but the spec that
  decides the output (linkfix's version, the source of every linkfix module
  that run loaded, the templates and the linker script, Python, the libraries'
  installed versions, the path GNU as was run from and its `--version`), and
  the sha256 of the spec's bytes. The modules are those a whole gen-stubs run
  imported, listed in the file: one that starts importing another module
  changes itself, so the list needs no upkeep, and an edit to a module
  gen-stubs never loads (inspect.py) keeps the cache;
* every body's measurement (GNU as code and relocations, keystone's verdict),
  by body text: a changed spec re-assembles only the bodies that changed;
* each output file's sha256, and what the run printed about the spec
  (keystone's notes, the -v sizes), for an unchanged run to repeat.

An unchanged run (same key, every output still holding what was recorded)
writes nothing, assembles nothing and imports none of the heavy modules.

The file is `linkfix-gencache <version> sha256=<hex>` on the first line, then
compact JSON whose sha256 that is. A file that is unreadable, truncated, of
another version or another program, whose checksum or structure is wrong, is
ignored (the run recomputes and replaces it); it is never an error. It is
replaced atomically (a unique temporary name in OUTDIR, then rename), so parallel
runs each leave a complete file; whichever rename comes last, the outputs it
records are believed only while the files on disk hash to them. A cache beside
OUTDIR (`.<OUTDIR name>.linkfix-cache`, where earlier builds kept it) is neither
read nor removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

from linkfix import __version__
from linkfix.fileio import read_regular
from linkfix.outputs import discard, remove_stale, temp_name
from linkfix.stubgen.measure import MAX_BODY, assembler_version, find_assembler

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (a cached run's cost)
if TYPE_CHECKING:
    from typing import Any

    from linkfix.stubgen.measure import Measured

MAGIC = b"linkfix-gencache"
VERSION = b"1"
CACHE_NAME = ".linkfix.cache"  # in OUTDIR; not TEMP_PREFIX (.linkfix-), never a temporary
# module -> distribution: the third-party code gen-stubs runs
LIBRARIES = {"jinja2": "jinja2", "markupsafe": "markupsafe", "elftools": "pyelftools",
             "keystone": "keystone_engine", "capstone": "capstone"}
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # linkfix/
_ROOT = os.path.dirname(_PACKAGE)
DATA_DIRS = ("templates", "ldscripts")  # read by render.py (TEMPLATES, LDSCRIPT)


@dataclass(frozen=True)
class Report:
    """What a run prints about its spec, besides the command line and the totals."""

    notes: tuple[tuple[str, str, str], ...]  # (op, backend, keystone's note)
    sizes: tuple[str, ...]  # the -v line of each op
    n_ops: int
    n_backends: int


@dataclass(frozen=True)
class Record:
    """A cache file's contents, checked for shape; bodies are decoded on demand."""

    toolchain: str
    modules: tuple[str, ...]  # the linkfix modules (package-relative paths) toolchain covers
    spec: str
    arch: str
    bodies: dict[str, Any]
    outputs: dict[str, str]  # file name -> sha256
    report: Report


@dataclass
class Probe:
    """This run's key, and the cache file as found."""

    path: str
    assembler: str  # the GNU as every measurement of this run uses
    version: str  # its --version
    spec: str
    record: Record | None
    status: str = field(default="")  # why the cache does (not) serve, for -v

    def up_to_date(self, outdir: str) -> bool:
        """Whether the outputs are those the cache records for exactly this key."""
        rec = self.record
        if rec is None:
            return False
        if rec.spec != self.spec:
            self.status = "the spec changed"
            return False
        for name, digest in rec.outputs.items():
            try:
                data = read_regular(os.path.join(outdir, name))
            except OSError:
                self.status = f"{name} is missing"
                return False
            if hashlib.sha256(data).hexdigest() != digest:
                self.status = f"{name} was changed"
                return False
        self.status = "outputs up to date, nothing assembled"
        return True

    def measured(self, arch: str) -> dict[str, Measured]:
        """The recorded measurements, by body_key, when they are for `arch`."""
        rec = self.record
        if rec is None or rec.arch != arch:
            return {}
        out: dict[str, Measured] = {}
        for key, entry in rec.bodies.items():
            m = _decode(entry)
            if m is None:
                return {}  # a valid checksum over a wrong structure: trust none of it
            out[key] = m
        return out

    def save(self, arch: str, bodies: dict[str, Measured], outputs: dict[str, bytes],
             report: Report) -> str | None:
        """Write the cache for this run; returns why it could not be written, or None."""
        modules = loaded_modules()
        payload = {
            "toolchain": toolchain_digest(self.assembler, self.version, modules),
            "modules": modules, "spec": self.spec, "arch": arch,
            "bodies": {k: _encode(m) for k, m in bodies.items()},
            "outputs": {n: hashlib.sha256(d).hexdigest() for n, d in outputs.items()},
            "report": {"notes": [list(n) for n in report.notes], "sizes": list(report.sizes),
                       "ops": report.n_ops, "backends": report.n_backends},
        }
        return write(self.path, encode(payload))


def cache_path(outdir: str) -> str:
    """Where the cache of `outdir` lives: in it."""
    return os.path.join(outdir, CACHE_NAME)


def probe(outdir: str, spec_bytes: bytes) -> Probe | None:
    """This run's key and the cache as found; None when no cache can be used (no
    GNU as whose version can be asked: its error comes later)."""
    path = cache_path(outdir)
    gas = find_assembler()
    version = assembler_version(gas) if gas else None
    if gas is None or version is None:
        return None
    rec = load(path)
    p = Probe(path, gas, version, hashlib.sha256(spec_bytes).hexdigest(), None)
    if rec is None:
        p.status = "no valid cache file"
    elif rec.toolchain != toolchain_digest(gas, version, rec.modules):
        p.status = "linkfix, Python, a library or the assembler changed"
    else:
        p.record = rec
    return p


def body_key(statements: tuple[str, ...]) -> str | None:
    """The cache key of a body's measurement; None when the body could depend on where
    in the measuring file it sits (it names a measuring section, `.lfb.N`)."""
    text = "\n".join(statements)
    return None if ".lfb" in text else text


# ---------------------------------------------------------------- the key


def loaded_modules() -> list[str]:
    """The linkfix modules this process has loaded, as paths relative to the package."""
    names = set()
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)
        if (name == "linkfix" or name.startswith("linkfix.")) and path:
            rel = os.path.relpath(os.path.abspath(path), _PACKAGE)
            if not rel.startswith(".."):
                names.add(rel)
    return sorted(names)


def toolchain_digest(assembler: str, version: str, modules: tuple[str, ...] | list[str]
                     ) -> str:
    """Everything but the spec that decides gen-stubs' output; `modules`: the linkfix
    modules (paths relative to the package) whose source counts."""
    key = {
        "format": VERSION.decode(),
        "linkfix": __version__,
        "sources": _sources_digest(modules),
        "python": sys.version,
        "libraries": {m: _library_id(m, d) for m, d in LIBRARIES.items()},
        "assembler": [assembler, os.path.realpath(assembler), version],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _sources_digest(modules: tuple[str, ...] | list[str]) -> str:
    """linkfix's modules, the templates and the linker script, by name and bytes."""
    h = hashlib.sha256()
    files = [os.path.join(_PACKAGE, n) for n in sorted(modules)]
    for d in DATA_DIRS:
        try:
            names = sorted(os.listdir(os.path.join(_ROOT, d)))
        except OSError:
            names = []
        files += [os.path.join(_ROOT, d, n) for n in names]
    for path in files:
        try:
            data = read_regular(path)
        except OSError:
            continue  # a directory, or vanished: its absence is in the digest
        name = os.path.relpath(path, _ROOT).encode()
        h.update(b"%d:%s%d:" % (len(name), name, len(data)))
        h.update(data)
    return h.hexdigest()


def _library_id(module: str, dist: str) -> str:
    """Where `module` would be imported from and its installed version, without
    importing it (the first sys.path entry holding it, as the import system finds it)."""
    for d in sys.path:
        base = os.path.abspath(d or ".")
        pkg = os.path.join(base, module)
        init = os.path.join(pkg, "__init__.py")
        if not (os.path.isdir(pkg) or os.path.isfile(pkg + ".py")):
            continue
        try:
            st = os.stat(init if os.path.isdir(pkg) else pkg + ".py")
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "-"
        try:
            entries = os.listdir(base)
        except OSError:
            entries = []
        infos = sorted(e for e in entries if e.endswith((".dist-info", ".egg-info"))
                       and e.split("-", 1)[0].lower().replace(".", "_") == dist)
        return f"{pkg} {stamp} {','.join(infos)}"
    return "not found"


# ---------------------------------------------------------------- the file


def encode(payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return b"%s %s sha256=%s\n" % (MAGIC, VERSION, hashlib.sha256(body).hexdigest().encode()) \
        + body


def load(path: str) -> Record | None:
    """The cache file at `path`, or None if it is missing or not one to trust."""
    try:
        data = read_regular(path)
    except OSError:
        return None
    head, sep, body = data.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 3 or parts[:2] != [MAGIC, VERSION] \
            or parts[2] != b"sha256=" + hashlib.sha256(body).hexdigest().encode():
        return None
    try:
        return _record(json.loads(body))
    except (ValueError, TypeError, KeyError, RecursionError):
        return None


def write(path: str, data: bytes) -> str | None:
    """Replace `path` by `data` atomically; returns the reason it failed, or None."""
    remove_stale(path)
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        discard(tmp)
        return exc.strerror or str(exc)
    except BaseException:
        discard(tmp)
        raise
    return None


def _is_int(x: object) -> bool:
    return type(x) is int


def _str_list(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _module_path(name: str) -> bool:
    """A module path as loaded_modules writes it: `x.py` or `sub/x.py`, inside the package."""
    parts = name.split("/")
    return name.endswith(".py") and len(parts) <= 2 and all(
        p and p not in (".", "..") and "\\" not in p for p in parts)


def _record(obj: Any) -> Record | None:
    if not isinstance(obj, dict):
        return None
    outputs, rep, bodies, modules = obj["outputs"], obj["report"], obj["bodies"], obj["modules"]
    if not (_str_list(modules) and all(_module_path(n) for n in modules)):
        return None
    if not (isinstance(obj["toolchain"], str) and isinstance(obj["spec"], str)
            and isinstance(obj["arch"], str) and isinstance(bodies, dict)
            and isinstance(outputs, dict) and outputs and isinstance(rep, dict)):
        return None
    for name, digest in outputs.items():
        if os.path.basename(name) != name or name in ("", ".", "..", CACHE_NAME) \
                or not isinstance(digest, str):
            return None
    notes = rep["notes"]
    if not (isinstance(notes, list) and all(_str_list(n) and len(n) == 3 for n in notes)
            and _str_list(rep["sizes"]) and _is_int(rep["ops"]) and _is_int(rep["backends"])):
        return None
    report = Report(tuple((n[0], n[1], n[2]) for n in notes), tuple(rep["sizes"]),
                    rep["ops"], rep["backends"])
    return Record(obj["toolchain"], tuple(modules), obj["spec"], obj["arch"], bodies, outputs,
                  report)


def _encode(m: Measured) -> dict[str, Any]:
    return {"code": m.code.hex(), "relocs": [[r.offset, r.type, r.symbol, r.addend]
                                             for r in m.relocs],
            "ks_length": m.ks_length, "ks_note": m.ks_note}


def _decode(entry: Any) -> Measured | None:
    from linkfix.stubgen.bodycheck import Reloc
    from linkfix.stubgen.measure import Measured

    try:
        code = bytes.fromhex(entry["code"])
        relocs = entry["relocs"]
        ks_length, ks_note = entry["ks_length"], entry["ks_note"]
        if len(code) > MAX_BODY or not isinstance(relocs, list) \
                or not (ks_length is None or _is_int(ks_length)) \
                or not (ks_note is None or isinstance(ks_note, str)):
            return None
        out: list[Reloc] = []
        for r in relocs:
            if not (isinstance(r, list) and len(r) == 4 and _is_int(r[0]) and _is_int(r[1])
                    and isinstance(r[2], str) and _is_int(r[3]) and 0 <= r[0] < len(code)):
                return None
            out.append(Reloc(r[0], r[1], r[2], r[3]))
    except (TypeError, KeyError, ValueError):
        return None
    return Measured(code=code, relocs=tuple(out), ks_length=ks_length, ks_note=ks_note)
