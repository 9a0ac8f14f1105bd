"""Reading input files, and writing outputs atomically.

Every output is written to a unique temporary file in the destination's
directory and renamed over it, so a reader (or a crash, or a parallel make job)
never sees half a file. Where that file goes and how the temporary files are
named is outputs.py's; renaming a set of them into place, all or none, is
commit.py's.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from collections.abc import Callable, Iterator

# outputs_committed and TEMP_PREFIX are not used here: cli, entry and the tests
# name them through fileio, the module every output goes through.
from linkfix.commit import Slot, commit_all, forget_commits
from linkfix.commit import outputs_committed as outputs_committed
from linkfix.errors import BadInput
from linkfix.outputs import TEMP_PREFIX as TEMP_PREFIX
from linkfix.outputs import discard, remove_stale, resolve_output, temp_name

_COPY_CHUNK = 1 << 20


# -- reading -----------------------------------------------------------------------------


def _open_regular(path: str) -> int:
    """A read-only descriptor of the regular file `path`; raises OSError otherwise.

    A device (/dev/zero) or a FIFO would be read forever or block: refused with
    EINVAL "not a regular file". O_NONBLOCK keeps open() itself from waiting for
    a FIFO's writer; it changes nothing for a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str) -> bytes:
    """The bytes of the regular file `path`; raises OSError otherwise."""
    with os.fdopen(_open_regular(path), "rb") as f:
        return f.read()


def map_regular(path: str) -> mmap.mmap | bytes:
    """The regular file `path` mapped read-only (b"" when empty: an empty file
    cannot be mapped); raises OSError exactly like read_regular otherwise.

    Nothing is read into memory up front: a large image costs only the pages
    that are looked at.
    """
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return b""
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


# -- writing -----------------------------------------------------------------------------


def _open_temp(path: str, real: str, private: bool) -> tuple[int, str]:
    """A new read-write temporary file next to `real`; BadInput naming `path` if it
    cannot be created. `private`: mode 0600 until the caller sets the final mode;
    otherwise 0666 less the umask, the usual mode of a new file."""
    remove_stale(real)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    while True:
        tmp = temp_name(real)
        try:
            return os.open(tmp, flags, 0o600 if private else 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise BadInput(path, f"cannot create output: {exc.strerror}") from None


def write_atomic(path: str, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` atomically, with permission bits `mode` if given."""
    forget_commits()
    real = resolve_output(path)
    commit_all([Slot(path, real, _stage(path, data, mode))])


def write_if_changed(path: str, data: bytes) -> bool:
    """Kbuild's filechk habit: leave an identical file (and its mtime) alone.

    Returns True when the file was (re)written.
    """
    return bool(write_all_if_changed({path: data}))


def write_all_if_changed(files: dict[str, bytes]) -> list[str]:
    """Write every file whose bytes differ, all or none; returns the paths written.

    Every destination is checked first, then all changed files are written to
    temporary files; only when every one is complete are they renamed into place,
    and a rename that fails undoes the renames before it.
    """
    forget_commits()
    reals = {p: resolve_output(p) for p in files}
    changed = [p for p, data in files.items() if not _same(p, reals[p], data)]
    slots: list[Slot] = []
    try:
        for p in changed:
            slots.append(Slot(p, reals[p], _stage(p, files[p], None)))
    except BaseException:
        for s in slots:
            discard(s.tmp)
        raise
    commit_all(slots)
    return changed


def write_patched_copy(src: str, dst: str, mode: int,
                       edit: Callable[[mmap.mmap], None]) -> None:
    """Write to `dst` a copy of `src` changed in place by `edit`, atomically, with
    permission bits `mode`.

    The copy is made by the kernel (holes stay holes) and edited through a
    shared read-write mapping, so a large input is never read into memory. Any
    exception (BadInput from `edit`, Ctrl-C, a full disk) removes the temporary
    file; a full disk is BadInput naming `dst`.
    """
    forget_commits()
    real = resolve_output(dst)
    fd, tmp = _open_temp(dst, real, private=True)
    try:
        try:
            size = _copy_into(src, fd)
            _edit_mapped(src, fd, size, edit)
            os.fsync(fd)
            os.fchmod(fd, mode & 0o7777)
        finally:
            os.close(fd)
    except OSError as exc:
        discard(tmp)
        raise BadInput(dst, f"cannot write output: {exc.strerror}") from None
    except BaseException:
        discard(tmp)
        raise
    commit_all([Slot(dst, real, tmp)])


def _copy_into(src: str, out: int) -> int:
    """Copy the regular file `src` into the empty file `out`; returns its size.

    Only the data ranges are copied (SEEK_DATA/SEEK_HOLE): a sparse input gives a
    sparse copy instead of gigabytes of written zeros.
    """
    try:
        fd = _open_regular(src)
    except OSError as exc:
        raise BadInput(src, f"cannot read: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise BadInput(src, "cannot read: empty file")
        os.ftruncate(out, size)
        for start, end in _data_ranges(fd, size):
            _copy_range(src, fd, out, start, end)
    finally:
        os.close(fd)
    return size


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    at = 0
    while at < size:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # only a hole is left
            yield at, size  # no hole information from this file system
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if start >= end:
            return
        yield start, end
        at = end


def _copy_range(src: str, fd: int, out: int, start: int, end: int) -> None:
    at = start
    kernel = True
    while at < end:
        n = 0
        if kernel:
            try:
                n = os.copy_file_range(fd, out, end - at, at, at)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                     errno.EOPNOTSUPP, errno.EPERM):
                    raise
                kernel = False  # this pair of file systems cannot: copy through a buffer
                continue
        else:
            chunk = os.pread(fd, min(_COPY_CHUNK, end - at), at)
            n = len(chunk)
            if n:
                _pwrite_all(out, chunk, at)
        if n == 0:
            raise BadInput(src, "cannot read: the file shrank while being copied")
        at += n


def _pwrite_all(fd: int, data: bytes, at: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


def _edit_mapped(src: str, fd: int, size: int, edit: Callable[[mmap.mmap], None]) -> None:
    mm = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
    try:
        edit(mm)
        mm.flush()
    except BaseException:
        # An edit that failed may still hold a view of the map; the file goes anyway.
        with contextlib.suppress(BufferError):
            mm.close()
        raise
    mm.close()


def _same(path: str, real: str, data: bytes) -> bool:
    """Whether the existing output already holds `data` (opened as a regular file
    only: a FIFO put there must not block, /dev/zero must not be read forever)."""
    try:
        return read_regular(real) == data
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EISDIR):
            raise BadInput(path, f"cannot write output: {exc.strerror}") from None
        return False  # unreadable (mode 0200) yet replaceable: write it


def _stage(path: str, data: bytes, mode: int | None) -> str:
    """A complete, synced temporary file next to `path`'s real destination holding `data`."""
    fd, tmp = _open_temp(path, resolve_output(path), private=mode is not None)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
            if mode is not None:
                os.fchmod(out.fileno(), mode & 0o7777)
    except OSError as exc:
        discard(tmp)
        raise BadInput(path, f"cannot write output: {exc.strerror}") from None
    except BaseException:
        discard(tmp)
        raise
    return tmp
