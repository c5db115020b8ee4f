"""Every benchmark's ``--quick`` run ends with its ``ratio=`` line (slow: about a minute each; the figures of
a quick run mean nothing, this only keeps the benchmarks runnable as the code under them moves)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICK = sorted(p.name for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_")
               and "--quick" in p.read_text())

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("bench", QUICK)
def test_quick_run_ends_with_its_ratio(bench, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FOUNDRY_DATA_DIR": str(tmp_path / "data")}
    out = subprocess.run([sys.executable, f"bench/{bench}", "--quick"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("ratio="), out.stdout[-2000:]
