"""integrations/linux/bzimage.py without a kernel build: a bzImage is made here the
way arch/x86/boot lays one out (setup sectors, the setup header's HdrS, payload_offset
and payload_length counted from the protected-mode code, the compressed ELF followed
by the kernel's 4-byte size trailer), around a real ELF file."""

from __future__ import annotations

import gzip
import importlib.util
import lzma
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINUX = ROOT / "integrations" / "linux"


def _load(name: str):
    if str(LINUX) not in sys.path:
        sys.path.insert(0, str(LINUX))
    spec = importlib.util.spec_from_file_location(f"linkfix_linux_{name}", LINUX / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bzimage = _load("bzimage")
orc = sys.modules["orc"]


def _elf() -> bytes:
    return Path(sys.executable).resolve().read_bytes()  # an x86-64 ELF file at hand


def _bzimage(payload: bytes, setup_sects: int = 4, offset: int = 0x3c0) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    pm = bytearray(offset) + payload + struct.pack("<I", len(payload))
    return bytes(setup) + bytes(pm)


@pytest.mark.parametrize("method", ["xz", "gzip"])
def test_payload_is_the_elf(method: str) -> None:
    elf = _elf()
    packed = lzma.compress(elf, format=lzma.FORMAT_XZ) if method == "xz" \
        else gzip.compress(elf)
    got = bzimage.payload(_bzimage(packed), "bz")
    assert got == elf
    assert bzimage.compare_sections(orc.Elf(got, "p"), orc.Elf(elf, "v")) == []


def test_a_changed_section_is_named() -> None:
    elf = _elf()
    e = orc.Elf(elf, "v")
    text = e.by_name[".text"]
    changed = bytearray(elf)
    changed[text.offset + 16] ^= 0xFF
    diffs = bzimage.compare_sections(orc.Elf(bytes(changed), "p"), e)
    assert diffs == [".text: bytes differ from vmlinux"]


@pytest.mark.parametrize("image,why", [
    (b"\0" * 4096, "not a bzImage"),
    (_bzimage(b"\x28\xb5\x2f\xfd" + bytes(64)), "only gzip and xz"),
    (_bzimage(lzma.compress(b"not an elf", format=lzma.FORMAT_XZ)), "not an ELF"),
    (_bzimage(b"\xfd7zXZ\x00" + bytes(40)), "does not decompress"),
])
def test_bad_bzimage_is_refused(image: bytes, why: str) -> None:
    with pytest.raises(bzimage.PayloadError, match=why):
        bzimage.payload(image, "bz")


def test_payload_past_the_file_is_refused() -> None:
    image = bytearray(_bzimage(b"x" * 100))
    struct.pack_into("<I", image, 0x24C, 10**6)
    with pytest.raises(bzimage.PayloadError, match="past the file"):
        bzimage.payload(bytes(image), "bz")
