"""Renaming staged outputs into place, all or none, and the record that it happened.

A set of files (gen-stubs' six) is staged completely before the first rename,
and a rename that fails undoes the ones before it: running out of space or
permission while writing leaves every destination as it was. SIGINT and SIGTERM
wait until the renames are over; a command that got that far has succeeded,
whatever signal comes next.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

from linkfix.errors import BadInput
from linkfix.outputs import discard, temp_name

_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


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


@dataclass
class Slot:
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


def commit_all(slots: list[Slot]) -> None:
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
                discard(s.tmp)
        raise


def _rename_all(slots: list[Slot]) -> None:
    if len(slots) > 1:  # one rename is all or none by itself
        for s in slots:
            _keep_backup(s)
    for s in slots:
        _replace(s)
    for s in slots:
        if s.backup is not None:
            discard(s.backup)


def _keep_backup(s: Slot) -> None:
    """Before the first rename: keep the old file of `s` under a temporary name."""
    if not os.path.lexists(s.real):
        return
    s.backup = temp_name(s.real)
    try:
        os.link(s.real, s.backup, follow_symlinks=False)
        s.linked = True
    except FileExistsError:
        _keep_backup(s)  # that random name is taken: another
    except OSError:
        pass  # no hard links here (vfat, protected_hardlinks): rename it aside instead


def _replace(s: Slot) -> None:
    if s.backup is not None and not s.linked:
        os.rename(s.real, s.backup)
        s.aside = True
    os.replace(s.tmp, s.real)
    s.done = True


def _roll_back(slots: list[Slot]) -> None:
    """Undo the renames done so far and remove every temporary file (best effort)."""
    for s in reversed(slots):
        with contextlib.suppress(OSError):
            if s.done and s.backup is None:
                os.unlink(s.real)  # newly created
            elif s.done or s.aside:
                os.replace(s.backup, s.real)  # type: ignore[arg-type]
                s.backup = None
        if not s.done:
            discard(s.tmp)
        if s.backup is not None and s.linked:
            discard(s.backup)
