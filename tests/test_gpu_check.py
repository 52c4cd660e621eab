"""bench/gpu_check.py, the script a GPU machine runs (issue 22), keeps working where no GPU is: its --smoke mode
runs the same code path (Wanda and SparseGPT to the end of pruning, timed, whole and with offloaded blocks) on
tiny shapes on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_gpu_check_smoke_runs_every_method():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"model"')]
    assert [(r["method"], r["offloaded"]) for r in rows] == [("wanda", False), ("sparsegpt", False),
                                                             ("wanda", True), ("sparsegpt", True)]
    assert all(r["prune_s"] > 0 and r["params"] > 0 and r["peak_gpu_mb"] is None for r in rows)
