"""Kill the sweep driver mid-way (SIGKILL of its process group), rerun the same sweep, and check
that the interrupted trial resumes from its checkpoint, finished trials are not rerun and no row is
duplicated.

The driver runs this file as a script in a subprocess (fake method + fake train function that log
every start with its first epoch, and every epoch, to a file), so the test needs no engine and kills
only processes it started. In the first driver the second trial to start blocks after its epoch-1
report (``RESUME_BLOCK``), so the kill always lands mid-run: one trial finished, one half-trained.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmlbench.methods.base import Method, MethodParams


class ResumeParams(MethodParams):
    quality: float = 0.5


class ResumeMethod(Method):
    name = "fake_resume"
    Params = ResumeParams


def register() -> None:
    from dmlbench.methods.base import METHODS

    if "fake_resume" not in METHODS:
        METHODS.register("fake_resume")(ResumeMethod)


def slow_train(cfg: Any, report: Any) -> Any:
    from ray import tune

    log = Path(os.environ["RESUME_LOG"])
    trial = tune.get_context().get_trial_id()
    ck = Path(cfg.output_dir) / "checkpoints"
    start = int((ck / "last.pt").read_text()) if (ck / "last.pt").exists() else 0
    with log.open("a") as fh:
        fh.write(f"start {trial} {start + 1}\n")
    for epoch in range(start + 1, cfg.epochs + 1):
        time.sleep(0.5)
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "last.pt").write_text(str(epoch))
        report(epoch, {"map_at_r": float(cfg.params["quality"])}, str(ck))
        with log.open("a") as fh:
            fh.write(f"epoch {trial} {epoch}\n")
        if os.environ.get("RESUME_BLOCK") and epoch == 1 and _starts(log)[1:2] == [trial]:
            while True:  # the second trial hangs half-trained until the driver is killed
                time.sleep(1.0)
    with log.open("a") as fh:
        fh.write(f"end {trial}\n")
    q = float(cfg.params["quality"])
    return SimpleNamespace(metrics={"map_at_r": q}, eval_split="val", best_epoch=cfg.epochs, epochs_run=cfg.epochs,
                           steps=cfg.epochs, wall_time_s=1.0, split_hash="h", pretrained_id="none", test_metrics=None)  # fmt: skip


def _starts(log: Path) -> list[str]:
    """Trial ids in the order of their first start."""
    order: list[str] = []
    for line in log.read_text().splitlines() if log.exists() else []:
        kind, trial, *_ = line.split()
        if kind == "start" and trial not in order:
            order.append(trial)
    return order


def _events(log: Path, kind: str) -> list[tuple[str, int]]:
    return [(ln.split()[1], int(ln.split()[2])) for ln in log.read_text().splitlines() if ln.startswith(kind + " ")]


def driver(out: str, spaces: str) -> None:
    import ray
    import ray.cloudpickle as cp

    from dmlbench.orchestrator import sweep
    from dmlbench.orchestrator.spec import SweepSpec
    from dmlbench.search_spaces import loader

    register()
    cp.register_pickle_by_value(sys.modules[__name__])
    loader.SPACES_DIR = Path(spaces)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": register, "env_vars": {
                 k: os.environ[k] for k in ("RESUME_LOG", "RESUME_BLOCK") if k in os.environ}})  # fmt: skip
    spec = SweepSpec(methods=("fake_resume",), datasets=("digits",), backbones=("tiny",), trials=4, epochs=3,
                     grace_period=3, final_seeds=0, folds=3, search_folds=1, output=out, name="resume",
                     max_concurrent=1, checkpoint_every_epochs=1)  # fmt: skip
    sweep.run(spec, train_fn=slow_train, echo=print)


def _interrupted_state_saved(tune_root: Path, trial: str) -> bool:
    """True once Tune's saved experiment state holds the half-trained trial's checkpoint and no
    other trial is still running (the state a restarted driver restores)."""
    from ray import tune

    for exp in tune_root.glob("*"):
        if not tune.Tuner.can_restore(str(exp)):
            continue
        try:
            analysis = tune.ExperimentAnalysis(str(exp))
        except Exception:  # the state file is being replaced right now: look again
            return False
        by_id = {t.trial_id: t for t in analysis.trials}
        if trial in by_id:
            others_done = all(t.status == "TERMINATED" for i, t in by_id.items() if i != trial)
            return others_done and by_id[trial].checkpoint is not None
    return False


@pytest.mark.slow
def test_kill_driver_then_rerun_no_reruns_no_duplicates(tmp_path: Path, ray_tmpdir: str) -> None:
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "fake_resume.yaml").write_text(
        "method: fake_resume\nparams:\n  - {name: quality, type: float, low: 0.1, high: 0.9}\n"
    )
    out = tmp_path / "out"
    log = tmp_path / "starts.log"
    # this checkout's dmlbench (not whichever one is installed) in the driver and its Ray workers
    here = Path(__file__).resolve().parent
    env = {**os.environ, "RESUME_LOG": str(log), "PYTHONPATH": f"{here.parent}{os.pathsep}{here}", "RAY_TMPDIR": ray_tmpdir}
    cmd = [sys.executable, __file__, str(out), str(spaces)]
    rows = out / "resume" / "rows"
    proc = subprocess.Popen(cmd, env={**env, "RESUME_BLOCK": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        blocked = None
        while time.time() < deadline and proc.poll() is None:
            starts = _starts(log)
            if len(starts) >= 2 and (starts[1], 1) in _events(log, "epoch") and list(rows.glob("*.parquet")):
                blocked = starts[1]
                if _interrupted_state_saved(out / "resume" / "tune", blocked):
                    break
            time.sleep(0.5)
        # the fault lands mid-run: the driver is alive, one trial finished, one half-trained
        assert proc.poll() is None, "the first driver ended before it could be killed"
        assert blocked is not None and _interrupted_state_saved(out / "resume" / "tune", blocked), (
            "the first driver did not reach the half-trained state in time"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    done_before = {p.name for p in rows.glob("*.parquet")}
    ended_before = [ln.split()[1] for ln in log.read_text().splitlines() if ln.startswith("end ")]
    assert len(done_before) == len(ended_before) == 1 and blocked not in ended_before
    assert _events(log, "epoch").count((blocked, 1)) == 1 and (blocked, 2) not in _events(log, "epoch")

    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

    from dmlbench.results import schema, store

    df, warnings = store.read_rows(out)
    assert warnings == []
    assert len(df) == 4 and df[schema.ROW_ID].is_unique
    assert done_before <= {p.name for p in rows.glob("*.parquet")}
    starts = _events(log, "start")
    # the finished trial never starts again; the half-trained one restarts once, at epoch 2
    for trial in ended_before:
        assert [e for t, e in starts if t == trial] == [1], f"finished trial {trial} was started again"
    assert [e for t, e in starts if t == blocked] == [1, 2], "the interrupted trial did not resume at epoch 2"
    assert [e for t, e in _events(log, "epoch") if t == blocked] == [1, 2, 3]
    assert sorted(t for t, e in starts if e == 1) == sorted(df[schema.TRIAL_ID])  # each trial started fresh once
    assert set(df[schema.STATUS]) <= {"complete", "pruned"}


if __name__ == "__main__":
    driver(sys.argv[1], sys.argv[2])
