"""Part 4: how fast the post-link pass is.

Synthetic images from tests/tools/synthimage.py (`build_fast`: real linkfix tables,
a realistic mix of bodies: cli/sti, pushf/pop, %gs and RIP-relative stores,
calls, bodies with internal and outgoing jumps, empty bodies, branch sites)
with 10k, 100k and 1M sites. Each command runs as a subprocess, process start
included; the time is the median of several runs, the peak memory that of the
child (wait4's rusage, through GNU time: see `timed`).

`linkfix inspect` is measured on the same images, as text and as `--jsonl`
(stdout to /dev/null), against two targets: at most INSPECT_TIME_X times
`linkfix patch`'s time and INSPECT_MEMORY_X times the image's size in peak
memory. Beside it, *validate* is the floor inspect stands on: reading the image
as inspect does (mapped, each page handed back once read) and validating its
records, nothing else (patch validates the same way, from the image read into
memory).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from common import BENCH, BUILD, LOG, PYTHON, ROOT, BenchError, ensure_dir, linkfix_cmd, median

TARGET_1M_S = 2.0
TARGET_SPEEDUP = 10.0
INSPECT_TIME_X = 10.0  # inspect's time / patch's, same image
INSPECT_MEMORY_X = 3.0  # inspect's peak RSS / the image's size
INSPECT_FORMATS = (("text", ()), ("jsonl", ("--jsonl",)))
VALIDATE = ("import sys; from linkfix.postlink import image, tables; "
            "tables.check_records(tables.load(image.load(sys.argv[1], mapped=True)))")
NAIVE = os.path.join(BENCH, "naive_lief.py")
NAIVE_FULL = os.path.join(BENCH, "naive_capstone.py")
PYFLOOR = os.path.join(BENCH, "pyloop_floor.py")


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    peak_kb: int = 0

    @property
    def median(self) -> float | None:
        return median(self.seconds) if self.seconds else None


@dataclass
class SizeResult:
    sites: int
    image_bytes: int
    copy: Timing = field(default_factory=Timing)
    patch: Timing = field(default_factory=Timing)
    patch_lief: Timing = field(default_factory=Timing)  # LINKFIX_ELF_READER=lief
    naive: Timing = field(default_factory=Timing)
    naive_full: Timing = field(default_factory=Timing)  # lief + capstone per site
    naive_full_verify: str = "not run"
    pyfloor: Timing = field(default_factory=Timing)
    naive_extrapolated: float | None = None
    verify: str = "not run"
    # linkfix inspect, by format ("text", "jsonl"); validate: load + check_records only
    inspect: dict[str, Timing] = field(default_factory=dict)
    validate: Timing = field(default_factory=Timing)

    def inspect_time_x(self, form: str) -> float | None:
        """inspect's median time over patch's."""
        t = self.inspect.get(form)
        if t is None or t.median is None or not self.patch.median:
            return None
        return t.median / self.patch.median

    def inspect_memory_x(self, form: str) -> float | None:
        """inspect's peak RSS over the image's size."""
        t = self.inspect.get(form)
        if t is None or not t.peak_kb or not self.image_bytes:
            return None
        return t.peak_kb * 1024 / self.image_bytes


@dataclass
class PostlinkResult:
    sizes: list[SizeResult] = field(default_factory=list)
    python_start: Timing = field(default_factory=Timing)
    # python -c "import linkfix.postlink.patch"
    import_patch: Timing = field(default_factory=Timing)
    import_lief: Timing = field(default_factory=Timing)
    notes: list[str] = field(default_factory=list)
    reps: int = 0
    reps_big: int = 0


def _source_hash() -> str:
    """Images are cached; rebuild when the generator or the format changes."""
    h = hashlib.sha256()
    for rel in ("tests/tools/synthimage.py", "linkfix/layout.py", "linkfix/padding.py"):
        with open(os.path.join(ROOT, rel), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def image(n: int) -> str:
    """The synthetic image with n sites (built once per generator version)."""
    out = ensure_dir(os.path.join(BUILD, "postlink"))
    path = os.path.join(out, f"synth_{n}_{_source_hash()}.elf")
    if not os.path.exists(path):
        for old in os.listdir(out):
            if old.startswith(f"synth_{n}_"):
                os.unlink(os.path.join(out, old))
        sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
        try:
            import synthimage  # tests/tools/synthimage.py
        except ImportError as exc:
            raise BenchError(f"tests/tools/synthimage.py: cannot import: {exc}") from None
        finally:
            sys.path.pop(0)
        tmp = path + ".tmp"
        synthimage.build_fast(tmp, n, 64, seed=1)
        os.replace(tmp, path)
    LOG.comment(f"{os.path.relpath(path, ROOT)}: tests/tools/synthimage.py "
                f"build_fast(path, {n}, 64, seed=1), cached until the generator or the format "
                "changes")
    return path


GNU_TIME = "/usr/bin/time"


def timed(cmd: list[str], log: bool = True) -> tuple[float, int]:
    """Wall time of `cmd` as a child process and its peak RSS in KiB (0: unknown).

    The peak comes from GNU time (Debian package `time`): the rusage of a
    child spawned straight from this Python process reports this process's own
    peak as the child's (exec records the old address space's high-water mark,
    and a vfork child's old address space is ours).
    """
    if log:
        LOG.note(cmd)
    use_time = os.access(GNU_TIME, os.X_OK)
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as rss:
        full = [GNU_TIME, "-f", "%M", "-o", rss.name, *cmd] if use_time else cmd
        t0 = time.perf_counter()
        proc = subprocess.run(full, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            msg = err.read().decode(errors="replace").strip().splitlines()[-3:]
            raise BenchError(f"{' '.join(cmd)}: exit {proc.returncode}: {' | '.join(msg)}")
        peak = 0
        if use_time:
            text = rss.read().strip().splitlines()
            peak = int(text[-1]) if text and text[-1].isdigit() else 0
    return elapsed, peak


def _repeat(t: Timing, cmd: list[str], times: int) -> None:
    for i in range(times):
        secs, kb = timed(cmd, log=i == 0)
        t.seconds.append(secs)
        t.peak_kb = max(t.peak_kb, kb)


def _inspect(res: PostlinkResult, r: SizeResult, img: str, times: int) -> None:
    """`linkfix inspect` as text and --jsonl (stdout to /dev/null), and the
    validation floor it shares with patch."""
    try:
        _repeat(r.validate, [PYTHON, "-c", VALIDATE, img], 1)
    except BenchError as exc:
        res.notes.append(f"validation alone failed on {r.sites} sites: {exc}")
    for form, extra in INSPECT_FORMATS:
        t = r.inspect[form] = Timing()
        try:
            _repeat(t, linkfix_cmd("inspect", *extra, img), times)
        except BenchError as exc:
            res.notes.append(f"`linkfix inspect` ({form}) failed on {r.sites} sites: {exc}")


def measure(quick: bool) -> PostlinkResult:
    res = PostlinkResult()
    sizes = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)
    reps = 3 if quick else 7
    res.reps, res.reps_big = reps, 3
    out_dir = ensure_dir(os.path.join(BUILD, "postlink"))
    _repeat(res.python_start, [PYTHON, "-c", "pass"], reps)
    _repeat(res.import_patch, [PYTHON, "-c", "import linkfix.postlink.patch"], reps)
    _repeat(res.import_lief, [PYTHON, "-c", "import lief"], reps)
    naive_cap = 100_000 if quick else 1_000_000
    for n in sizes:
        img = image(n)
        r = SizeResult(n, os.path.getsize(img))
        out = os.path.join(out_dir, f"out_{n}.elf")
        big = n >= 1_000_000
        _repeat(r.copy, ["cp", img, out], reps)
        _repeat(r.pyfloor, [PYTHON, PYFLOOR, str(n)], 3 if big else reps)
        try:
            _repeat(r.patch, linkfix_cmd("patch", img, "-o", out, "--target", "native", "-q"),
                    3 if big else reps)
        except BenchError as exc:
            res.notes.append(f"`linkfix patch` failed on {n} sites: {exc}")
        try:  # the same command reading the image with lief (docs/READER.md)
            _repeat(r.patch_lief, ["env", "LINKFIX_ELF_READER=lief",
                                   *linkfix_cmd("patch", img, "-o", out, "--target", "native",
                                                "-q")], 3 if big else reps)
        except BenchError as exc:
            res.notes.append(f"`linkfix patch` with the lief reader failed on {n} sites: {exc}")
        if r.patch.seconds:
            try:
                timed(linkfix_cmd("verify", out, "--target", "native", "-q"))
                r.verify = "ok"
            except BenchError as exc:
                r.verify = f"failed: {exc}"
        _inspect(res, r, img, 3 if big else reps)
        if n <= naive_cap:
            _repeat(r.naive, [PYTHON, NAIVE, img, out, "1"], 3 if big else reps)
        if n <= naive_cap:
            _repeat(r.naive_full, [PYTHON, NAIVE_FULL, img, out, "1"], 1 if big else 3)
            # The complete naive pass must produce what linkfix verify accepts.
            try:
                timed(linkfix_cmd("verify", out, "--target", "native", "-q"))
                r.naive_full_verify = "ok"
            except BenchError as exc:
                r.naive_full_verify = f"failed: {exc}"
        res.sizes.append(r)
    # A size whose naive run was skipped gets a labelled linear extrapolation
    # from the two largest measured sizes.
    measured = [s for s in res.sizes if s.naive.seconds]
    if len(measured) >= 2:
        a, b = measured[-2], measured[-1]
        slope = (b.naive.median - a.naive.median) / (b.sites - a.sites)
        for s in res.sizes:
            if not s.naive.seconds:
                s.naive_extrapolated = b.naive.median + slope * (s.sites - b.sites)
    return res
