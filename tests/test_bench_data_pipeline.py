"""bench/data_pipeline.py still runs, at smoke size, every pipeline its published figures come from."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_data_pipeline_smoke_prints_like_for_like_ratios(tmp_path: Path) -> None:
    args = ["--images", "24", "--classes", "4", "--width", "96", "--height", "72", "--size", "32", "--workers", "1",
            "--batch", "8", "--rounds", "1", "--workdir", str(tmp_path)]  # fmt: skip
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "data_pipeline.py"), *args], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (result,) = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    fields = dict(re.findall(r"(\w+)=([\d.]+)", result))
    # each ratio divides two pipelines that deliver the same batches: float/float or uint8/uint8
    for ratio, num, den in [("ratio", "cached", "imagefolder_pil"), ("ratio_dmlbench", "dmlbench_path", "imagefolder_pil"),
                            ("ratio_uint8", "cached_uint8", "imagefolder_pil_uint8")]:  # fmt: skip
        assert float(fields[ratio]) == pytest.approx(float(fields[num]) / float(fields[den]), rel=0.02, abs=0.01)
    assert (tmp_path / "cache").is_dir()
