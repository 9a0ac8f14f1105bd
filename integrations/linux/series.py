#!/usr/bin/env python3
"""Apply integrations/linux/patches/ to a copy of the pristine linux-source-6.1 tree.

    series.py [--cache DIR]          # prints the patched tree's path

The copy is src/linux-linkfix in the cache (hard links to the pristine tree, `cp -al`;
every file a patch touches is first replaced by a private copy, so the pristine tree
is never written). It is made in a temporary directory, stamped with the series'
sha256 (.linkfix-series.sha256) once every patch applied, then renamed into place. A
changed series is applied again to a fresh copy; files whose contents did not change
keep the mtime they had, so the build tree (same path) rebuilds only what the change
touches. Standard library only.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PATCHES = HERE / "patches"
sys.path.insert(0, str(HERE))


def series_hash(patches: list[Path]) -> str:
    h = hashlib.sha256()
    for p in patches:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def touched(patch: Path) -> list[str]:
    out = []
    for line in patch.read_text(errors="replace").splitlines():
        m = re.match(r"^(?:\+\+\+|---) [ab]/(\S+)", line)
        if m:
            out.append(m.group(1))
    return out


def ensure_series(cache: Path, pristine: Path) -> Path:
    patches = sorted(PATCHES.glob("*.patch"))
    digest = series_hash(patches)
    dest = cache / "src" / "linux-linkfix"
    stamp = dest / ".linkfix-series.sha256"
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return dest
    tmp = cache / "src" / f".series-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["cp", "-al", str(pristine), str(tmp)], check=True)
    for f in sorted({f for p in patches for f in touched(p)}):
        path = tmp / f
        if path.exists():  # break the hard link before anything writes the file
            data = path.read_bytes()
            mode = path.stat().st_mode
            path.unlink()
            path.write_bytes(data)
            os.chmod(path, mode)
    for p in patches:
        subprocess.run(["patch", "-p1", "-s", "--no-backup-if-mismatch", "-d", str(tmp),
                        "-i", str(p)], check=True)
    for f in sorted({f for p in patches for f in touched(p)}):
        new, old = tmp / f, dest / f
        if new.is_file() and old.is_file() and new.read_bytes() == old.read_bytes():
            st = old.stat()
            os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    (tmp / ".linkfix-series.sha256").write_text(digest + "\n")
    if dest.exists():
        old = cache / "src" / f".old-series-{os.getpid()}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest


def main() -> int:
    import kbuild
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=kbuild.default_cache())
    args = ap.parse_args()
    pristine, _ = kbuild.ensure_tree(args.cache)
    print(ensure_series(args.cache, pristine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
