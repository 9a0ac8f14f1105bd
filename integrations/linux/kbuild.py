#!/usr/bin/env python3
"""Build and boot Debian's linux-source-6.1 in the configurations of issue 10.

Python 3.11 standard library only, so that it runs with the system python3 before any
venv exists. Everything it makes lives in one cache directory (``--cache``, default
``${LINKFIX_LINUX_CACHE:-$HOME/.cache/linkfix-linux}``):

    src/linux-source-6.1/          the unpacked tarball (stamp: .linkfix-tarball.sha256)
    build/<config>-<variant>/      one O= build tree per config and variant
    out/<config>-<variant>/        build.log, objtool-warnings.txt, initramfs.cpio,
                                   boot.log, config-checks.txt, summary.json
    modules/<config>-<variant>/    copies of the test modules, built against that tree

Every step is incremental: a second ``run`` with nothing changed unpacks nothing,
reconfigures nothing and makes nothing (make still walks the tree; the README says
how long that takes). See integrations/linux/README.md for the commands.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
TREE_NAME = "linux-source-6.1"  # the tarball's top directory
STAMP = ".linkfix-tarball.sha256"

# Debian package -> why it is needed. dwarves (pahole) only matters for
# DEBUG_INFO_BTF, which no config here enables.
APT_PACKAGES = {
    "linux-source-6.1": "the kernel source tarball",
    "build-essential": "gcc, make",
    "flex": "Kconfig lexer",
    "bison": "Kconfig parser",
    "bc": "kernel/time/timeconst.bc",
    "libelf-dev": "objtool, sorttable",
    "libssl-dev": "scripts/sign-file, extract-cert",
    "cpio": "kernel/gen_kheaders.sh (and people reading our initramfs)",
    "xz-utils": "unpacking the tarball",
    "busybox-static": "the initramfs /init",
    "qemu-system-x86": "booting the images",
}
BUSYBOX = Path("/bin/busybox")

# ---------------------------------------------------------------------------
# Configurations (see ../shared/notes/linux-trial.md, issue 10 point 4)
# ---------------------------------------------------------------------------

# Config A of the trial notes: tinyconfig plus a serial console.
CONSOLE = ["64BIT", "PRINTK", "TTY", "SERIAL_8250", "SERIAL_8250_CONSOLE", "EARLY_PRINTK"]
# What every config here needs on top: modules, an initramfs with a busybox /init, and
# /proc/kallsyms with data symbols too (KALLSYMS_ALL: the KASLR offset, and where the
# running kernel has its init memory and the linkfix tables). /init ends with
# `reboot -f`, which QEMU's -no-reboot turns into an exit: no ACPI (and so no PCI) is
# needed to stop the machine, which keeps a first build of each config about a fifth
# shorter (ACPI alone was 207 of the 997 objects).
HARNESS = [
    "MODULES", "MODULE_UNLOAD", "BLK_DEV_INITRD", "RD_GZIP", "DEVTMPFS", "BINFMT_ELF",
    "BINFMT_SCRIPT", "PROC_FS", "SYSFS", "KALLSYMS", "KALLSYMS_ALL",
]
HARNESS_REQUIRE: list[str] = []


@dataclass(frozen=True)
class KConfig:
    name: str
    what: str
    enable: list[str]
    disable: list[str] = field(default_factory=list)
    # options olddefconfig must leave at y (beyond everything in enable), and options
    # it must leave unset (beyond everything in disable)
    require_y: list[str] = field(default_factory=list)
    require_n: list[str] = field(default_factory=list)
    kaslr: bool = False


CONFIGS = {
    "B": KConfig(
        "B",
        "ORC, mitigations (retpoline, rethunk, untrain-ret, SRSO), IBT, KASLR, DEBUG_ENTRY",
        enable=CONSOLE + HARNESS + [
            "UNWINDER_ORC", "CPU_MITIGATIONS", "RETPOLINE", "RETHUNK", "CPU_UNRET_ENTRY",
            "CPU_SRSO", "X86_KERNEL_IBT", "RELOCATABLE", "RANDOMIZE_BASE", "DEBUG_ENTRY",
        ],
        disable=["UNWINDER_GUESS", "UNWINDER_FRAME_POINTER"],
        require_y=HARNESS_REQUIRE + ["OBJTOOL", "NOINSTR_VALIDATION", "X86_NEED_RELOCS"],
        require_n=["FRAME_POINTER"],
        kaslr=True,
    ),
    "C": KConfig(
        "C",
        "frame pointers, objtool stack validation",
        enable=CONSOLE + HARNESS + ["UNWINDER_FRAME_POINTER", "STACK_VALIDATION"],
        disable=["UNWINDER_GUESS", "UNWINDER_ORC"],
        require_y=HARNESS_REQUIRE + ["FRAME_POINTER", "OBJTOOL"],
        require_n=["RELOCATABLE", "RANDOMIZE_BASE", "X86_KERNEL_IBT", "RETHUNK"],
    ),
}

MARKER = "linkfix-init: started"
DONE = "linkfix-init: done"
POWER_DOWN = "reboot: Restarting system"

# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[kbuild] {msg}", flush=True)


class Fail(Exception):
    pass


def nice_cmd(cmd: list[str], nice: int) -> list[str]:
    return ["nice", "-n", str(nice), *cmd] if nice else cmd


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def default_cache() -> Path:
    env = os.environ.get("LINKFIX_LINUX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "linkfix-linux"


# ---------------------------------------------------------------------------
# step 1: packages
# ---------------------------------------------------------------------------


def missing_packages() -> list[str]:
    missing = []
    for pkg in APT_PACKAGES:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                           capture_output=True, text=True)
        if r.returncode != 0 or "install ok installed" not in r.stdout:
            missing.append(pkg)
    return missing


def ensure_packages() -> None:
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise Fail(f"missing Debian packages {' '.join(missing)}: run as root, or "
                   f"apt-get install -y {' '.join(missing)}")
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL)
        run(cmd, env=env, stdout=subprocess.DEVNULL)
    if still := missing_packages():
        raise Fail(f"apt-get did not install {' '.join(still)}")


# ---------------------------------------------------------------------------
# step 2: the source tree, unpacked once
# ---------------------------------------------------------------------------


def pristine_tree(cache: Path) -> Path:
    return cache / "src" / TREE_NAME


def ensure_tree(cache: Path, tarball: Path = TARBALL) -> tuple[Path, str]:
    """Unpack tarball into cache/src once; return (tree, sha256 of the tarball).

    The tree only ever appears under its final name complete, with its stamp: it is
    unpacked into a temporary directory beside it, stamped, then renamed. A tree whose
    stamp is missing or names another tarball is replaced.
    """
    if not tarball.is_file():
        raise Fail(f"{tarball} not found (apt-get install linux-source-6.1)")
    src = cache / "src"
    src.mkdir(parents=True, exist_ok=True)
    for stale in list(src.glob(".unpack-*")) + list(src.glob(".old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    digest = sha256_file(tarball)
    tree = src / TREE_NAME
    stamp = tree / STAMP
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return tree, digest
    if tree.exists():
        log(f"{tree}: stamp missing or for another tarball, unpacking again")
    else:
        log(f"unpacking {tarball} into {src}")
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=src))
    run(["tar", "-C", str(tmp), "-xf", str(tarball)])
    new = tmp / TREE_NAME
    if not (new / "Makefile").is_file():
        raise Fail(f"{tarball} has no {TREE_NAME}/Makefile")
    (new / STAMP).write_text(digest + "\n")
    if tree.exists():
        old = Path(tempfile.mkdtemp(prefix=".old-", dir=src))
        os.replace(tree, old / TREE_NAME)
        os.replace(new, tree)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, tree)
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"unpacked in {time.monotonic() - t0:.1f} s")
    return tree, digest


def tree_id(srctree: Path) -> str:
    """What a build tree depends on of its source tree: its stamp, or for a tree we
    did not unpack (a patched copy), its path."""
    stamp = srctree / STAMP
    ident = stamp.read_text().strip() if stamp.is_file() else "unstamped"
    return f"{srctree.resolve()} {ident}"


# ---------------------------------------------------------------------------
# step 3: configuration
# ---------------------------------------------------------------------------


@dataclass
class Build:
    config: KConfig
    variant: str
    cache: Path
    srctree: Path
    extra_opts: list[str] = field(default_factory=list)  # scripts/config arguments
    extra_require: list[str] = field(default_factory=list)  # NAME=value checks
    make_vars: list[str] = field(default_factory=list)
    jobs: int = 2
    nice: int = 10

    @property
    def name(self) -> str:
        return f"{self.config.name}-{self.variant}"

    @property
    def builddir(self) -> Path:
        return self.cache / "build" / self.name

    @property
    def outdir(self) -> Path:
        return self.cache / "out" / self.name

    def make(self, *targets: str, capture: Path | None = None,
             verbose: bool = False) -> float:
        cmd = nice_cmd(["make", "-C", str(self.srctree), f"O={self.builddir}",
                        f"-j{self.jobs}", *self.make_vars, *targets], self.nice)
        t0 = time.monotonic()
        if capture is None:
            run(cmd, stdout=subprocess.DEVNULL if not verbose else None)
        else:
            with open(capture, "w") as logf:
                p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace")
                assert p.stdout is not None
                for line in p.stdout:
                    logf.write(line)
                    if verbose:
                        sys.stdout.write(line)
                rc = p.wait()
            if rc != 0:
                tail = capture.read_text(errors="replace").splitlines()[-40:]
                raise Fail(f"make {' '.join(targets)} failed ({rc}), see {capture}:\n"
                           + "\n".join(tail))
        return time.monotonic() - t0


def config_args(cfg: KConfig, extra: list[str]) -> list[str]:
    args: list[str] = []
    for opt in cfg.enable:
        args += ["-e", opt]
    for opt in cfg.disable:
        args += ["-d", opt]
    return args + extra


def read_config(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"(CONFIG_\w+)=(.*)", line):
            values[m.group(1)] = m.group(2)
        elif m := re.match(r"# (CONFIG_\w+) is not set", line):
            values[m.group(1)] = "n"
    return values


def check_config(b: Build) -> list[str]:
    """Return the check lines; raise Fail listing every option olddefconfig dropped."""
    values = read_config(b.builddir / ".config")
    wanted: list[tuple[str, str]] = []
    for opt in b.config.enable + b.config.require_y:
        wanted.append((opt, "y"))
    for opt in b.config.disable + b.config.require_n:
        wanted.append((opt, "n"))
    it = iter(b.extra_opts)
    for a in it:  # scripts/config -e/-d/-m/--set-val given for a variant
        if a in ("-e", "--enable"):
            wanted.append((next(it), "y"))
        elif a in ("-d", "--disable"):
            wanted.append((next(it), "n"))
        elif a in ("-m", "--module"):
            wanted.append((next(it), "m"))
        elif a == "--set-val":
            wanted.append((next(it), next(it)))
        elif a == "--set-str":
            wanted.append((next(it), '"' + next(it) + '"'))
    for req in b.extra_require:
        k, _, v = req.partition("=")
        wanted.append((k.removeprefix("CONFIG_"), v))
    lines, bad = [], []
    seen = set()
    for opt, want in wanted:
        if (opt, want) in seen:
            continue
        seen.add((opt, want))
        have = values.get("CONFIG_" + opt, "n")
        ok = have == want
        lines.append(f"{'ok ' if ok else 'BAD'} CONFIG_{opt}={have} (want {want})")
        if not ok:
            bad.append(f"CONFIG_{opt}={have}, wanted {want}")
    if bad:
        raise Fail(f"{b.builddir}/.config: olddefconfig did not keep what config "
                   f"{b.config.name} asks for:\n  " + "\n  ".join(bad))
    return lines


def ensure_config(b: Build) -> bool:
    """Make b.builddir/.config unless it exists for the same source and options.
    Returns True if it was (re)made."""
    bd = b.builddir
    want_src = tree_id(b.srctree)
    src_stamp = bd / ".linkfix-srctree"
    if bd.exists() and (not src_stamp.is_file() or src_stamp.read_text() != want_src):
        log(f"{bd}: built from another source tree or half made, starting it again")
        shutil.rmtree(bd)
    bd.mkdir(parents=True, exist_ok=True)
    write_atomic(src_stamp, want_src)
    args = config_args(b.config, b.extra_opts)
    fragment = json.dumps({"args": args, "require": b.extra_require}, sort_keys=True)
    frag_stamp = bd / ".linkfix-config-args"
    b.outdir.mkdir(parents=True, exist_ok=True)
    if (bd / ".config").is_file() and frag_stamp.is_file() \
            and frag_stamp.read_text() == fragment:
        (b.outdir / "config-checks.txt").write_text("\n".join(check_config(b)) + "\n")
        return False
    log(f"{b.name}: tinyconfig + {len(args) // 2} options + olddefconfig")
    frag_stamp.unlink(missing_ok=True)
    b.make("tinyconfig")
    run([str(b.srctree / "scripts" / "config"), "--file", str(bd / ".config"), *args])
    b.make("olddefconfig")
    lines = check_config(b)
    (b.outdir / "config-checks.txt").write_text("\n".join(lines) + "\n")
    shutil.copyfile(bd / ".config", b.outdir / "config")
    write_atomic(frag_stamp, fragment)
    return True


# ---------------------------------------------------------------------------
# step 4: build, and the objtool warnings of the build
# ---------------------------------------------------------------------------

# "  CC      kernel/fork.o", "  LD [M]  fs/foo.ko", "  OBJTOOL vmlinux.o" ...
QUIET = re.compile(r"^  ([A-Z][A-Z0-9_]*)(?: \[M\])?\s+(\S+)\s*$")
OBJTOOL_WARN = re.compile(r"^(?P<obj>\S+?): warning: objtool: (?P<msg>.*)$")


def normalise_warning(line: str, strip: list[str]) -> str:
    for s in strip:
        line = line.replace(s.rstrip("/") + "/", "")
    return line.rstrip()


def warnings_db(b: Build) -> Path:
    return b.builddir / ".linkfix-objtool-warnings.json"


def update_warnings(db_path: Path, buildlog: Path, strip: list[Path]) -> list[str]:
    """Merge the objtool warnings of this build log into those of earlier builds.

    An incremental build only re-runs objtool on what it rebuilds, so the warnings of
    a tree are kept per object in db_path: an object that this log rebuilt (a quiet
    command line names it) loses its old warnings and gets this log's. Paths in
    strip (build and source directories) are removed from the lines, addresses and
    offsets are kept; the result is sorted.
    """
    prefixes = sorted({str(p) for d in strip for p in (d, d.resolve())}, key=len,
                      reverse=True)
    db: dict[str, list[str]] = json.loads(db_path.read_text()) if db_path.is_file() else {}
    rebuilt: set[str] = set()
    found: dict[str, list[str]] = {}
    for raw in buildlog.read_text(errors="replace").splitlines():
        if m := QUIET.match(raw):
            rebuilt.add(normalise_warning(m.group(2), prefixes))
        if m := OBJTOOL_WARN.match(raw):
            line = normalise_warning(raw, prefixes)
            obj = line.split(": warning: objtool:", 1)[0]
            found.setdefault(obj, []).append(line)
    for obj in rebuilt | set(found):
        db.pop(obj, None)
    for obj, lines in found.items():
        db[obj] = lines
    write_atomic(db_path, json.dumps(db, indent=1, sort_keys=True))
    return sorted(line for lines in db.values() for line in lines)


def build(b: Build, verbose: bool = False) -> dict:
    ensure_config(b)
    bd = b.builddir
    first = not (bd / "vmlinux").is_file()
    buildlog = b.outdir / "build.log"
    log(f"{b.name}: make -j{b.jobs} ({'full' if first else 'incremental'}) in {bd}")
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = b.make("all", capture=buildlog, verbose=verbose)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    log(f"{b.name}: make took {wall:.1f} s ({cpu:.0f} s of CPU)")
    warnings = update_warnings(warnings_db(b), buildlog, [b.builddir, b.srctree])
    (b.outdir / "objtool-warnings.txt").write_text("".join(w + "\n" for w in warnings))
    log(f"{b.name}: {len(warnings)} objtool warning(s)")
    return {"make_wall_s": round(wall, 2), "make_cpu_s": round(cpu, 1), "full_build": first,
            "objtool_warnings": len(warnings)}


def build_modules(b: Build, modsrcs: list[Path]) -> list[Path]:
    """Build each external module directory against b's tree; return the .ko files.

    6.1 writes M= output into the module's own directory, so each module is copied
    into cache/modules/<build>/<name> first (sources left alone)."""
    kos: list[Path] = []
    for src in modsrcs:
        dst = b.cache / "modules" / b.name / src.name
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file():
                target = dst / f.name
                if not target.exists() or target.read_bytes() != f.read_bytes():
                    shutil.copyfile(f, target)
        modlog = b.outdir / f"module-{src.name}.log"
        cmd = nice_cmd(["make", "-C", str(b.builddir), f"M={dst}", f"-j{b.jobs}",
                        *b.make_vars, "modules"], b.nice)
        with open(modlog, "w") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise Fail(f"module {src.name} did not build, see {modlog}")
        warns = update_warnings(dst / ".linkfix-objtool-warnings.json", modlog,
                                [dst, b.builddir, b.srctree])
        (b.outdir / f"module-{src.name}-objtool-warnings.txt").write_text(
            "".join(w + "\n" for w in warns))
        if warns:
            log(f"{b.name}: module {src.name}: {len(warns)} objtool warning(s)")
        kos += sorted(dst.glob("*.ko"))
    return kos


# ---------------------------------------------------------------------------
# step 5: the initramfs
# ---------------------------------------------------------------------------

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "@MARKER@"
echo "linkfix-init: cmdline: $(cat /proc/cmdline)"
grep -E ' (_text|_stext|start_kernel)$' /proc/kallsyms | sed 's/^/linkfix-init: kallsyms: /'
grep -E ' (__init_begin|__init_end|__linkfix_[a-z]+_(start|end)|__alt_instructions(_end)?)$' \
    /proc/kallsyms | sed 's/^/linkfix-init: init-symbol: /'
for ko in /lib/modules/*.ko; do
    [ -e "$ko" ] || continue
    name=$(basename "$ko" .ko)
    dmesg -c >/dev/null
    insmod "$ko"
    echo "linkfix-init: insmod $name rc=$?"
    dmesg -c | sed "s/^/linkfix-init: dmesg $name: /"
    rmmod "$name"
    echo "linkfix-init: rmmod $name rc=$?"
    dmesg -c | sed "s/^/linkfix-init: dmesg $name: /"
done
if [ -r /proc/linkfix ]; then
    sed 's/^/linkfix-init: counter: /' /proc/linkfix
fi
echo "@DONE@"
reboot -f
""".replace("@MARKER@", MARKER).replace("@DONE@", DONE)


def cpio_newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """entries: (name, mode, data, rdev). A deterministic newc archive (no root needed
    for device nodes), ending with the TRAILER!!! record."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(
            [*entries, ("TRAILER!!!", 0, b"", 0)], start=1):
        nb = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0,
                  os.major(rdev), os.minor(rdev), len(nb), 0]
        out += b"070701" + b"".join(b"%08X" % v for v in fields)
        out += nb
        pad4()
        out += data
        pad4()
    return bytes(out)


def make_initramfs(dest: Path, kos: list[Path]) -> Path:
    D, F, X = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    entries: list[tuple[str, int, bytes, int]] = [
        ("bin", D, b"", 0), ("dev", D, b"", 0),
        ("dev/console", stat.S_IFCHR | 0o600, b"", os.makedev(5, 1)),
        ("proc", D, b"", 0), ("sys", D, b"", 0), ("tmp", D, b"", 0),
        ("lib", D, b"", 0), ("lib/modules", D, b"", 0),
        ("bin/busybox", X, BUSYBOX.read_bytes(), 0),
        ("init", X, INIT.encode(), 0),
    ]
    for ko in kos:
        entries.append((f"lib/modules/{ko.name}", F, ko.read_bytes(), 0))
    write_atomic(dest, cpio_newc(entries))
    return dest


# ---------------------------------------------------------------------------
# step 6: boot
# ---------------------------------------------------------------------------


KVM_PROBE_S = 20  # a kernel that prints nothing in this long under kvm: kvm is broken


def kvm_stamp(cache: Path) -> tuple[Path, str]:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.split("\n", 1)[0]
    return cache / "kvm-broken", f"{os.uname().release} {qemu}"


def kvm_usable(cache: Path) -> bool:
    """/dev/kvm opens, and no earlier boot found kvm unable to run a kernel here (a
    nested kvm can exist and still never get past the BIOS)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    stamp, ident = kvm_stamp(cache)
    return not (stamp.is_file() and stamp.read_text().strip() == ident)


def run_qemu(cmd: list[str], bootlog: Path, probe_s: float | None) -> tuple[int | None, float]:
    """Run cmd with its output in bootlog. With probe_s, give up (return None) if the
    kernel has not printed its banner after that many seconds."""
    t0 = time.monotonic()
    with open(bootlog, "wb") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        while p.poll() is None:
            time.sleep(0.1)
            if probe_s is not None and time.monotonic() - t0 > probe_s:
                if b"Linux version" not in bootlog.read_bytes():
                    p.terminate()
                    p.wait()
                    return None, time.monotonic() - t0
                probe_s = None
    return p.returncode, time.monotonic() - t0


def system_map(builddir: Path) -> dict[str, int]:
    syms = {}
    for line in (builddir / "System.map").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms.setdefault(parts[2], int(parts[0], 16))
    return syms


def boot(b: Build, initrd: Path, append: str = "", accel: str = "auto",
         timeout: int = 120, tag: str = "boot", expect_modules: list[str] = (),
         qemu_args: list[str] = ()) -> dict:
    auto = accel == "auto"
    if auto:
        accel = "kvm" if kvm_usable(b.cache) else "tcg"
    bzimage = b.builddir / "arch" / "x86" / "boot" / "bzImage"
    cmdline = " ".join(["console=ttyS0 earlyprintk=serial panic=-1", append]).strip()
    bootlog = b.outdir / f"{tag}.log"
    fallback = None
    while True:
        cmd = ["timeout", str(timeout), "qemu-system-x86_64", "-accel", accel, "-m", "256",
               "-nographic", "-no-reboot", "-kernel", str(bzimage), "-initrd", str(initrd),
               "-append", cmdline, *qemu_args]
        log(f"{b.name}: booting ({accel})")
        rc, wall = run_qemu(cmd, bootlog, KVM_PROBE_S if auto and accel == "kvm" else None)
        if rc is not None:
            break
        first = (bootlog.read_text(errors="replace").strip().splitlines() or ["no output"])[0]
        fallback = (f"kvm: no kernel banner after {KVM_PROBE_S} s (qemu said: {first}); "
                    f"tcg from now on (remove {kvm_stamp(b.cache)[0]} to try kvm again)")
        log(f"{b.name}: {fallback}")
        stamp, ident = kvm_stamp(b.cache)
        write_atomic(stamp, ident + "\n")
        accel = "tcg"
    text = bootlog.read_text(errors="replace").replace("\r", "")
    lines = text.splitlines()
    reasons = []
    if rc == 124:
        reasons.append(f"timed out after {timeout} s")
    elif rc != 0:
        reasons.append(f"qemu exit status {rc}")
    if MARKER not in lines:
        reasons.append(f"no marker line {MARKER!r}")
    if DONE not in lines:
        reasons.append(f"/init did not reach {DONE!r}")
    if not any(POWER_DOWN in ln for ln in lines):
        reasons.append(f"no {POWER_DOWN!r}: /init did not end the machine")
    for bad in ("Kernel panic", "BUG:", "Oops", "WARNING:", "general protection"):
        if bad in text:
            reasons.append(f"log has {bad!r}")
    modules = {}
    for name in expect_modules:
        ins = f"linkfix-init: insmod {name} rc=0"
        rm = f"linkfix-init: rmmod {name} rc=0"
        dm = [ln.split(": ", 2)[-1] for ln in lines
              if ln.startswith(f"linkfix-init: dmesg {name}: ")]
        modules[name] = {"insmod": ins in lines, "rmmod": rm in lines, "dmesg": dm}
        if ins not in lines:
            reasons.append(f"insmod {name} failed")
        if rm not in lines:
            reasons.append(f"rmmod {name} failed")
    # KASLR: /proc/kallsyms (what the running kernel says) against System.map
    smap = system_map(b.builddir)
    offsets = {}
    for ln in lines:
        if m := re.match(r"linkfix-init: kallsyms: ([0-9a-f]+) \w (\w+)$", ln):
            offsets[m.group(2)] = int(m.group(1), 16) - smap[m.group(2)]
    kaslr = None
    if not offsets:
        reasons.append("no /proc/kallsyms lines")
    elif len(set(offsets.values())) != 1:
        reasons.append(f"kallsyms offsets disagree: {offsets}")
    else:
        kaslr = next(iter(offsets.values()))
        if b.config.kaslr and "nokaslr" not in cmdline and kaslr == 0:
            reasons.append("KASLR: kernel runs at its link address")
        if not b.config.kaslr and kaslr != 0:
            reasons.append(f"kernel moved by {kaslr:#x} without KASLR")
    res = {"result": "pass" if not reasons else "fail", "reasons": reasons,
           "wall_s": round(wall, 2), "accel": accel, "cmdline": cmdline,
           "kvm_fallback": fallback, "qemu_rc": rc,
           "kaslr_offset": None if kaslr is None else hex(kaslr),
           "modules": modules, "log": str(bootlog), "command": shlex.join(cmd)}
    log(f"{b.name}: boot {res['result']} in {wall:.1f} s"
        + (f", KASLR offset {kaslr:#x}" if kaslr else "")
        + ("" if not reasons else ": " + "; ".join(reasons)))
    return res


# ---------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------


def orc_summary(vmlinux: Path) -> dict | None:
    sys.path.insert(0, str(HERE))
    try:
        import orc  # noqa: PLC0415
    finally:
        sys.path.pop(0)
    try:
        t = orc.OrcTable.from_file(vmlinux)
    except orc.OrcError:
        return None
    return {"entries": len(t), "orc_unwind_ip_bytes": 4 * len(t),
            "orc_unwind_bytes": 6 * len(t), "sorted": t.is_sorted()}


def sizes(vmlinux: Path) -> dict:
    r = subprocess.run(["size", "-A", str(vmlinux)], capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0].startswith(".") and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def write_summary(b: Build, result: dict) -> Path:
    vml = b.builddir / "vmlinux"
    sec = sizes(vml) if vml.is_file() else {}
    summary = {
        "config": b.config.name, "variant": b.variant, "what": b.config.what,
        "srctree": str(b.srctree), "builddir": str(b.builddir),
        "make_vars": b.make_vars, "extra_config": b.extra_opts,
        **result,
        "warnings_file": str(b.outdir / "objtool-warnings.txt"),
        "text_bytes": sec.get(".text"),
        "orc": orc_summary(vml) if vml.is_file() else None,
        "bzImage_bytes": (b.builddir / "arch/x86/boot/bzImage").stat().st_size
        if (b.builddir / "arch/x86/boot/bzImage").is_file() else None,
    }
    path = b.outdir / "summary.json"
    write_atomic(path, json.dumps(summary, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def make_builds(args, srctree: Path) -> list[Build]:
    out = []
    for c in args.configs.split(","):
        c = c.strip().upper()
        if c not in CONFIGS:
            raise Fail(f"unknown config {c!r} (have {', '.join(CONFIGS)})")
        out.append(Build(CONFIGS[c], args.variant, args.cache, srctree,
                         extra_opts=shlex.split(args.config_opts or ""),
                         extra_require=args.require or [],
                         make_vars=args.make_var or [], jobs=args.jobs, nice=args.nice))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", nargs="?", default="run",
                   choices=["deps", "unpack", "config", "build", "boot", "run"],
                   help="run (default) = deps, unpack, config, build, boot, summary")
    p.add_argument("--configs", default="B,C", help="comma-separated: B, C (default B,C)")
    p.add_argument("--variant", default="baseline",
                   help="build variant name: build/<config>-<variant> (default baseline)")
    p.add_argument("--cache", type=Path, default=default_cache())
    p.add_argument("--srctree", type=Path,
                   help="build this (e.g. patched) tree instead of the pristine one")
    p.add_argument("--config-opts", help="extra scripts/config arguments, e.g. '-e LINKFIX'")
    p.add_argument("--require", action="append", help="extra .config check NAME=value")
    p.add_argument("--make-var", action="append", help="extra make variable, VAR=value")
    p.add_argument("--module", action="append", type=Path, default=None,
                   help="external module dir to build and insmod at boot "
                        "(default: integrations/linux/modules/*)")
    p.add_argument("--no-modules", action="store_true")
    p.add_argument("--ko", action="append", type=Path, default=[],
                   help="an already built .ko to put in the initramfs and insmod")
    p.add_argument("--append", default="", help="extra kernel command line")
    p.add_argument("--boot-tag", default="boot", help="name of the boot log (boot.log)")
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    p.add_argument("--timeout", type=int, default=120)
    p.add_argument("--jobs", "-j", type=int, default=2)
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--verbose", "-v", action="store_true", help="show make's output")
    args = p.parse_args(argv)
    args.cache = args.cache.expanduser().resolve()
    try:
        t_all = time.monotonic()
        ensure_packages()
        if args.step == "deps":
            return 0
        tree, _digest = ensure_tree(args.cache)
        if args.step == "unpack":
            print(tree)
            return 0
        srctree = args.srctree.resolve() if args.srctree else tree
        failed = False
        for b in make_builds(args, srctree):
            t0 = time.monotonic()
            result: dict = {}
            if args.step == "config":
                ensure_config(b)
                print(b.builddir / ".config")
                continue
            if args.step in ("build", "run"):
                result.update(build(b, verbose=args.verbose))
            if args.step in ("boot", "run"):
                moddirs = [] if args.no_modules else (
                    args.module if args.module is not None
                    else sorted(d for d in (HERE / "modules").glob("*") if d.is_dir()))
                kos = build_modules(b, moddirs) + [k.resolve() for k in args.ko]
                initrd = make_initramfs(b.outdir / "initramfs.cpio", kos)
                result["boot"] = boot(b, initrd, append=args.append, accel=args.accel,
                                      timeout=args.timeout, tag=args.boot_tag,
                                      expect_modules=[k.stem for k in kos])
                failed |= result["boot"]["result"] != "pass"
            if args.step == "boot":
                # keep the build figures of the last build, replace the boot
                old = b.outdir / "summary.json"
                prev = json.loads(old.read_text()) if old.is_file() else {}
                for k in ("make_wall_s", "make_cpu_s", "full_build", "objtool_warnings"):
                    if k in prev:
                        result.setdefault(k, prev[k])
            result["wall_s"] = round(time.monotonic() - t0, 2)
            log(f"{b.name}: summary {write_summary(b, result)}")
        log(f"total {time.monotonic() - t_all:.1f} s")
        return 1 if failed else 0
    except Fail as e:
        print(f"kbuild: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
