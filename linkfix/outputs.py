"""Where an output goes, and the names of the temporary files that stage it.

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
import os
import re
import stat

from linkfix.errors import BadInput

TEMP_PREFIX = ".linkfix-"
TEMP_SUFFIX = ".tmp"
# TEMP_PREFIX, the owner's pid, 8 random hex digits, the destination's tag, TEMP_SUFFIX.
_TEMP_NAME = re.compile(r"\.linkfix-(\d+)-[0-9a-f]{8}-(.*)\.tmp\Z", re.DOTALL)
_TAG_MAX = 200  # keeps the temporary name within NAME_MAX (255)


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


def remove_stale(real: str) -> None:
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


def temp_name(real: str) -> str:
    """A new temporary name next to `real` (this process's, so never taken as stale)."""
    directory, name = os.path.split(real)
    return os.path.join(directory, f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-"
                                   f"{_tag(name)}{TEMP_SUFFIX}")


def discard(tmp: str) -> None:
    """Remove the temporary file `tmp` if it is there (best effort)."""
    try:
        os.unlink(tmp)
    except OSError:
        pass
