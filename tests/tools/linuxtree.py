"""A Linux 6.1 tree for the linux-profile tests: its compiler flags, and its objtool.

The source is Debian's linux-source-6.1, unpacked at LINKFIX_LINUX_SRC (default
~/.cache/linkfix-linux/src/linux-source-6.1). A configured and prepared build
directory (`make O=... prepare`) supplies include/generated and the exact gcc
command line Kbuild uses (from arch/x86/kernel/.asm-offsets.s.cmd): for config B
(or C, frame pointers) LINKFIX_LINUX_BUILD_B (_C), prepared there if it is not yet,
else ~/.cache/linkfix-linux/build/B-baseline (C-baseline), else one this module
configures and prepares under the test cache (tinyconfig plus the config's options,
a few minutes once). objtool is built from the tree into the test cache (out of
tree: the source is only read).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

HOME_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
SRC = Path(os.environ.get("LINKFIX_LINUX_SRC",
                          HOME_CACHE / "linkfix-linux" / "src" / "linux-source-6.1"))
BUILDS = HOME_CACHE / "linkfix-linux" / "build"
TEST_CACHE = HOME_CACHE / "linkfix-test"
OFFSETS_CMD = Path("arch/x86/kernel/.asm-offsets.s.cmd")

# Config A of the trial (/work/shared/notes/linux-trial.md), then B and C.
CONFIG_A = "64BIT PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE EARLY_PRINTK MODULES".split()
CONFIGS = {
    "B": ([*CONFIG_A, *("UNWINDER_ORC CPU_MITIGATIONS RETPOLINE RETHUNK CPU_UNRET_ENTRY "
                        "CPU_SRSO X86_KERNEL_IBT RELOCATABLE RANDOMIZE_BASE DEBUG_ENTRY").split()],
          ["UNWINDER_GUESS"]),
    "C": ([*CONFIG_A, "UNWINDER_FRAME_POINTER", "STACK_VALIDATION"], ["UNWINDER_GUESS"]),
}

# objtool's command line in each config (scripts/Makefile.lib, scripts/Makefile.vmlinux_o).
OBJTOOL_B = ("--hacks=jump_label", "--hacks=noinstr", "--ibt", "--orc", "--retpoline",
             "--rethunk", "--static-call", "--uaccess", "--noinstr", "--unret", "--link")
OBJTOOL_C = ("--hacks=jump_label", "--hacks=noinstr", "--stackval", "--static-call",
             "--uaccess")


def source_missing() -> str | None:
    """Why the Linux tests cannot run, or None."""
    if not (SRC / "tools" / "objtool" / "check.c").is_file():
        return f"no Linux 6.1 source at {SRC} (set LINKFIX_LINUX_SRC)"
    return None


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-4000:]}")


def _usable(build: Path) -> bool:
    """Prepared, and its source tree (named in its Makefile) still there."""
    if not (build / OFFSETS_CMD).is_file():
        return False
    first = (build / "Makefile").read_text().splitlines()[1:2]
    src = first[0].removeprefix("include ").removesuffix("/Makefile") if first else ""
    return Path(src, "Makefile").is_file()


def build_dir(config: str) -> Path:
    """A prepared build directory for config "B" or "C": LINKFIX_LINUX_BUILD_<config>
    (prepared there if it is not yet), else <config>-baseline of the Linux cache, else
    one prepared under the test cache."""
    env = os.environ.get(f"LINKFIX_LINUX_BUILD_{config}")
    if env:
        return _prepare(Path(env), config)
    baseline = BUILDS / f"{config}-baseline"
    if _usable(baseline):
        return baseline
    return _prepare(TEST_CACHE / f"linux-prepared-{config}", config)


def _prepare(build: Path, config: str) -> Path:
    """`make O=build tinyconfig`, the config's options, olddefconfig, prepare (once)."""
    if _usable(build):
        return build
    build.mkdir(parents=True, exist_ok=True)
    make = ["nice", "-n", "10", "make", "-s", "-C", str(SRC), f"O={build}", "-j2"]
    _run([*make, "tinyconfig"])
    enable, disable = CONFIGS[config]
    cfg = [str(SRC / "scripts" / "config"), "--file", str(build / ".config")]
    for opt in enable:
        cfg += ["-e", opt]
    for opt in disable:
        cfg += ["-d", opt]
    _run(cfg)
    _run([*make, "olddefconfig"])
    _run([*make, "prepare"])
    return build


def flags(build: Path) -> tuple[list[str], list[str]]:
    """(gcc C flags, gcc .S flags) of the build directory, with absolute paths; the
    output, source and dependency-file arguments dropped."""
    line = (build / OFFSETS_CMD).read_text().split("\n", 1)[0].split(":=", 1)[1]
    argv = shlex.split(line.split(";", 1)[0])
    out: list[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "-o":
            skip = True
            continue
        if a.startswith(("-Wp,-MMD", "-DKBUILD_", "-D__KBUILD_")) or a in ("-S", "-fverbose-asm"):
            continue
        if i == len(argv) - 1 and a.endswith(".c"):
            continue
        if a.startswith("-I./") or a.startswith("./"):
            a = a.replace("./", f"{build}/", 1)
        out.append(a)
    cflags = out[1:]  # without "gcc"
    # KBUILD_AFLAGS: the include paths and forced includes, __KERNEL__, the ABI, and
    # __ASSEMBLY__ (what Kbuild passes for arch/x86/lib/memcpy_64.S).
    aflags: list[str] = []
    it = iter(cflags)
    for a in it:
        if a in ("-I", "-include"):
            nxt = next(it)
            if not (a == "-include" and nxt.endswith("compiler_types.h")):
                aflags += [a, nxt]
        elif a.startswith(("-I", "-fmacro-prefix-map")) or a in ("-nostdinc", "-D__KERNEL__",
                                                                  "-m64", "-fno-PIE"):
            aflags.append(a)
    return cflags, [*aflags, "-D__ASSEMBLY__"]


def objtool() -> Path:
    """objtool built from the tree (out of tree, into the test cache)."""
    out = TEST_CACHE / "objtool-6.1"
    binary = out / "objtool"
    if not binary.is_file():
        out.mkdir(parents=True, exist_ok=True)
        _run(["nice", "-n", "10", "make", "-s", "-C", str(SRC / "tools" / "objtool"),
              f"O={out}", "-j2"])
    return binary


# Stand-ins for arch/x86/lib/retpoline.S's thunks (the retpoline and the return thunk),
# written as that file writes them, so that an `ld -r` of a few objects has what
# objtool --link expects of the calls the generated code makes.
THUNK_STUBS_S = r"""
#include <linux/linkage.h>
#include <linux/objtool.h>
#include <asm/unwind_hints.h>
#include <asm/nospec-branch.h>
	.section .text..__x86.indirect_thunk, "ax"
SYM_CODE_START(__x86_indirect_thunk_rax)
	UNWIND_HINT_EMPTY
	ANNOTATE_NOENDBR
	ANNOTATE_RETPOLINE_SAFE
	jmp *%rax
	int3
SYM_CODE_END(__x86_indirect_thunk_rax)
	.section .text..__x86.return_thunk, "ax"
SYM_CODE_START(__x86_return_thunk)
	UNWIND_HINT_FUNC
	ANNOTATE_NOENDBR
	ANNOTATE_UNRET_SAFE
	ret
	int3
SYM_CODE_END(__x86_return_thunk)
	.section .note.GNU-stack,"",@progbits
"""
