"""docs/ stays true to the code: generated tables match what the tools produce now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_spec_doc_site_table_is_current() -> None:
    # The table of site sizes and clobbers in docs/SPEC.md is regenerated from the
    # sample specs; a spec or gen-stubs change must come with the regenerated table.
    res = subprocess.run([sys.executable, "bench/site_table.py", "--check"], cwd=ROOT)
    assert res.returncode == 0, "docs/SPEC.md is stale: run bench/site_table.py"
