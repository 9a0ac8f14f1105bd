"""Writing outputs: where they may go, all or none, stale temporary files, the
patched-copy writer, signals around the commit, and a body's local labels.

The error contract of docs/ERRORS.md holds throughout: a refused output is one
line, exit 2, nothing created or touched, no temporary file left.
"""

from __future__ import annotations

import contextlib
import errno
import io
import mmap
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import synthimage as si

from linkfix import cli, fileio
from linkfix.errors import BadInput
from linkfix.stubgen import body

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "tests" / "specs" / "x86_64.toml"
TEMP = re.compile(r"\.linkfix-(\d+)-[0-9a-f]{8}-(.*)\.tmp\Z", re.DOTALL)


def run(*argv: str) -> tuple[int, str, str]:
    """linkfix in-process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(list(argv))
        except SystemExit as exc:
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


def temp_files(*dirs: Path) -> list[str]:
    return [p.name for d in dirs for p in d.iterdir() if p.name.startswith(fileio.TEMP_PREFIX)]


def patch(src: Path, out: Path | str, *extra: str) -> tuple[int, str, str]:
    return run("patch", str(src), "-o", str(out), "--target", "xen", *extra)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "vmlinux"
    si.build_fast(str(path), 12, 64)
    return path


@pytest.fixture(scope="module")
def patched(image: Path) -> bytes:
    """What `patch --target xen` writes for `image`."""
    out = image.parent / "vmlinux.xen"
    rc, _o, err = patch(image, out)
    assert rc == 0, err
    return out.read_bytes()


def device(path: Path, minor: int) -> Path:
    """A character device node of the memory driver (3: null, 5: zero) at `path`.

    Tests that write never name a system device: if a regression replaced the
    output, it replaces this node, not /dev/null (tests run as root).
    """
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except OSError as exc:
        pytest.skip(f"cannot create a device node here: {exc.strerror}")
    return path


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# -- where an output may go (task: -o must be a regular file or a new name) ---------------


def test_symlink_to_a_regular_file_is_written_through(image: Path, patched: bytes,
                                                      tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "vmlinux.xen"
    target.write_bytes(b"old")
    link = tmp_path / "out"
    link.symlink_to(target)
    rc, _o, err = patch(image, link)
    assert rc == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == patched
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(image.stat().st_mode)
    assert temp_files(tmp_path, elsewhere) == []


def test_symlink_chain_and_relative_symlink(image: Path, patched: bytes, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "real").write_bytes(b"old")
    (tmp_path / "d" / "hop").symlink_to("real")  # relative to the link's directory
    (tmp_path / "out").symlink_to("d/hop")
    rc, _o, err = patch(image, tmp_path / "out")
    assert rc == 0, err
    assert (tmp_path / "out").is_symlink() and (tmp_path / "d" / "hop").is_symlink()
    assert (tmp_path / "d" / "real").read_bytes() == patched
    assert fileio.resolve_output(str(tmp_path / "out")) == str(tmp_path / "d" / "real")


def test_dangling_symlink_creates_its_target(image: Path, patched: bytes, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "d" / "new")
    rc, _o, err = patch(image, link)
    assert rc == 0, err
    assert link.is_symlink() and (tmp_path / "d" / "new").read_bytes() == patched
    assert temp_files(tmp_path, tmp_path / "d") == []


def test_in_place_through_a_symlink_keeps_the_link(image: Path, patched: bytes,
                                                   tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(image.read_bytes())
    link = tmp_path / "link"
    link.symlink_to(real)
    rc, _o, err = run("patch", str(link), "--in-place", "--target", "xen")
    assert rc == 0, err
    assert link.is_symlink() and real.read_bytes() == patched
    assert temp_files(tmp_path) == []


def _refused(argv: list[str], where: Path | str, message: str) -> None:
    rc, out, err = run(*argv)
    assert (rc, out, err) == (2, "", f"linkfix: {where}: {message}\n")


def test_symlink_to_a_directory_is_refused(image: Path, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("keep")
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "d")
    _refused(["patch", str(image), "-o", str(link), "--target", "xen"], link,
             "cannot write output: Is a directory")
    assert link.is_symlink() and sorted(os.listdir(tmp_path / "d")) == ["x"]
    assert temp_files(tmp_path) == []


def test_devices_fifos_and_sockets_are_refused(image: Path, tmp_path: Path) -> None:
    null = device(tmp_path / "null", 3)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    (tmp_path / "to-null").symlink_to(null)
    (tmp_path / "to-fifo").symlink_to(fifo)
    before = os.stat(null)
    try:
        for out in (null, fifo, tmp_path / "sock", tmp_path / "to-null", tmp_path / "to-fifo"):
            _refused(["patch", str(image), "-o", str(out), "--target", "xen"], out,
                     "cannot write output: not a regular file")
    finally:
        sock.close()
    after = os.stat(null)
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino
    assert stat.S_ISFIFO(fifo.stat().st_mode) and (tmp_path / "to-null").is_symlink()
    assert temp_files(tmp_path) == []


def test_stdout_link_is_never_replaced(image: Path, tmp_path: Path) -> None:
    """-o through a link like /dev/stdout (-> /proc/self/fd/1) with stdout a pipe:
    refused, and the link stays. (A link of the test's own stands for /dev/stdout:
    a regression must not be able to replace the system's.)"""
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    r = subprocess.run([sys.executable, "-m", "linkfix", "patch", str(image), "-o", str(link),
                        "--target", "xen"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == f"linkfix: {link}: cannot write output: not a regular file\n"
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"
    assert temp_files(tmp_path) == []


def test_symlink_loop_is_refused(image: Path, tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    _refused(["patch", str(image), "-o", str(tmp_path / "a"), "--target", "xen"],
             tmp_path / "a", "cannot write output: Too many levels of symbolic links")
    assert temp_files(tmp_path) == []


def test_proc_fd_link_to_a_deleted_file_is_refused(image: Path, tmp_path: Path) -> None:
    with open(tmp_path / "gone", "wb") as f:
        os.unlink(tmp_path / "gone")
        link = f"/proc/self/fd/{f.fileno()}"  # a regular file, but no name to write through
        _refused(["patch", str(image), "-o", link, "--target", "xen"], link,
                 "cannot write output: the symbolic link does not lead to a file name")
    assert os.listdir(tmp_path) == []


def test_resolve_output(tmp_path: Path) -> None:
    new = str(tmp_path / "new")
    assert fileio.resolve_output(new) == new
    (tmp_path / "file").write_text("x")
    assert fileio.resolve_output(str(tmp_path / "file")) == str(tmp_path / "file")
    assert fileio.resolve_output("relative-name") == "relative-name"
    with pytest.raises(BadInput) as exc:
        fileio.resolve_output(str(tmp_path))
    assert exc.value.message == "cannot write output: Is a directory"


def test_gen_stubs_files_through_symlinks_and_a_fifo_among_them(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    rc, _o, err = run("gen-stubs", str(SPEC), "-o", str(out))
    assert rc == 0, err
    keep = tmp_path / "keep"
    keep.mkdir()
    header = out / "linkfix.h"
    os.replace(header, keep / "linkfix.h")
    header.symlink_to(keep / "linkfix.h")
    old_header = header.read_bytes()
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.read_text().replace('native = "cli"', 'native = "cli; nop"'))
    # A FIFO in place of one output: refused before anything is written (no hang).
    thunks = out / "linkfix_thunks.S"
    saved = thunks.read_bytes()
    thunks.unlink()
    os.mkfifo(thunks)
    before = {p.name: (p.read_bytes() if not p.is_fifo() else None) for p in out.iterdir()}
    _refused(["gen-stubs", str(spec), "-o", str(out)], thunks,
             "cannot write output: not a regular file")
    assert {p.name: (p.read_bytes() if not p.is_fifo() else None)
            for p in out.iterdir()} == before
    thunks.unlink()
    thunks.write_bytes(saved)
    rc, _o, err = run("gen-stubs", str(spec), "-o", str(out))
    assert rc == 0, err
    assert header.is_symlink() and (keep / "linkfix.h").read_bytes() != old_header
    assert temp_files(out, keep) == []


# -- all or none, even when a rename fails --------------------------------------------------


def _gen_twice(tmp_path: Path) -> tuple[Path, Path, dict[str, tuple[bytes, int]]]:
    out = tmp_path / "gen"
    rc, _o, err = run("gen-stubs", str(SPEC), "-o", str(out))
    assert rc == 0, err
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.read_text().replace('native = "cli"', 'native = "cli; nop"'))
    return out, spec, {p.name: (p.read_bytes(), p.stat().st_ino) for p in out.iterdir()}


def _failing_replace(monkeypatch: pytest.MonkeyPatch, fail_at: int) -> list[str]:
    real = os.replace
    calls: list[str] = []

    def replace(src: str, dst: str) -> None:
        calls.append(os.path.basename(dst))
        if len(calls) == fail_at:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.parametrize("hard_links", [True, False], ids=["linked", "renamed-aside"])
def test_failing_rename_rolls_back_every_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              hard_links: bool) -> None:
    out, spec, before = _gen_twice(tmp_path)
    (out / "linkfix_ops.c").unlink()  # one file is new this time: the roll back removes it
    del before["linkfix_ops.c"]
    if not hard_links:
        def no_link(*_a: object, **_k: object) -> None:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        monkeypatch.setattr(os, "link", no_link)
    calls = _failing_replace(monkeypatch, 4)
    rc, stdout, err = run("gen-stubs", str(spec), "-o", str(out))
    assert (rc, stdout) == (2, "")
    assert err == f"linkfix: {out / calls[3]}: cannot write output: Input/output error\n"
    monkeypatch.undo()
    now = {p.name: (p.read_bytes(), p.stat().st_ino) for p in out.iterdir()}
    assert now == before  # the old bytes, and (restored from the backups) the old inodes
    assert temp_files(out) == []
    rc, _o, err = run("gen-stubs", str(spec), "-o", str(out))  # and a later run succeeds
    assert rc == 0 and temp_files(out) == [], err


def test_write_all_if_changed_rolls_back_new_files(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    files = {str(tmp_path / n): n.encode() for n in ("a", "b", "c")}
    (tmp_path / "b").write_bytes(b"old b")
    _failing_replace(monkeypatch, 3)
    with pytest.raises(BadInput) as exc:
        fileio.write_all_if_changed(files)
    assert exc.value.path == str(tmp_path / "c")
    assert sorted(os.listdir(tmp_path)) == ["b"] and (tmp_path / "b").read_bytes() == b"old b"
    assert not fileio.outputs_committed()


def test_existing_output_is_compared_as_a_regular_file_only(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "zero").symlink_to(device(tmp_path / "zero-device", 5))
    for p in (fifo, tmp_path / "zero"):
        with pytest.raises(BadInput) as exc:
            fileio._same(str(p), str(p), b"data")  # returns at once: no wait, no endless read
        assert (exc.value.path, exc.value.message) == (str(p), "cannot write output: "
                                                                "not a regular file")
    with pytest.raises(BadInput):
        fileio.write_all_if_changed({str(tmp_path / "zero"): b"x"})
    assert (tmp_path / "zero").is_symlink()
    (tmp_path / "same").write_bytes(b"data")
    assert fileio._same(str(tmp_path / "same"), str(tmp_path / "same"), b"data")
    assert not fileio._same(str(tmp_path / "nope"), str(tmp_path / "nope"), b"data")


# -- stale temporary files -------------------------------------------------------------------


def test_temporary_file_names_identify_destination_and_owner(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    seen: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        seen.extend(temp_files(tmp_path))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fileio.write_atomic(str(tmp_path / "vmlinux.xen"), b"x")
    long_name = "n" * 250
    fileio.write_atomic(str(tmp_path / long_name), b"y")
    assert len(seen) == 2
    m = TEMP.match(seen[0])
    assert m and int(m.group(1)) == os.getpid() and m.group(2) == "vmlinux.xen"
    assert TEMP.match(seen[1]) and len(seen[1]) <= 255
    assert temp_files(tmp_path) == []


def test_stale_temporary_files_of_dead_runs_are_removed(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "vmlinux.xen"
    gone = dead_pid()
    live = subprocess.Popen(["sleep", "60"])  # a parallel run still writing
    try:
        stale = tmp_path / f".linkfix-{gone}-0badf00d-vmlinux.xen.tmp"
        stale_backup = tmp_path / f".linkfix-{gone}-00000001-vmlinux.xen.tmp"
        alive = tmp_path / f".linkfix-{live.pid}-12345678-vmlinux.xen.tmp"
        other = tmp_path / f".linkfix-{gone}-abcdef01-System.map.tmp"
        legacy = tmp_path / ".linkfix-abc123.tmp"  # an old mkstemp name: no owner known
        for p in (stale, stale_backup, alive, other, legacy):
            p.write_bytes(b"partial")
        rc, _o, err = patch(image, out)
        assert rc == 0, err
        assert sorted(temp_files(tmp_path)) == sorted(p.name for p in (alive, other, legacy))
    finally:
        live.kill()
        live.wait()


def test_temporary_file_of_a_sigkilled_run_goes_with_the_next_run(image: Path, patched: bytes,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "vmlinux.xen"
    code = textwrap.dedent(f"""
        import os, signal
        from linkfix import fileio
        fd, tmp = fileio._open_temp({str(out)!r}, {str(out)!r}, True)
        os.write(fd, b"half an image")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert len(temp_files(tmp_path)) == 1
    rc, _o, err = patch(image, out)
    assert rc == 0, err
    assert out.read_bytes() == patched and temp_files(tmp_path) == []


# -- write_patched_copy and map_regular ------------------------------------------------------


def _edit(changes: dict[int, bytes]):  # noqa: ANN202
    def edit(mm: mmap.mmap) -> None:
        for at, data in changes.items():
            mm[at:at + len(data)] = data
    return edit


def test_write_patched_copy(tmp_path: Path) -> None:
    src = tmp_path / "src"
    data = bytes(range(256)) * 40
    src.write_bytes(data)
    dst = tmp_path / "dst"
    dst.write_bytes(b"previous")
    fileio.write_patched_copy(str(src), str(dst), 0o751, _edit({5: b"AB", 9000: b"Z"}))
    want = bytearray(data)
    want[5:7], want[9000:9001] = b"AB", b"Z"
    assert dst.read_bytes() == want and src.read_bytes() == data
    assert stat.S_IMODE(dst.stat().st_mode) == 0o751
    assert fileio.outputs_committed()
    assert temp_files(tmp_path) == []
    # In place: src and dst the same file.
    fileio.write_patched_copy(str(dst), str(dst), 0o644, _edit({0: b"!"}))
    assert dst.read_bytes() == b"!" + want[1:]


def test_write_patched_copy_keeps_a_sparse_input_sparse(tmp_path: Path) -> None:
    src = tmp_path / "sparse"
    size = 1 << 30
    with open(src, "wb") as f:
        f.write(b"head")
        f.seek(size - 4)
        f.write(b"tail")
    if src.stat().st_blocks * 512 > 1 << 20:
        pytest.skip("this file system does not keep holes")
    dst = tmp_path / "dst"
    fileio.write_patched_copy(str(src), str(dst), 0o644,
                              _edit({1: b"E", size - 2: b"I", size // 2: b"M"}))
    st = dst.stat()
    assert st.st_size == size and st.st_blocks * 512 < 1 << 20  # holes stayed holes
    with open(dst, "rb") as f:
        assert f.read(4) == b"hEad"
        f.seek(size // 2 - 1)
        assert f.read(3) == b"\0M\0"
        f.seek(size - 4)
        assert f.read() == b"taIl"


def test_write_patched_copy_without_copy_file_range(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def exdev(*_a: object) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", exdev)
    src = tmp_path / "src"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    fileio.write_patched_copy(str(src), str(tmp_path / "dst"), 0o644, _edit({}))
    assert (tmp_path / "dst").read_bytes() == data


@pytest.mark.parametrize("exc", [BadInput("img", "site 0x10: no"), KeyboardInterrupt(),
                                 ValueError("bug")], ids=["bad-input", "ctrl-c", "bug"])
def test_write_patched_copy_discards_the_copy_on_any_exception(tmp_path: Path,
                                                               exc: BaseException) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 10000)
    dst = tmp_path / "dst"
    dst.write_bytes(b"previous")

    def edit(mm: mmap.mmap) -> None:
        mm[0:1] = b"y"
        view = memoryview(mm)  # still held when the exception leaves: the map cannot close
        assert view
        raise exc

    with pytest.raises(type(exc)) as got:
        fileio.write_patched_copy(str(src), str(dst), 0o644, edit)
    assert got.value is exc
    assert dst.read_bytes() == b"previous" and temp_files(tmp_path) == []
    assert not fileio.outputs_committed()


def test_write_patched_copy_bad_input_and_full_disk(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    src = tmp_path / "src"
    src.write_bytes(b"data")
    (tmp_path / "empty").write_bytes(b"")
    null = device(tmp_path / "null", 3)
    cases = [(str(fifo), str(tmp_path / "o1"), str(fifo), "cannot read: not a regular file"),
             (str(tmp_path), str(tmp_path / "o2"), str(tmp_path), "cannot read: Is a directory"),
             (str(tmp_path / "empty"), str(tmp_path / "o3"), str(tmp_path / "empty"),
              "cannot read: empty file"),
             (str(src), str(tmp_path), str(tmp_path), "cannot write output: Is a directory"),
             (str(src), str(null), str(null), "cannot write output: not a regular file")]
    for s, d, where, message in cases:
        with pytest.raises(BadInput) as exc:
            fileio.write_patched_copy(s, d, 0o644, _edit({}))
        assert (exc.value.path, exc.value.message) == (where, message)

    def enospc(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(BadInput) as exc:
        fileio.write_patched_copy(str(src), str(tmp_path / "o4"), 0o644, _edit({0: b"D"}))
    assert exc.value.message == "cannot write output: No space left on device"
    assert sorted(os.listdir(tmp_path)) == ["empty", "fifo", "null", "src"]


def test_map_regular(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"\x7fELF" + bytes(5000))
    mm = fileio.map_regular(str(f))
    assert isinstance(mm, mmap.mmap) and mm[:] == f.read_bytes()
    with pytest.raises(TypeError):
        mm[0] = 0  # read-only
    mm.close()
    (tmp_path / "empty").write_bytes(b"")
    assert fileio.map_regular(str(tmp_path / "empty")) == b""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    zero = device(tmp_path / "zero", 5)
    for bad in (str(fifo), str(zero), str(tmp_path), str(tmp_path / "missing")):
        with pytest.raises(OSError) as by_map:
            fileio.map_regular(bad)
        with pytest.raises(OSError) as by_read:
            fileio.read_regular(bad)
        assert (type(by_map.value), by_map.value.errno, by_map.value.strerror) == \
            (type(by_read.value), by_read.value.errno, by_read.value.strerror), bad


# -- signals around the commit ---------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_right_after_the_final_rename_is_success(image: Path, patched: bytes,
                                                        tmp_path: Path, signum: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real = os.replace

    def replace(src: str, dst: str) -> None:
        real(src, dst)
        os.kill(os.getpid(), signum)  # arrives while the rename is being recorded

    monkeypatch.setattr(os, "replace", replace)
    assert patch(image, out) == (0, "", "")
    assert out.read_bytes() == patched and temp_files(tmp_path) == []


def test_signal_while_printing_the_report_is_success(image: Path, patched: bytes,
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from linkfix import progress
    def interrupted(*_a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(progress, "finish", interrupted)
    assert patch(image, tmp_path / "out")[0] == 0
    assert (tmp_path / "out").read_bytes() == patched


def test_signal_during_gen_stubs_commit_completes_it(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out, spec, _before = _gen_twice(tmp_path)
    real = os.replace
    calls = []

    def replace(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # held until every rename is done
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    rc, _o, err = run("gen-stubs", str(spec), "-o", str(out))
    assert (rc, err) == (0, "")
    assert len(calls) > 1 and b"nop" in (out / "linkfix_thunks.S").read_bytes()
    assert temp_files(out) == []


def test_signal_before_the_commit_still_fails(image: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(_fd: int) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "fsync", interrupted)
    assert patch(image, tmp_path / "out") == (130, "", "linkfix: interrupted\n")
    assert not (tmp_path / "out").exists() and temp_files(tmp_path) == []


def test_an_earlier_commit_does_not_excuse_a_later_interrupt(image: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    from linkfix.postlink import inspect
    assert patch(image, tmp_path / "out")[0] == 0
    assert fileio.outputs_committed()

    def interrupted(_path: str) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect, "collect", interrupted)
    assert run("inspect", str(image)) == (130, "", "linkfix: interrupted\n")


SIGNAL_AT_IMPORT = """
import os, signal, sys, time

class _InterruptAt:
    # SIGINT from the test, received while `module` is being imported.
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["LINKFIX_TEST_SIGINT_AT"]:
            sys.meta_path.remove(self)
            sys.stdout.write("importing\\n")
            sys.stdout.flush()
            time.sleep(30)  # the test's SIGINT interrupts this
        return None

sys.meta_path.insert(0, _InterruptAt())
"""


def _entry_points() -> list[list[str]]:
    script = Path(sys.executable).parent / "linkfix"
    points = [[sys.executable, "-m", "linkfix"]]
    if script.exists() and "linkfix.entry" in script.read_text():
        points.append([str(script)])
    return points


@pytest.mark.parametrize("module", ["linkfix.cli", "linkfix.errors", "argparse"])
def test_sigint_during_start_up_is_exit_130_without_traceback(tmp_path: Path,
                                                              module: str) -> None:
    (tmp_path / "sitecustomize.py").write_text(SIGNAL_AT_IMPORT)
    env = dict(os.environ, LINKFIX_TEST_SIGINT_AT=module,
               PYTHONPATH=os.pathsep.join([str(tmp_path), *filter(None, [
                   os.environ.get("PYTHONPATH")])]))
    points = _entry_points()
    for argv in points:
        p = subprocess.Popen([*argv, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=env, text=True)
        assert p.stdout is not None
        assert p.stdout.readline() == "importing\n"  # start-up reached `module`
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert (p.returncode, out, err) == (130, "", "linkfix: interrupted\n"), argv
    if len(points) == 1:
        pytest.skip("no console script installed from this tree (pip install -e .)")


# -- a body's local labels (rename_labels is linear) ------------------------------------------


def _rename_reference(statements: list[str], name) -> list[str]:  # noqa: ANN001
    """The original quadratic definition: scan every definition for every reference."""
    defs = [(i, st[:-1]) for i, st in enumerate(statements) if re.fullmatch(r"\d+:", st)]
    names = {i: name(n) for n, (i, _) in enumerate(defs)}

    def resolve(pos: int, num: str, d: str) -> str:
        c = [i for i, n in defs if n == num and (i > pos if d == "f" else i < pos)]
        if not c:
            raise body.BodyError(f"local label '{num}{d}' has no '{num}:' "
                                 f"{'after' if d == 'f' else 'before'} it in the body")
        return names[c[0] if d == "f" else c[-1]]

    out = []
    for pos, st in enumerate(statements):
        if pos in names:
            out.append(f"{names[pos]}:")
            continue
        parts = st.split(None, 1)
        if len(parts) == 1 or st.startswith("."):
            out.append(st)
            continue
        out.append(f"{parts[0]} " + re.sub(r"\b(\d+)([fb])\b",
                                           lambda m, pos=pos: resolve(pos, m.group(1), m.group(2)),
                                           parts[1]))
    return out


def test_rename_labels_matches_the_reference_on_random_bodies() -> None:
    rng = random.Random(7)
    for trial in range(30):
        n = rng.choice([5, 50, 400, 1500])
        labels = [str(rng.randrange(1 + trial % 12)) for _ in range(n)]
        statements = ["0:"]
        for lab in labels:
            statements.append(rng.choice([f"{lab}:", f"jz {lab}b", f"jnz {lab}f", "nop",
                                          f"movl ${lab}, %eax", f".byte {lab}",
                                          f"lea {lab}b(%rip), %rax"]))
        statements += [f"{d}:" for d in range(13)]

        def name(k: int) -> str:
            return f"L{k}"

        try:
            want: list[str] | str = _rename_reference(statements, name)
        except body.BodyError as exc:
            want = str(exc)
        try:
            got: list[str] | str = body.rename_labels(statements, name)
        except body.BodyError as exc:
            got = str(exc)
        assert got == want, trial


def test_rename_labels_on_twenty_thousand_labels() -> None:
    n = 20_000
    statements = []
    for i in range(n):
        statements += [f"{i % 7}:", f"jz {i % 7}b", f"jnz {(i + 1) % 7}f", f"jmp {i % 7}f"]
    statements += [f"{d}:" for d in range(7)]
    out = body.rename_labels(statements, lambda k: f".Lx{k}")
    for i in range(n):
        after = i + 1 if i + 1 < n else n + (i + 1) % 7
        again = i + 7 if i + 7 < n else n + i % 7
        assert out[4 * i:4 * i + 4] == [f".Lx{i}:", f"jz .Lx{i}", f"jnz .Lx{after}",
                                        f"jmp .Lx{again}"], i
    assert out[4 * n:] == [f".Lx{n + d}:" for d in range(7)]


def test_rename_labels_errors() -> None:
    with pytest.raises(body.BodyError, match=r"^local label '1f' has no '1:' after it in the "
                                             r"body$"):
        body.rename_labels(["1:", "jz 1b", "jz 1f"], str)
    with pytest.raises(body.BodyError, match=r"^local label '2b' has no '2:' before it in the "
                                             r"body$"):
        body.rename_labels(["jz 2b", "2:"], str)
    with pytest.raises(body.BodyError, match="'3f'"):
        body.rename_labels(["1:"] * 1000 + ["jz 3f"], str)
