"""Test tools (tests/tools: the synthetic image writer, the emulator, the fuzzer) are
importable from every test directory."""

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
