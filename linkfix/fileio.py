"""Atomic, change-aware file output.

Every output is written to a unique temporary file in the destination's
directory and renamed over it, so a reader (or a crash, or a parallel make job)
never sees half a file. A set of files (gen-stubs' six) is staged completely
before the first rename, and a rename that fails undoes the ones before it:
running out of space or permission while writing leaves every destination as
it was.

An output is a regular file or a new name. A symlink to a regular file (or a
dangling one) is written through: the file it points at is replaced and the
link stays. Devices, FIFOs, sockets and directories are refused.

A temporary file is named `.linkfix-<pid>-<random>-<destination name>.tmp`: a
run killed by SIGKILL cannot remove its own, so the next run writing the same
destination removes those whose process is gone (never a live run's).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import re
import signal
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from linkfix.errors import BadInput

TEMP_PREFIX = ".linkfix-"
TEMP_SUFFIX = ".tmp"
# TEMP_PREFIX, the owner's pid, 8 random hex digits, the destination's tag, TEMP_SUFFIX.
_TEMP_NAME = re.compile(r"\.linkfix-(\d+)-[0-9a-f]{8}-(.*)\.tmp\Z", re.DOTALL)
_TAG_MAX = 200  # keeps the temporary name within NAME_MAX (255)
_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_COPY_CHUNK = 1 << 20


@dataclass
class _Progress:
    """Whether the last output operation renamed all its files into place."""

    committed: bool = False


_PROGRESS = _Progress()


def outputs_committed() -> bool:
    """True when the last write_* call committed every file and no write began since.

    A command writes all its outputs in one such call, so a signal arriving after
    it (while printing the report) must not turn the command's success into a
    failure: the outputs are already in place.
    """
    return _PROGRESS.committed


def forget_commits() -> None:
    """Start of a command: nothing committed yet."""
    _PROGRESS.committed = False


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


# -- where an output goes ----------------------------------------------------------------


def resolve_output(path: str) -> str:
    """The file an output named `path` really replaces: `path` itself, or the
    target of the symlink `path` (written through, so the link stays).

    Raises BadInput for a directory, a device, a FIFO, a socket, or a symlink to
    one of them (`-o /dev/stdout` must not replace /dev/stdout). A name that
    cannot be looked at (missing directory, no permission) is returned as it is:
    creating the temporary file reports why.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return path
    if stat.S_ISLNK(st.st_mode):
        return _through_link(path)
    _check_kind(path, st.st_mode)
    return path


def _through_link(path: str) -> str:
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None  # dangling: writing creates the file it names
    except OSError as exc:
        raise BadInput(path, f"cannot write output: {exc.strerror}") from None
    if st is not None:
        _check_kind(path, st.st_mode)
    real = os.path.realpath(path)
    # The name realpath gives must be the file the link reaches; /proc/self/fd/N
    # links to a deleted file or a pipe are not names one can write through.
    try:
        again: os.stat_result | None = os.lstat(real)
    except FileNotFoundError:
        again = None
    except OSError as exc:
        raise BadInput(path, f"cannot write output: {exc.strerror}") from None
    if st is None and again is None:
        return real
    if st is not None and again is not None and \
            (again.st_dev, again.st_ino) == (st.st_dev, st.st_ino):
        return real
    raise BadInput(path, "cannot write output: the symbolic link does not lead to a file name")


def _check_kind(path: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise BadInput(path, f"cannot write output: {os.strerror(errno.EISDIR)}")
    if not stat.S_ISREG(mode):
        raise BadInput(path, "cannot write output: not a regular file")


# -- temporary files ---------------------------------------------------------------------


def _tag(name: str) -> str:
    """The destination's name as it appears in its temporary files' names."""
    if len(name) <= _TAG_MAX:
        return name
    return name[:_TAG_MAX - 17] + "~" + hashlib.sha256(name.encode(errors="surrogateescape")
                                                      ).hexdigest()[:16]


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return True  # not a name of ours, or this process's own (another thread's)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # EPERM: alive, someone else's
    return True


def _remove_stale(real: str) -> None:
    """Remove temporary files for `real` left by runs that were killed (SIGKILL)."""
    directory, name = os.path.split(real)
    tag = _tag(name)
    try:
        entries = os.scandir(directory or ".")
    except OSError:
        return  # creating the temporary file reports the problem
    with entries:
        for entry in entries:
            m = _TEMP_NAME.match(entry.name)
            if m and m.group(2) == tag and not _alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _temp_name(real: str) -> str:
    directory, name = os.path.split(real)
    return os.path.join(directory, f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-"
                                   f"{_tag(name)}{TEMP_SUFFIX}")


def _open_temp(path: str, real: str, private: bool) -> tuple[int, str]:
    """A new read-write temporary file next to `real`; BadInput naming `path` if it
    cannot be created. `private`: mode 0600 until the caller sets the final mode;
    otherwise 0666 less the umask, the usual mode of a new file."""
    _remove_stale(real)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    while True:
        tmp = _temp_name(real)
        try:
            return os.open(tmp, flags, 0o600 if private else 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise BadInput(path, f"cannot create output: {exc.strerror}") from None


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


# -- writing -----------------------------------------------------------------------------


def write_atomic(path: str, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` atomically, with permission bits `mode` if given."""
    forget_commits()
    real = resolve_output(path)
    _commit([_Slot(path, real, _stage(path, data, mode))])


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
    slots: list[_Slot] = []
    try:
        for p in changed:
            slots.append(_Slot(p, reals[p], _stage(p, files[p], None)))
    except BaseException:
        for s in slots:
            _discard(s.tmp)
        raise
    _commit(slots)
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
        _discard(tmp)
        raise BadInput(dst, f"cannot write output: {exc.strerror}") from None
    except BaseException:
        _discard(tmp)
        raise
    _commit([_Slot(dst, real, tmp)])


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
        _discard(tmp)
        raise BadInput(path, f"cannot write output: {exc.strerror}") from None
    except BaseException:
        _discard(tmp)
        raise
    return tmp


# -- committing --------------------------------------------------------------------------


@dataclass
class _Slot:
    """One staged output on its way into place."""

    path: str  # as the user named it (for messages)
    real: str  # the file the rename replaces
    tmp: str  # the staged new bytes
    backup: str | None = None  # the old file under a temporary name, for a roll back
    linked: bool = False  # backup is a hard link (the old file stays in place meanwhile)
    aside: bool = False  # the old file was renamed to backup (no hard link possible)
    done: bool = False  # tmp has been renamed over real


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the renames (or their roll back) are over, so a
    set of files is never left half committed and a commit is recorded before the
    signal's exception runs."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # read the mask, change nothing
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _commit(slots: list[_Slot]) -> None:
    """Rename every staged file into place (a rename needs no space); all or none."""
    try:
        with _signals_held():
            try:
                _rename_all(slots)
            except BaseException:
                _roll_back(slots)
                raise
            _PROGRESS.committed = True
    except OSError as exc:
        failed = next((s for s in slots if not s.done), slots[-1])
        raise BadInput(failed.path, f"cannot write output: {exc.strerror}") from None
    except BaseException:
        if not _PROGRESS.committed:  # a signal that was already on its way: nothing renamed
            for s in slots:
                _discard(s.tmp)
        raise


def _rename_all(slots: list[_Slot]) -> None:
    if len(slots) > 1:  # one rename is all or none by itself
        for s in slots:
            _keep_backup(s)
    for s in slots:
        _replace(s)
    for s in slots:
        if s.backup is not None:
            _discard(s.backup)


def _keep_backup(s: _Slot) -> None:
    """Before the first rename: keep the old file of `s` under a temporary name."""
    if not os.path.lexists(s.real):
        return
    s.backup = _temp_name(s.real)
    try:
        os.link(s.real, s.backup, follow_symlinks=False)
        s.linked = True
    except FileExistsError:
        _keep_backup(s)  # that random name is taken: another
    except OSError:
        pass  # no hard links here (vfat, protected_hardlinks): rename it aside instead


def _replace(s: _Slot) -> None:
    if s.backup is not None and not s.linked:
        os.rename(s.real, s.backup)
        s.aside = True
    os.replace(s.tmp, s.real)
    s.done = True


def _roll_back(slots: list[_Slot]) -> None:
    """Undo the renames done so far and remove every temporary file (best effort)."""
    for s in reversed(slots):
        with contextlib.suppress(OSError):
            if s.done and s.backup is None:
                os.unlink(s.real)  # newly created
            elif s.done or s.aside:
                os.replace(s.backup, s.real)  # type: ignore[arg-type]
                s.backup = None
        if not s.done:
            _discard(s.tmp)
        if s.backup is not None and s.linked:
            _discard(s.backup)
