"""The benchmarks of bench/ still run: the k-NN one asserts equal values with PML at smoke size."""

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
    assert "dmlbench / matmul-chunked floor" in out.stdout and "dmlbench / matmul floor" in out.stdout
