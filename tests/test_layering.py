"""The layering is enforced, not hoped for: import-linter's contracts in pyproject.toml.

The engine never imports a user interface (Textual, Rich, the front ends); the headless CLI never
loads Textual; the front ends reach the engine only through its API and its records.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"lint-imports exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "Contracts: 3 kept, 0 broken." in r.stdout, r.stdout
