"""Kill the sweep driver mid-way (SIGKILL of its process group), rerun the same sweep, and check
that finished trials are not rerun and no row is duplicated.

The driver runs this file as a script in a subprocess (fake method + fake train function that log
every start to a file), so the test needs no engine and kills only processes it started.
"""

from __future__ import annotations

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
    log = Path(os.environ["RESUME_LOG"])
    trial = Path(cfg.output_dir).parent.name.split("_")[2]  # run_trial_<id>_...
    with log.open("a") as fh:
        fh.write(f"start {trial}\n")
    ck = Path(cfg.output_dir) / "checkpoints"
    start = int((ck / "last.pt").read_text()) if (ck / "last.pt").exists() else 0
    for epoch in range(start + 1, cfg.epochs + 1):
        time.sleep(1.5)
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "last.pt").write_text(str(epoch))
        report(epoch, {"map_at_r": float(cfg.params["quality"])}, str(ck))
    with log.open("a") as fh:
        fh.write(f"end {trial}\n")
    q = float(cfg.params["quality"])
    return SimpleNamespace(metrics={"map_at_r": q}, eval_split="val", best_epoch=cfg.epochs, epochs_run=cfg.epochs,
                           steps=cfg.epochs, wall_time_s=1.0, split_hash="h", pretrained_id="none", test_metrics=None)  # fmt: skip


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
             runtime_env={"worker_process_setup_hook": register, "env_vars": {"RESUME_LOG": os.environ["RESUME_LOG"]}})  # fmt: skip
    spec = SweepSpec(methods=("fake_resume",), datasets=("digits",), backbones=("tiny",), trials=4, epochs=2,
                     grace_period=2, final_seeds=0, folds=3, output=out, name="resume", max_concurrent=1)  # fmt: skip
    sweep.run(spec, train_fn=slow_train, echo=print)


@pytest.mark.slow
def test_kill_driver_then_rerun_no_reruns_no_duplicates(tmp_path: Path) -> None:
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "fake_resume.yaml").write_text(
        "method: fake_resume\nparams:\n  - {name: quality, type: float, low: 0.1, high: 0.9}\n"
    )
    out = tmp_path / "out"
    log = tmp_path / "starts.log"
    env = {**os.environ, "RESUME_LOG": str(log), "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, __file__, str(out), str(spaces)]
    rows = out / "resume" / "rows"
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(rows.glob("*.parquet"))) < 2:
            time.sleep(0.5)
        assert len(list(rows.glob("*.parquet"))) >= 2, "the first driver wrote no rows in time"
        time.sleep(5.0)  # the experiment state reaches storage within ~2 s (sweep._run_config)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    done_before = {p.name for p in rows.glob("*.parquet")}
    # trials with a row were terminal in Tune's state before the kill (a trial whose train function
    # returned but whose final report was not yet recorded legitimately continues on resume)
    ended_before = {name.split("-search-")[1].split("_")[0].removesuffix(".parquet") for name in done_before}
    assert len(ended_before) >= 2

    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

    from dmlbench.results import schema, store

    df, warnings = store.read_rows(out)
    assert warnings == []
    assert len(df) == 4 and df[schema.ROW_ID].is_unique
    assert done_before <= {p.name for p in rows.glob("*.parquet")}
    starts = [ln.split()[1] for ln in log.read_text().splitlines() if ln.startswith("start")]
    for trial in ended_before:
        assert starts.count(trial) == 1, f"finished trial {trial} was started again"
    assert set(df[schema.STATUS]) <= {"complete", "pruned"}


if __name__ == "__main__":
    driver(sys.argv[1], sys.argv[2])
