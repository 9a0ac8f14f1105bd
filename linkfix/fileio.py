"""Atomic, change-aware file output.

Every output is written to a unique temporary file in the destination's
directory and renamed over it, so a reader (or a crash, or a parallel make job)
never sees half a file. A set of files (gen-stubs' six) is staged completely
before the first rename: running out of space or permission while writing
leaves every destination as it was.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile

from linkfix.errors import BadInput

TEMP_PREFIX = ".linkfix-"
TEMP_SUFFIX = ".tmp"


def read_regular(path: str) -> bytes:
    """The bytes of the regular file `path`; raises OSError otherwise.

    A device (/dev/zero) or a FIFO would be read forever or block: refused with
    EINVAL "not a regular file". O_NONBLOCK keeps open() itself from waiting for
    a FIFO's writer; it changes nothing for a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return f.read()


def write_atomic(path: str, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` atomically, with permission bits `mode` if given."""
    _commit([(_stage(path, data, mode), path)])


def write_if_changed(path: str, data: bytes) -> bool:
    """Kbuild's filechk habit: leave an identical file (and its mtime) alone.

    Returns True when the file was (re)written.
    """
    return bool(write_all_if_changed({path: data}))


def write_all_if_changed(files: dict[str, bytes]) -> list[str]:
    """Write every file whose bytes differ, all or none; returns the paths written.

    All changed files are written to temporary files first; only when every one
    is complete are they renamed into place.
    """
    changed = [p for p, data in files.items() if not _same(p, data)]
    staged: list[tuple[str, str]] = []
    try:
        for p in changed:
            staged.append((_stage(p, files[p], None), p))
    except BaseException:
        for tmp, _p in staged:
            _discard(tmp)
        raise
    _commit(staged)
    return changed


def _same(path: str, data: bytes) -> bool:
    try:
        with open(path, "rb") as old:
            return old.read() == data
    except OSError:
        return False


def _stage(path: str, data: bytes, mode: int | None) -> str:
    """A complete, synced temporary file next to `path` holding `data`."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=directory)
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
    except OSError as exc:
        _discard(tmp)
        raise BadInput(path, f"cannot write output: {exc.strerror}") from None
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def _commit(staged: list[tuple[str, str]]) -> None:
    """Rename every staged file into place (a rename needs no space)."""
    for j, (tmp, path) in enumerate(staged):
        try:
            os.replace(tmp, path)
        except BaseException as exc:
            for rest, _p in staged[j:]:
                _discard(rest)
            if isinstance(exc, OSError):
                raise BadInput(path, f"cannot write output: {exc.strerror}") from None
            raise


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass
