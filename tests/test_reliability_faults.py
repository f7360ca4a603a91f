"""Fault injection on real (tiny) sweeps: the rows that survive a fault equal an undisturbed run's.

Every sweep here trains the real engine (tiny CPU backbone, 16-px digits, 2 epochs, 2 search
trials, no final phase, one trial at a time, deterministic mode, fixed seeds) in a subprocess, so
the test kills only processes it started. Rows are matched between runs by their sampled params
(Tune's trial ids are random) and the metric columns of complete rows must be equal.

* the driver killed with SIGKILL mid-sweep: ``dmlbench sweep`` (the real CLI) is killed after its
  first row, the same command is run again: no row lost or duplicated, no finished trial rerun;
* a trial's worker killed mid-epoch: a test method SIGKILLs its own worker process in the middle
  of epoch 2 (after the epoch-1 checkpoint); Tune restarts it from that checkpoint;
* a trial raises (a bug in a test-registered method): a ``failed`` row with the error, the other
  trial completes with the undisturbed metrics;
* an unwritable results folder (the rows folder is a file): one clear error, and the rows already
  under the same ``--output`` stay readable.

A node of a two-node cluster removed mid-sweep is not covered here (see docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METRICS = ["map_at_r", "r_precision", "precision_at_1", "nmi", "f1", "recall_at_1", "recall_at_2"]
TRIAL_BASE = {"image_size": 16, "iters_per_epoch": 3, "deterministic": True, "eval_batch_size": 256}
SWEEP_ARGS = ["--datasets", "digits", "--preset", "smoke", "--trials", "2", "--epochs", "2", "--grace-period", "2",
              "--final-seeds", "0", "--max-concurrent", "1", "--seed", "3"]  # fmt: skip


# ---- the test method (registered in the driver and in every Ray worker) ---------------------------
def register() -> None:
    from dmlbench.methods import METHODS
    from dmlbench.methods.baselines import Triplet

    if "rel_triplet" in METHODS:
        return

    class RelTriplet(Triplet):
        """Triplet that, per ``REL_MODE``, kills its worker mid-epoch 2 or raises, once per flag file."""

        def loss(self, batch: Any) -> Any:
            if os.environ.get("REL_MODE") == "raise" and _first(Path(os.environ["REL_FLAG"])):
                raise RuntimeError("rel_triplet: injected bug")
            return super().loss(batch)

        def on_step_end(self, ctx: Any) -> None:
            super().on_step_end(ctx)
            # ctx.epoch is the last finished epoch: 1 = after the first step of epoch 2 (of >= 2 steps)
            killing = os.environ.get("REL_MODE") == "kill" and ctx.epoch == 1
            if killing and _first(Path(os.environ["REL_FLAG"])):
                os.kill(os.getpid(), signal.SIGKILL)

    RelTriplet.name = "rel_triplet"
    METHODS.register("rel_triplet")(RelTriplet)


def _first(flag: Path) -> bool:
    """True for exactly one caller across processes (creates ``flag`` exclusively)."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def driver(out: str, name: str) -> None:
    """Run one rel_triplet sweep (the subprocess entry point)."""
    import ray
    import ray.cloudpickle as cp

    from dmlbench.orchestrator import sweep
    from dmlbench.search_spaces import loader

    register()
    cp.register_pickle_by_value(sys.modules[__name__])
    spaces = Path(out).parent / "spaces"
    spaces.mkdir(exist_ok=True)
    text = (loader.SPACES_DIR / "triplet.yaml").read_text().replace("method: triplet", "method: rel_triplet")
    (spaces / "rel_triplet.yaml").write_text(text)
    loader.SPACES_DIR = spaces
    env = {k: os.environ[k] for k in ("REL_MODE", "REL_FLAG") if k in os.environ}
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": register, "env_vars": env})  # fmt: skip
    spec = sweep.build_spec(methods="rel_triplet", datasets="digits", preset="smoke", trials=2, epochs=2,
                            grace_period=2, final_seeds=0, max_concurrent=1, seed=3, output=out, name=name)  # fmt: skip
    spec = spec.model_copy(update={"trial_base": {**spec.trial_base, **TRIAL_BASE}})
    from dmlbench.errors import DmlbenchError

    try:
        sweep.run(spec, echo=print)
    except DmlbenchError as err:  # what the CLI's @friendly does
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# ---- helpers ---------------------------------------------------------------------------------------
def _env(tmp: Path, mode: str = "none") -> dict[str, str]:
    return {**os.environ, "REL_MODE": mode, "REL_FLAG": str(tmp / f"flag-{mode}"), "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def _run_driver(tmp: Path, out: Path, mode: str, name: str = "rel") -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, __file__, str(out), name]
    return subprocess.run(
        cmd,
        check=False,
        env=_env(tmp, mode),
        capture_output=True,
        text=True,
        timeout=400,
        start_new_session=True,
    )


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    """Rows keyed by their sampled params; no row may be unreadable or duplicated."""
    from dmlbench.results import schema, store

    df, warnings = store.read_rows(out)
    assert warnings == []
    assert df[schema.ROW_ID].is_unique
    rows = {}
    for rec in df.to_dict("records"):
        key = json.dumps(json.loads(rec[schema.PARAMS_JSON]), sort_keys=True)
        assert key not in rows, "two rows for the same sampled params"
        rows[key] = rec
    return rows


def _same_metrics(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["status"] == b["status"] == "complete"
    for m in METRICS:
        assert a[m] == pytest.approx(b[m], rel=1e-6, abs=1e-9), m
    assert json.loads(a["metrics_json"]).keys() == json.loads(b["metrics_json"]).keys()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The undisturbed rel_triplet sweep."""
    tmp = tmp_path_factory.mktemp("baseline")
    res = _run_driver(tmp, tmp / "out", "none")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _rows(tmp / "out")
    assert len(rows) == 2 and all(r["status"] == "complete" for r in rows.values())
    return rows


# ---- the faults ------------------------------------------------------------------------------------
def test_worker_killed_mid_epoch_resumes_from_checkpoint(
    tmp_path: Path, baseline: dict[str, dict[str, Any]]
) -> None:
    res = _run_driver(tmp_path, tmp_path / "out", "kill")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "flag-kill").exists(), "the worker was never killed"
    rows = _rows(tmp_path / "out")
    assert rows.keys() == baseline.keys()
    for key, row in rows.items():
        _same_metrics(row, baseline[key])


def test_trial_raising_is_a_failed_row_and_the_sweep_goes_on(
    tmp_path: Path, baseline: dict[str, dict[str, Any]]
) -> None:
    res = _run_driver(tmp_path, tmp_path / "out", "raise")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _rows(tmp_path / "out")
    assert len(rows) == 2
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "rel_triplet: injected bug" in failed[0]["error"]
    (key,) = [k for k, r in rows.items() if r["status"] != "failed"]
    if key in baseline:  # TPE's second point depends on the first trial's score, which failed here
        _same_metrics(rows[key], baseline[key])
    else:
        assert rows[key]["status"] == "complete" and 0.0 <= rows[key]["map_at_r"] <= 1.0


def test_results_folder_unwritable_is_a_clear_error_and_rows_stay_readable(
    tmp_path: Path, baseline: dict[str, dict[str, Any]]
) -> None:
    from dmlbench.results import store

    out = tmp_path / "out"
    # a finished sweep's rows are already under --output
    res = _run_driver(tmp_path, out, "none", name="first")
    assert res.returncode == 0, res.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in (out / "first" / "rows").iterdir()}
    # the next sweep cannot write its rows: its rows "folder" is a file
    (out / "second").mkdir()
    (out / "second" / "rows").write_text("not a folder")
    res = _run_driver(tmp_path, out, "none", name="second")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and str(out / "second" / "rows") in last, last
    assert {p.name: p.read_bytes() for p in (out / "first" / "rows").iterdir()} == before
    df, warnings = store.read_rows(out / "first")
    assert warnings == [] and len(df) == 2


def test_driver_sigkill_then_same_command_resumes(tmp_path: Path) -> None:
    """Through the real CLI on the built-in triplet method: undisturbed vs killed-and-rerun."""
    base_out, out = tmp_path / "base", tmp_path / "out"
    cmd = [sys.executable, "-m", "dmlbench.cli", "sweep", "--methods", "triplet", *SWEEP_ARGS, "--name", "k"]
    env = _env(tmp_path)
    undisturbed = subprocess.run([*cmd, "--output", str(base_out)], check=False, env=env, capture_output=True, text=True,
                                 timeout=400, start_new_session=True)  # fmt: skip
    assert undisturbed.returncode == 0, undisturbed.stdout[-3000:] + undisturbed.stderr[-3000:]

    rows_dir = out / "k" / "rows"
    proc = subprocess.Popen([*cmd, "--output", str(out)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(rows_dir.glob("*.parquet")) and proc.poll() is None:
            time.sleep(0.2)
        assert list(rows_dir.glob("*.parquet")), "the first driver wrote no row in time"
        assert proc.poll() is None, "the first driver finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    first = {p.name: p.read_bytes() for p in rows_dir.glob("*.parquet")}

    again = subprocess.run([*cmd, "--output", str(out)], check=False, env=env, capture_output=True, text=True, timeout=400,
                           start_new_session=True)  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows, expected = _rows(out), _rows(base_out)
    assert rows.keys() == expected.keys()
    for key, row in rows.items():
        _same_metrics(row, expected[key])
    after = {p.name: p.read_bytes() for p in rows_dir.glob("*.parquet")}
    assert first.keys() <= after.keys() and len(after) == 2
    for name in first:  # a finished trial is not rerun: its row file is the one written before the kill
        assert json.loads(_row_of(rows_dir / name)["metrics_json"]) == json.loads(
            _row_of_bytes(first[name])["metrics_json"]
        )


def _row_of(path: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()[0]  # type: ignore[no-any-return]


def _row_of_bytes(data: bytes) -> dict[str, Any]:
    import io

    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data)).to_pylist()[0]  # type: ignore[no-any-return]


if __name__ == "__main__":
    driver(sys.argv[1], sys.argv[2])
