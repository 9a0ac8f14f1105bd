"""Atomic, change-aware file output.

Every output is written to a unique temporary file in the destination's
directory and renamed over it, so a reader (or a crash, or a parallel make job)
never sees half a file.
"""

from __future__ import annotations

import os
import tempfile

from linkfix.errors import BadInput


def write_atomic(path: str, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` atomically, with permission bits `mode` if given."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".linkfix-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise BadInput(path, f"cannot create output: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if mode is not None:
            os.chmod(tmp, mode & 0o7777)
        else:
            # mkstemp creates 0600; give the file the usual umask-derived mode.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise BadInput(path, f"cannot write output: {exc.strerror}") from None
    except BaseException:
        _discard(tmp)
        raise


def write_if_changed(path: str, data: bytes) -> bool:
    """Kbuild's filechk habit: leave an identical file (and its mtime) alone.

    Returns True when the file was (re)written.
    """
    try:
        with open(path, "rb") as old:
            if old.read() == data:
                return False
    except OSError:
        pass
    write_atomic(path, data)
    return True


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass
