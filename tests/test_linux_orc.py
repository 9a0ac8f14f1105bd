"""integrations/linux/orc.py on a real vmlinux: Linux 6.1 config B, baseline build.

The kernel is built by integrations/linux/build.sh, through the `linux_builds`
fixture (conftest.py: incremental from the cache). Deselect with -m 'not linux'.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LINKFIX_LINUX_CACHE", Path.home() / ".cache" / "linkfix-linux"))
BUILD = CACHE / "build" / "B-baseline"
VMLINUX = BUILD / "vmlinux"
SRCTREE = CACHE / "src" / "linux-source-6.1"

pytestmark = [pytest.mark.linux, pytest.mark.usefixtures("linux_builds")]


def _load_orc():
    spec = importlib.util.spec_from_file_location(
        "linkfix_linux_orc", ROOT / "integrations" / "linux" / "orc.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


orc = _load_orc()


@pytest.fixture(scope="module")
def table(linux_builds):
    return orc.OrcTable.from_file(VMLINUX)


def _unique_ips(t):
    """Indexes whose ip no other entry has, and whose entry differs from the one in
    effect just before it (so that editing it is visible)."""
    ips = t.ips
    out = []
    for i in range(1, len(ips) - 1):
        if ips[i - 1] < ips[i] < ips[i + 1] and t.entries[i - 1] != t.entries[i]:
            out.append(i)
    return out


def test_layout_is_that_of_the_tree():
    # the decoder assumes 6.1's little-endian struct orc_entry; check the header says so
    hdr = SRCTREE / "arch" / "x86" / "include" / "asm" / "orc_types.h"
    assert hdr.is_file(), f"no source tree at {SRCTREE}"
    text = hdr.read_text()
    le = text.split("__LITTLE_ENDIAN_BITFIELD", 1)[1].split("#elif", 1)[0]
    fields = re.findall(r"unsigned\s+(\w+):(\d+);", le)
    assert fields == [("sp_reg", "4"), ("bp_reg", "4"), ("type", "2"), ("end", "1")]
    assert re.search(r"s16\s+sp_offset;\s+s16\s+bp_offset;", text)


def test_table_shape(table):
    t = table
    assert t.ip_section.size == 4 * len(t)
    assert t.orc_section.size == 6 * len(t)
    assert len(t) > 10_000
    assert t.is_sorted()
    # every ip is in an executable section of the image
    exec_ranges = [(s.addr, s.addr + s.size) for s in t.elf.sections
                   if s.flags & orc.SHF_EXECINSTR and s.addr]
    for ip in t.ips:
        assert any(lo <= ip <= hi for lo, hi in exec_ranges), hex(ip)
    # sorttable: at a shared ip, the terminator entry comes first
    for i in range(len(t) - 1):
        if t.ips[i] == t.ips[i + 1]:
            assert not t.entries[i + 1].terminator or t.entries[i].terminator


def test_lookup_is_last_entry_at_or_below(table):
    t = table
    assert t.lookup(t.ips[0] - 1) is None
    assert t.index(t.ips[-1] + 0x1000) == len(t) - 1
    for i in _unique_ips(t)[::97]:
        assert t.index(t.ips[i]) == i
        assert t.index(t.ips[i] - 1) == i - 1
        mid = (t.ips[i] + t.ips[i + 1]) // 2
        assert t.lookup(mid) == t.entries[i]
    dup = [i for i in range(len(t) - 1) if t.ips[i] == t.ips[i + 1]]
    for i in dup[:50]:
        j = i + 1
        while j + 1 < len(t) and t.ips[j + 1] == t.ips[i]:
            j += 1
        assert t.index(t.ips[i]) == j


def test_known_entries(table):
    t = table
    start = t.symbolizer.symbol("start_kernel").value
    # at a function's first byte, the CFA is sp+8 (the return address) and bp is as
    # the caller left it
    assert str(t.lookup(start)) == "sp:sp+8 bp:(und) type:call end:0"
    assert t.describe(start + 3) == "start_kernel+0x3"


def test_decoder_agrees_with_objtool(table, tmp_path):
    objtool = BUILD / "tools" / "objtool" / "objtool"
    assert objtool.is_file(), f"no {objtool}"
    # objtool --dump=orc names entries through .rela.orc_unwind_ip when there is one,
    # and --emit-relocs (RELOCATABLE) leaves one that sorttable did not reorder; hide
    # it (rename it in .shstrtab) so that objtool prints addresses
    data = bytearray(table.elf.data)
    shstr = table.elf.section(".shstrtab")
    i = data.index(b".rela.orc_unwind_ip\0", shstr.offset, shstr.offset + shstr.size)
    data[i + 1] = ord("X")
    copy = tmp_path / "vmlinux"
    copy.write_bytes(data)
    res = subprocess.run([str(objtool), "--dump=orc", str(copy)], capture_output=True,
                         text=True, check=True)
    theirs = res.stdout.splitlines()
    ours = [f"{ip:x}: {e}" for ip, e in zip(table.ips, table.entries, strict=True)]
    assert len(theirs) == len(ours)
    assert theirs == ours


def test_compare_with_itself(table):
    assert orc.compare(table, table) == []
    diffs, notes = orc.compare_symbols(table, table)
    assert diffs == [] and notes == []
    assert orc.main(["diff", "-q", str(VMLINUX), str(VMLINUX)]) == 0


def test_one_edited_entry_is_one_difference(table, tmp_path, capsys):
    t = table
    cands = [i for i in _unique_ips(t) if t.ips[i + 1] - t.ips[i] > 1]
    i = cands[len(cands) // 2]
    e = t.entries[i]
    edited = e._replace(sp_offset=e.sp_offset + 8)
    copy = tmp_path / "vmlinux"
    shutil.copyfile(VMLINUX, copy)
    with open(copy, "r+b") as f:
        f.seek(t.entry_file_offset(i))
        assert f.read(6) == e.pack()
        f.seek(t.entry_file_offset(i))
        f.write(edited.pack())
    t2 = orc.OrcTable.from_file(copy)
    diffs = orc.compare(t, t2)
    assert len(diffs) == 1
    d = diffs[0]
    assert (d.addr_a, d.a, d.b) == (t.ips[i], e, edited)
    assert d.where == t.describe(t.ips[i])
    # over a range holding it, over .text, function by function
    assert len(orc.compare(t, t2, [(t.ips[i] - 0x40, t.ips[i] + 0x40)])) == 1
    # the edited entry is in effect from its ip on, so a range that ends at its ip
    # shows nothing, and one that starts after it (inside its extent) shows it
    assert orc.compare(t, t2, [(t.ips[i - 1], t.ips[i])]) == []
    assert len(orc.compare(t, t2, [(t.ips[i] + 1, t.ips[i + 1])])) == 1
    by_sym, _ = orc.compare_symbols(t, t2)
    assert len(by_sym) == 1 and by_sym[0].addr_a == t.ips[i]
    # the command line prints that one line and exits 1
    capsys.readouterr()
    assert orc.main(["diff", str(VMLINUX), str(copy)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    assert out[0].startswith(f"{t.ips[i]:#x} {d.where}: a: {e} | b: {edited}")
