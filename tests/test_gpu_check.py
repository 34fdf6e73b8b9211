"""benchmarks/gpu_check.sh's table script runs on the CPU (its ``--cpu`` proof), one preset, tiny."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_step_time_table_runs_on_the_cpu() -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_step_times.py"), "--device", "cpu", "--presets", "fashion-cnn"]
    command += ["--width-scale", "0.125", "--batch-size", "8", "--steps", "1", "--warmup", "1", "--rounds", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| fashion-cnn |")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")][1:]
    assert len(cells) == 4 + 3  # four optimizers' ms, then three ratios to SGD
    assert all(float(cell) > 0 for cell in cells)
