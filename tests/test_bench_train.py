"""The training benchmarks still run: both loops compute the same first loss at smoke size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_throughput_quick_run_compares_the_same_loss() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train_throughput.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    # the bench exits non-zero when the first-step losses of the two loops differ
    assert "(same)" in out.stdout and "wall time: dmlbench / bare per step = " in out.stdout, out.stdout


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_passes_every_part(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-dry"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "failed parts: none" in out.stdout
    for figure in ("(same)", "retrieval values agree", "clustering: dmlbench NMI", "dry run: nothing started"):
        assert figure in out.stdout, figure
    assert (tmp_path / "gpu_check.txt").read_text() == out.stdout
