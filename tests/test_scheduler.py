"""The concurrent scheduler on a local Ray: cells run side by side, a cell's final phase starts while
another cell still searches, a stopped or killed sweep resumes every cell whatever its phase, and no
row is duplicated.

Two fake methods share one fake train function that sleeps per epoch: ``fake_sched_fast`` (0.3 s
in its search, 3 s in its final phase) and ``fake_sched_slow`` (5 s), each cell limited to one trial at a time (``max_concurrent=1``) on
a 2-CPU Ray, so the fast cell reaches its final phase while the slow one still searches. Every
trial start is appended to a log file, so a rerun can be checked for restarted trials.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmlbench.methods.base import Method, MethodParams
from tests.fixtures import fake_trials
from tests.fixtures.fake_trials import fold_test_embedding

pytestmark = pytest.mark.slow
METHODS_ = ("fake_sched_fast", "fake_sched_slow")


class SchedParams(MethodParams):
    quality: float = 0.5


class SchedMethod(Method):
    name = "fake_sched"
    Params = SchedParams


def register() -> None:
    from dmlbench.methods.base import METHODS

    for name in METHODS_:
        if name not in METHODS:
            METHODS.register(name)(SchedMethod)


def sleepy_train(cfg: Any, report: Any) -> Any:
    from ray import tune

    t0 = time.time()
    with Path(os.environ["SCHED_LOG"]).open("a") as fh:
        fh.write(f"start {tune.get_context().get_trial_id()} {cfg.method} {cfg.phase}\n")
    ck = Path(cfg.output_dir) / "checkpoints"
    start = int((ck / "last.pt").read_text()) if (ck / "last.pt").exists() else 0
    pause = (3.0 if cfg.phase == "final" else 0.3) if cfg.method.endswith("fast") else 5.0
    q = float(cfg.params["quality"])
    for epoch in range(start + 1, cfg.epochs + 1):
        time.sleep(pause)
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "last.pt").write_text(str(epoch))
        report(epoch, {"map_at_r": q * epoch / cfg.epochs}, str(ck))
    return SimpleNamespace(metrics={"map_at_r": q}, test_metrics={"map_at_r": q / 2} if cfg.phase == "final" else None,
                           eval_split="test" if cfg.phase == "final" else "val", best_epoch=cfg.epochs,
                           epochs_run=cfg.epochs, steps=cfg.epochs, wall_time_s=time.time() - t0, split_hash="h",
                           pretrained_id="none",
                           test_embedding=fold_test_embedding(cfg) if cfg.phase == "final" else None)  # fmt: skip


def write_spaces(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for m in METHODS_:
        (d / f"{m}.yaml").write_text(f"method: {m}\nparams:\n  - {{name: quality, type: float, low: 0.1, high: 0.9}}\n")
    return d


def make_spec(out: Path, name: str) -> Any:
    from dmlbench.orchestrator.spec import SweepSpec

    # one search fold (one model per search trial); a final seed trains the 2 fold models: rows per
    # cell = 3 search + 2 fold-model rows + 1 concatenated row
    return SweepSpec(methods=METHODS_, datasets=("digits",), backbones=("tiny",), trials=3, epochs=2, grace_period=2,
                     final_seeds=1, folds=2, search_folds=1, max_concurrent=1, output=str(out), name=name,
                     trial_base={"pretrained": False}, checkpoint_every_epochs=1)  # fmt: skip


def short_tmp() -> str:
    """Ray's socket paths must stay under ~107 characters: a short private folder, not tmp_path."""
    return tempfile.mkdtemp(prefix="rs", dir="/tmp")


@pytest.fixture(scope="module")
def ray_2cpu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    import ray

    log = tmp_path_factory.mktemp("sched") / "starts.log"
    temp = short_tmp()
    fake_trials.start_ray(sys.modules[__name__], register, temp, env_vars={"SCHED_LOG": str(log)})
    os.environ["SCHED_LOG"] = str(log)
    yield log
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    from dmlbench.methods.base import METHODS

    for m in METHODS_:
        METHODS._entries.pop(m, None)


@pytest.fixture
def spaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = write_spaces(tmp_path / "spaces")
    monkeypatch.setattr("dmlbench.search_spaces.loader.SPACES_DIR", d)
    return d


def _times(df: Any) -> Any:
    from dmlbench.results import schema

    df = df.copy()
    df["t0"] = [dt.datetime.fromisoformat(s).timestamp() for s in df[schema.STARTED_AT]]
    df["t1"] = df["t0"] + df[schema.WALL_TIME_S]
    return df


def test_cells_overlap_and_final_starts_while_another_cell_searches(ray_2cpu: Path, spaces: Path,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    from dmlbench.orchestrator import sweep
    from dmlbench.results import schema, store

    out = tmp_path / "out"
    lines: list[str] = []
    sweep.run(make_spec(out, "overlap"), train_fn=sleepy_train, echo=lines.append)
    df, warnings = store.read_rows(out)
    assert warnings == [] and len(df) == 12 and df[schema.ROW_ID].is_unique
    assert set(df[schema.STATUS]) == {"complete"}
    df = _times(df)
    fast = df[df[schema.METHOD] == "fake_sched_fast"]
    slow = df[df[schema.METHOD] == "fake_sched_slow"]
    fs, ss = fast[fast[schema.PHASE] == "search"], slow[slow[schema.PHASE] == "search"]
    # the two cells' searches ran side by side (their trial time spans intersect)
    assert fs["t0"].min() < ss["t1"].max() and ss["t0"].min() < fs["t1"].max()
    # the fast cell's final phase started before the slow cell's search ended
    fast_final = fast[fast[schema.PHASE] == "final"]
    assert len(fast_final) == 3 and fast_final["t0"].min() < ss["t1"].max()
    # rows carry what the trial read on its worker, and the learning curve it reported
    for _, r in df.iterrows():
        assert r[schema.GPU_TYPE] == "cpu" and r[schema.GIT_SHA] and r[schema.PACKAGE_VERSIONS_JSON]
        resolved = json.loads(r[schema.CONFIG_JSON])
        concat = "-concat" in r[schema.PROTOCOL]  # the 2 fold models' embeddings side by side
        assert r[schema.EMBEDDING_DIM] == resolved["embedding_dim"] * (2 if concat else 1)
        assert r[schema.IMAGE_SIZE] == resolved["image_size"] and r[schema.BN_POLICY] == resolved["bn_policy"]
        assert r[schema.CONFIG_DIGEST] and r[schema.HISTORY_JSON].count('"epoch"') == 2
        assert r[schema.CHECKPOINT_BYTES] > 0  # checkpoint_every_epochs=1: one hand-over per epoch
    assert any(x.startswith("final fake_sched_fast") for x in lines)


def test_sweep_wide_cap_runs_one_trial_at_a_time_over_all_cells(ray_2cpu: Path, spaces: Path, tmp_path: Path) -> None:
    """``--sweep-max-concurrent 1`` on the 2-CPU Ray, with no per-cell limit: each cell alone could
    run 2 trials at once, and the two cells could run side by side; with the cap no two trials'
    spans intersect, in the search or the final phase, and every row is still written."""
    from dmlbench.orchestrator import sweep
    from dmlbench.orchestrator.spec import SweepSpec
    from dmlbench.orchestrator.sweepdir import SWEEP_PROGRESS, read_progress, sweep_dir
    from dmlbench.results import schema, store

    out = tmp_path / "out"
    spec = SweepSpec(methods=("fake_sched_fast",), datasets=("digits", "synthetic"), backbones=("tiny",), trials=3,
                     epochs=2, grace_period=2, final_seeds=1, folds=2, search_folds=1, sweep_max_concurrent=1,
                     output=str(out), name="capped", trial_base={"pretrained": False})  # fmt: skip
    sweep.run(spec, train_fn=sleepy_train, echo=lambda s: None)
    df, warnings = store.read_rows(out)
    # per cell: 3 search rows + 1 seed's 2 fold-model rows and 1 concatenated row
    assert warnings == [] and len(df) == 12 and df[schema.ROW_ID].is_unique and set(df[schema.STATUS]) == {"complete"}
    df = _times(df)
    spans = sorted((g["t0"].min(), g["t1"].max(), tid) for tid, g in df.groupby(schema.TRIAL_ID))
    assert len(spans) == 8
    overlaps = [(a[2], b[2]) for a, b in zip(spans, spans[1:]) if b[0] < a[1] - 0.05]
    assert overlaps == [], f"trials ran at once under a cap of 1: {overlaps}"
    # the cap (not the cluster) set the sweep's slots, which the ETA divides the work by
    assert read_progress(sweep_dir(spec), SWEEP_PROGRESS)["slots"] == 1


def test_a_sweep_of_per_cell_experiments_is_refused_with_its_rows_kept(ray_2cpu: Path, spaces: Path,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    """A sweep started by a dmlbench that ran one Tune experiment per cell phase: the new driver says
    it cannot continue it and starts no trial; the rows written stay where they were."""
    from dmlbench.errors import ConfigError
    from dmlbench.orchestrator import sweep
    from dmlbench.orchestrator.spec import experiment_name
    from dmlbench.orchestrator.sweepdir import sweep_dir, write_spec
    from dmlbench.results import store
    from tests.test_leaderboard_fixtures import make_row

    spec = make_spec(tmp_path / "out", "old")
    write_spec(spec)
    old = sweep_dir(spec) / "tune" / experiment_name(spec, spec.cells()[0])
    old.mkdir(parents=True)
    (old / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    store.write_row(sweep_dir(spec) / store.ROWS_DIR, make_row("old-row", sweep_id=spec.sweep_id))
    before = ray_2cpu.read_text() if ray_2cpu.exists() else ""
    with pytest.raises(ConfigError, match="older dmlbench that ran one Tune experiment per cell phase.*new --name"):
        sweep.run(spec, train_fn=sleepy_train, echo=lambda s: None)
    assert (ray_2cpu.read_text() if ray_2cpu.exists() else "") == before  # no trial started
    df, warnings = store.read_rows(tmp_path / "out")
    assert warnings == [] and list(df["row_id"]) == ["old-row"]


def _wait_for(cond: Any, timeout: float, what: str, said: Any = lambda: "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} {said()}")


def _phase_running(folder: Path, spec: Any, method: str, phase: str) -> bool:
    from dmlbench.orchestrator.spec import experiment_name
    from dmlbench.orchestrator.sweepdir import read_progress

    cell = next(c for c in spec.cells() if c.method == method)
    return bool(read_progress(folder, experiment_name(spec, cell, phase)).get("running"))


def _starts(log: Path) -> list[str]:
    return [ln.split()[1] for ln in log.read_text().splitlines() if ln.startswith("start")] if log.exists() else []


def test_stop_event_then_rerun_resumes_cells_in_different_phases(ray_2cpu: Path, spaces: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from dmlbench.errors import SweepInterrupted
    from dmlbench.orchestrator import cluster
    from dmlbench.orchestrator.scheduler import run_cells
    from dmlbench.orchestrator.sweepdir import sweep_dir
    from dmlbench.results import schema, store

    # what sweep.run does before the scheduler: Tune saves experiment state every second, and the
    # resources per trial are resolved against the cluster
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")
    spec = cluster.resolve_resources(make_spec(tmp_path / "out", "stopped"), cluster.node_capacity())
    folder = sweep_dir(spec)
    stop = threading.Event()
    stopped_at = [time.time()]

    def stopper() -> None:  # stop once the fast cell is in its final phase and the slow one searches
        _wait_for(lambda: _phase_running(folder, spec, "fake_sched_fast", "final"), 120, "the fast final phase")
        stopped_at[0] = time.time()
        stop.set()

    watcher = threading.Thread(target=stopper, daemon=True)
    watcher.start()
    t0 = time.time()
    with pytest.raises(SweepInterrupted, match="rerun the same command"):
        run_cells(spec, sleepy_train, lambda s: None, stop=stop)
    assert time.time() - t0 < 90
    df, _ = store.read_rows(tmp_path / "out")
    log = ray_2cpu  # every trial start is appended there
    starts_before = _starts(log)
    # the fast cell's search ended before its final phase started (the stop's condition), so its rows
    # were written before the stop, whatever the machine's load (a row-age window was flaky under load)
    fast_search = df[(df[schema.METHOD] == "fake_sched_fast") & (df[schema.PHASE] == "search")]
    done_before = set(fast_search[schema.TRIAL_ID])
    assert len(done_before) >= 3  # at least the fast cell's search
    slow_search = df[(df[schema.METHOD] == "fake_sched_slow") & (df[schema.PHASE] == "search")]
    assert len(slow_search) < 3, "the slow cell finished its search before the stop: phases did not differ"
    assert not ((df[schema.METHOD] == "fake_sched_fast") & (df[schema.PHASE] == "final")).any()

    outcomes = run_cells(spec, sleepy_train, lambda s: None)
    df2, warnings = store.read_rows(tmp_path / "out")
    assert warnings == [] and len(df2) == 12 and df2[schema.ROW_ID].is_unique
    assert set(df2[schema.STATUS]) == {"complete"} and done_before <= set(df2[schema.TRIAL_ID])
    assert [len(o.rows) for o in outcomes] == [6, 6]
    # no trial that had ended (had its row) before the stop runs again: the stopped experiments
    # raised only once Tune's saved state had them as ended (Tune skips its final save on that path)
    reran = [t for t in set(df[schema.TRIAL_ID]) if _starts(log).count(t) > starts_before.count(t)]
    assert reran == [], f"trials that had ended before the stop ran again: {reran}"


@pytest.mark.timeout(600)
def test_killed_driver_resumes_every_cell_whatever_its_phase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL of the driver's process group while one cell is in its final phase and the other
    still searches; the same command then finishes both, reruns no finished trial, and the final
    trial that was running is continued under its own trial id (its experiment was restored)."""
    from dmlbench.orchestrator.spec import experiment_name
    from dmlbench.orchestrator.sweepdir import read_progress, sweep_dir
    from dmlbench.results import schema, store

    spaces = write_spaces(tmp_path / "spaces")
    monkeypatch.setattr("dmlbench.search_spaces.loader.SPACES_DIR", spaces)  # the spaces are in the sweep id
    out = tmp_path / "out"
    log = tmp_path / "starts.log"
    spec = make_spec(out, "killed")
    folder = sweep_dir(spec)
    # RAY_ADDRESS: set by a Ray this test process may hold (module fixture); the driver starts its own
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "SCHED_LOG": str(log), "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1]),
                                                                              os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    fast = next(c for c in spec.cells() if c.method == "fake_sched_fast")
    temps = [short_tmp(), short_tmp()]
    first_log = tmp_path / "driver1.log"
    with first_log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, __file__, str(out), str(spaces), temps[0]], env=env,
                                start_new_session=True, stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        def final_epoch_reported() -> bool:
            running = read_progress(folder, experiment_name(spec, fast, "final")).get("running") or {}
            return any(t.get("epoch", 0) >= 1 for t in running.values())

        # the final trial has reported (and handed Tune a checkpoint of) its first of two epochs
        _wait_for(final_epoch_reported, 240, "the fast final phase", lambda: first_log.read_text()[-3000:])
        running_final = set(read_progress(folder, experiment_name(spec, fast, "final"))["running"])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait()
    df, _ = store.read_rows(out)
    # trials whose row is older than Tune's state sync (~2 s) were terminal in the saved state; one
    # that ended just before the kill may legitimately run again (from its checkpoint)
    old = {p.stem for p in (folder / "rows").glob("*.parquet") if p.stat().st_mtime < killed_at - 4}
    done_before = set(df[df[schema.ROW_ID].isin(old)][schema.TRIAL_ID])
    assert len(done_before) >= 3  # at least the fast cell's search
    slow_rows = df[df[schema.METHOD] == "fake_sched_slow"]
    assert len(slow_rows) < 3, "the slow cell's search had ended: the phases did not differ at the kill"

    res = subprocess.run([sys.executable, __file__, str(out), str(spaces), temps[1]], env=env, capture_output=True,
                         text=True, timeout=400, start_new_session=True, check=False)  # fmt: skip
    for t in temps:
        shutil.rmtree(t, ignore_errors=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    df2, warnings = store.read_rows(out)
    assert warnings == [] and len(df2) == 12 and df2[schema.ROW_ID].is_unique
    assert set(df2[schema.STATUS]) == {"complete"}
    starts = _starts(log)
    for trial in done_before:
        assert starts.count(trial) == 1, f"finished trial {trial} was started again: {log.read_text()}"
    final_ids = set(df2[(df2[schema.METHOD] == "fake_sched_fast") & (df2[schema.PHASE] == "final")][schema.TRIAL_ID])
    assert final_ids == running_final, "the fast cell's final phase was not restored (a new trial ran instead)"


def driver(out: str, spaces: str, temp: str) -> None:
    from dmlbench.orchestrator import sweep
    from dmlbench.search_spaces import loader

    loader.SPACES_DIR = Path(spaces)
    fake_trials.start_ray(sys.modules[__name__], register, temp, env_vars={"SCHED_LOG": os.environ["SCHED_LOG"]})
    sweep.run(make_spec(Path(out), "killed"), train_fn=sleepy_train, echo=print)


if __name__ == "__main__":
    driver(sys.argv[1], sys.argv[2], sys.argv[3])
