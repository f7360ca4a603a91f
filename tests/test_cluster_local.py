"""A plain local sweep: a stale ``ray_current_cluster`` pointer left behind by a dead cluster (which
made ``ray.init()`` hang for minutes in ``_init_gcs_client``) does not affect it, and a sweep in
which no trial of some cell completed exits non-zero naming the cells (1, so a Ray Job running it
ends FAILED)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.sweep_driver import driver_env, log_lines

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("sweep_driver.py")


def test_stale_pointer_is_ignored_and_cells_without_a_complete_trial_fail_the_sweep(tmp_path: Path) -> None:
    from dmlbench.results import schema, store

    base = Path(tempfile.mkdtemp(prefix="dmlb-", dir="/tmp"))
    try:
        env = {**driver_env(base), "SWEEP_EPOCH_S": "0.2", "SWEEP_FAIL": "1"}
        with socket.socket() as s:  # a port nothing listens on: the pointer names a dead cluster
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}"
        pointer = base / "ray" / "ray_current_cluster"
        pointer.parent.mkdir()
        pointer.write_text(dead)
        out = tmp_path / "out"
        cmd = [sys.executable, str(DRIVER), "sweep", "--methods", "proxyanchor", "--datasets", "digits,synthetic",
               "--backbones", "tiny", "--trials", "1", "--epochs", "1", "--grace-period", "1", "--final-seeds", "1",
               "--folds", "3", "--output", str(out), "--name", "stale"]  # fmt: skip
        t0 = time.time()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, start_new_session=True)
        took = time.time() - t0
        starts = [ln for ln in log_lines(env) if ln[0] == "start"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"local sweep with a stale pointer: {took:.0f} s")
    text = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 1, text[-3000:]
    assert "Traceback" not in text
    assert ("no complete trial in 2 of 2 cell(s): proxyanchor/digits/tiny (search and final); "
            "proxyanchor/synthetic/tiny (search and final)") in text  # fmt: skip
    assert {ln[1] for ln in starts} == {"digits", "synthetic"}  # both cells ran (their first model failed)
    assert dead not in {ln[5] for ln in starts}  # on the sweep's own Ray
    df, warnings = store.read_rows(out)
    assert warnings == [] and len(df) == 2
    assert set(df[schema.STATUS]) == {"failed"} and all("fake training failure" in e for e in df[schema.ERROR])
