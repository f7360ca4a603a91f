"""The benchmarks of bench/ still run: the evaluation ones assert equal values with PML at smoke size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_eval_vs_pml_quick_run_gives_identical_values() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "eval_vs_pml.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    # the bench exits non-zero when the values differ; the exact-integer data makes them equal
    assert "max |dmlbench - PML| = 0\n" in out.stdout, out.stdout
    # --quick runs above SYMMETRIC_MIN_N: the symmetric path, measured against its own (half) floor
    assert "dmlbench (symmetric path) / matmul-half floor, like for like" in out.stdout, out.stdout
    assert "dmlbench / matmul-chunked floor" in out.stdout and "dmlbench / matmul floor" in out.stdout


@pytest.mark.slow
def test_eval_sop_scale_quick_run_agrees_with_pml() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "eval_sop_scale.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    # the bench exits non-zero when a retrieval metric differs from PML's beyond 1e-6
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
    assert "9,000 x 64 embeddings, 1,700 classes of 2-12" in out.stdout
    for line in ("  dmlbench  wall", "  pml       wall", "PML / dmlbench time", "max over retrieval metrics"):
        assert line in out.stdout, out.stdout
    assert '"nmi"' in out.stdout and '"f1"' in out.stdout and '"NMI"' in out.stdout
