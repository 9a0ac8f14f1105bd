"""Test tools (tests/tools: the synthetic image writer, the emulator, the fuzzer) are
importable from every test directory."""

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))


# ------------------------------------------------------------------ Linux builds

import os  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LINUX_CACHE = Path(os.environ.get("LINKFIX_LINUX_CACHE",
                                  Path.home() / ".cache" / "linkfix-linux"))


@pytest.fixture(scope="session")
def linux_builds() -> Path:
    """Configs B and C of Linux 6.1, built and booted without linkfix and with the
    series (integrations/linux/build.sh, then build.sh linkfix), once per session.

    Incremental: the harness keeps the unpacked tree and the build trees in
    LINUX_CACHE, stamped, so a run after the first rebuilds only what changed.
    build.sh exits 1 when a check failed and 2 on an error; the tests that read
    the summaries say which check. Its output goes to out/harness-*.log.
    Only `linux`-marked tests ask for this; deselect them with -m 'not linux'."""
    out = LINUX_CACHE / "out"
    out.mkdir(parents=True, exist_ok=True)
    script = ROOT / "integrations" / "linux" / "build.sh"
    for name, args in (("baseline", ["--configs", "B,C"]),
                       ("linkfix", ["linkfix", "--configs", "B,C"])):
        log = out / f"harness-{name}.log"
        with open(log, "wb") as f:
            rc = subprocess.run(["bash", str(script), *args], stdout=f,
                                stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if rc not in (0, 1):
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            pytest.fail(f"build.sh {' '.join(args)} exited {rc}; {log}:\n" + "\n".join(tail))
    return LINUX_CACHE
