"""Fault injection on real (tiny) sweeps: the rows that survive a fault equal an undisturbed run's,
and the logs of the trials show the resumption itself, not only its (deterministic) outcome.

Every sweep here trains the real engine (tiny CPU backbone, 16-px digits, 2 epochs of 3 steps, 2
search trials, no final phase, one trial at a time, deterministic mode, fixed seeds) in a
subprocess, so the test kills only processes it started. Rows are matched between runs by their
sampled params (Tune's trial ids are random) and the metric columns of complete rows must be equal.
The test method logs every optimiser step as ``<trial id> <run token> <step>`` (a new token per
``train`` call), so a restart from scratch and a resume from a checkpoint look different.

* the driver killed with SIGKILL mid-sweep: ``dmlbench sweep`` (the real CLI, built-in triplet, 4
  epochs) is killed once its first trial has a row and the second one is half-trained in Tune's
  saved state; the same command is run again: no row lost or duplicated, the finished trial is not
  started again, the half-trained one resumes after its checkpointed epoch (Tune's own result log);
* a trial's worker killed mid-epoch: a test method deletes its local checkpoints and SIGKILLs its own
  worker process in the middle of epoch 2 (after the epoch-1 checkpoint); Tune restarts it from the
  checkpoint it was handed and it resumes at step 4;
* a trial raises (a bug in a test-registered method, injected into the second trial): a ``failed``
  row with the error, and the first trial completes with the undisturbed metrics;
* an unwritable results folder (the rows folder is a file): one clear error, and the rows already
  under the same ``--output`` stay readable.

A node of a two-node cluster removed mid-sweep is not covered here (see docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METRICS = ["map_at_r", "r_precision", "precision_at_1", "nmi", "f1", "recall_at_1", "recall_at_2"]
TRIAL_BASE = {"image_size": 16, "iters_per_epoch": 3, "deterministic": True, "eval_batch_size": 256}
#: the driver-kill sweep: 6 epochs, so the second trial is half-trained for a few seconds
CLI_EPOCHS = 6
SWEEP_ARGS = ["--datasets", "digits", "--preset", "smoke", "--trials", "2", "--epochs", str(CLI_EPOCHS),
              "--grace-period", str(CLI_EPOCHS), "--final-seeds", "0", "--max-concurrent", "1", "--seed", "3",
              "--checkpoint-every-epochs", "1"]  # fmt: skip
STEPS_PER_EPOCH = TRIAL_BASE["iters_per_epoch"]


# ---- the test method (registered in the driver and in every Ray worker) ---------------------------
def register() -> None:
    from dmlbench.methods import METHODS
    from dmlbench.methods.baselines import Triplet

    if "rel_triplet" in METHODS:
        return

    class RelTriplet(Triplet):
        """Triplet that logs every step and, per ``REL_MODE``, kills its worker mid-epoch 2 (once per
        flag file) or raises in the second trial to start."""

        def loss(self, batch: Any) -> Any:
            if os.environ.get("REL_MODE") == "raise" and self._order() == 1:
                raise RuntimeError("rel_triplet: injected bug")
            return super().loss(batch)

        def on_step_end(self, ctx: Any) -> None:
            super().on_step_end(ctx)
            model = _trial_id() if ctx.cfg.phase == "search" else f"{_trial_id()}/fold{ctx.cfg.fold}"
            with open(os.environ["REL_LOG"], "a") as fh:
                fh.write(f"{model} {self._token()} {ctx.step}\n")
            # ctx.epoch is the last finished epoch: 1 = after the first step of epoch 2 (of >= 2 steps);
            # "killfinal": after the first step of epoch 2 of the final phase's second fold model, by
            # step count (a model resumed for its next chunk has finished no epoch in this call yet)
            mode = os.environ.get("REL_MODE")
            killing = (mode == "kill" and ctx.epoch == 1) or (
                mode == "killfinal" and ctx.cfg.phase == "final" and ctx.cfg.fold == 1
                and ctx.step == ctx.cfg.iters_per_epoch + 1
            )  # fmt: skip
            if killing and _first(Path(os.environ["REL_FLAG"])):
                # the worker dies with its local files (as when its node is lost): the restarted trial
                # can only resume from the checkpoint Tune hands back (a final seed's: all its models)
                work = Path(ctx.cfg.output_dir)
                shutil.rmtree(work.parent if ctx.cfg.phase == "final" else work / "checkpoints")
                os.kill(os.getpid(), signal.SIGKILL)

        def _token(self) -> str:
            """One token per ``train`` call (the method is built anew by every call)."""
            if "_rel_token" not in self.__dict__:
                self.__dict__["_rel_token"] = uuid.uuid4().hex[:12]
            return str(self.__dict__["_rel_token"])

        def _order(self) -> int:
            """0 for the first trial to start training, 1 for the second, ..."""
            if "_rel_order" not in self.__dict__:
                self.__dict__["_rel_order"] = _claim(Path(os.environ["REL_FLAG"] + "-order"), _trial_id())
            return int(self.__dict__["_rel_order"])

    RelTriplet.name = "rel_triplet"
    METHODS.register("rel_triplet")(RelTriplet)


def _trial_id() -> str:
    from ray import tune

    return str(tune.get_context().get_trial_id())


def _first(flag: Path) -> bool:
    """True for exactly one caller across processes (creates ``flag`` exclusively)."""
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _claim(folder: Path, key: str) -> int:
    """The arrival order of ``key`` in ``folder`` (0, 1, ...), claimed atomically across processes."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(100):
        if _first(folder / str(i)):
            (folder / str(i)).write_text(key)
            return i
    raise RuntimeError("more than 100 trials")


def _runs(log: Path) -> dict[str, list[list[int]]]:
    """Per trial, the steps of each ``train`` call, in the order the calls started."""
    tokens: dict[str, dict[str, list[int]]] = {}
    for line in log.read_text().splitlines():
        trial, token, step = line.split()
        tokens.setdefault(trial, {}).setdefault(token, []).append(int(step))
    return {trial: list(by_token.values()) for trial, by_token in tokens.items()}


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
    env = {k: os.environ[k] for k in ("REL_MODE", "REL_FLAG", "REL_LOG", "REL_FINAL") if k in os.environ}
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": register, "env_vars": env})  # fmt: skip
    final = os.environ.get("REL_FINAL") == "1"  # one search trial, then one final seed of 3 fold models
    spec = sweep.build_spec(methods="rel_triplet", datasets="digits", preset="smoke", trials=1 if final else 2,
                            epochs=2, grace_period=2, final_seeds=1 if final else 0, max_concurrent=1, seed=3,
                            output=out, name=name, checkpoint_every_epochs=1)  # fmt: skip
    spec = spec.model_copy(update={"trial_base": {**spec.trial_base, **TRIAL_BASE}})
    from dmlbench.errors import DmlbenchError

    try:
        sweep.run(spec, echo=print)
    except DmlbenchError as err:  # what the CLI's @friendly does
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# ---- helpers ---------------------------------------------------------------------------------------
def _env(tmp: Path, ray_tmpdir: str, mode: str = "none") -> dict[str, str]:
    return {**os.environ, "REL_MODE": mode, "REL_FLAG": str(tmp / f"flag-{mode}"), "REL_LOG": str(tmp / f"steps-{mode}.log"),
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmpdir}  # fmt: skip


def _run_driver(
    tmp: Path, ray_tmpdir: str, out: Path, mode: str, name: str = "rel", final: bool = False
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, __file__, str(out), name]
    return subprocess.run(
        cmd,
        check=False,
        env={**_env(tmp, ray_tmpdir, mode), "REL_FINAL": "1" if final else "0"},
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
def baseline(tmp_path_factory: pytest.TempPathFactory, ray_tmpdir: str) -> dict[str, dict[str, Any]]:
    """The undisturbed rel_triplet sweep."""
    tmp = tmp_path_factory.mktemp("baseline")
    res = _run_driver(tmp, ray_tmpdir, tmp / "out", "none")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _rows(tmp / "out")
    assert len(rows) == 2 and all(r["status"] == "complete" for r in rows.values())
    every_step = list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert list(_runs(tmp / "steps-none.log").values()) == [[every_step], [every_step]]
    return rows


# ---- the faults ------------------------------------------------------------------------------------
def test_worker_killed_mid_epoch_resumes_from_checkpoint(
    tmp_path: Path, ray_tmpdir: str, baseline: dict[str, dict[str, Any]]
) -> None:
    res = _run_driver(tmp_path, ray_tmpdir, tmp_path / "out", "kill")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "flag-kill").exists(), "the worker was never killed"
    runs = _runs(tmp_path / "steps-kill.log")
    (killed,) = [t for t, r in runs.items() if len(r) > 1]
    first, second = runs[killed]
    # killed mid-run: after the first step of epoch 2, with epoch 2's other steps still to do
    assert first == list(range(1, STEPS_PER_EPOCH + 2))
    # the restarted call resumed from the epoch-1 checkpoint: only epoch 2's steps, from step 4
    assert second == list(range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1)), "restarted instead of resumed"
    # the other trial ran once, start to end
    assert [r for t, r in runs.items() if t != killed] == [[list(range(1, 2 * STEPS_PER_EPOCH + 1))]]
    rows = _rows(tmp_path / "out")
    assert rows.keys() == baseline.keys()
    for key, row in rows.items():
        _same_metrics(row, baseline[key])


def test_worker_killed_in_a_final_seeds_second_fold_model_resumes_that_model(
    tmp_path: Path, ray_tmpdir: str
) -> None:
    """A final seed trains its 3 fold models in turn, pausing each at every checkpoint epoch
    (``--checkpoint-every-epochs 1``: chunks of one epoch, then a checkpoint of all three models);
    its worker dies (local files gone) in the second model's epoch 2. Tune restarts the trial from
    that checkpoint: every model resumes after its epoch 1 (the first one's epoch 2 is the work lost,
    trained again), none starts over, and every row (each fold model's, the concatenation's)
    equals an undisturbed run's."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    res = _run_driver(tmp_path / "a", ray_tmpdir, tmp_path / "a" / "out", "none", final=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = _run_driver(tmp_path / "b", ray_tmpdir, tmp_path / "b" / "out", "killfinal", final=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "b" / "flag-killfinal").exists(), "the worker was never killed"
    epoch1 = list(range(1, STEPS_PER_EPOCH + 1))
    epoch2 = list(range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1))
    runs = _runs(tmp_path / "b" / "steps-killfinal.log")
    (tid,) = {m.split("/")[0] for m in runs if "/fold" in m}
    # one train call per chunk: epoch 1, then epoch 2; nothing restarts at step 1 after the kill
    assert runs[f"{tid}/fold0"] == [epoch1, epoch2, epoch2], "not resumed from the epoch-1 checkpoint"
    assert runs[f"{tid}/fold1"] == [epoch1, epoch2[:1], epoch2], "restarted, not resumed"
    assert runs[f"{tid}/fold2"] == [epoch1, epoch2]
    undisturbed = _runs(tmp_path / "a" / "steps-none.log")
    # the search trial (one model) in one call, each fold model in two chunks
    assert sorted(len(r) for r in undisturbed.values()) == [1, 2, 2, 2]

    from dmlbench.results import schema, store

    def final_rows(out: Path) -> dict[str, dict[str, Any]]:
        df, warnings = store.read_rows(out)
        assert warnings == [] and df[schema.ROW_ID].is_unique
        fin = df[df[schema.PHASE] == "final"]
        return {f"{r[schema.PROTOCOL]}/{r[schema.FOLD]}": r for r in fin.to_dict("records")}

    killed, base = final_rows(tmp_path / "b" / "out"), final_rows(tmp_path / "a" / "out")
    assert killed.keys() == base.keys() and len(base) == 4  # 3 fold models + their concatenation
    for key, row in killed.items():
        _same_metrics(row, base[key])


def test_trial_raising_is_a_failed_row_and_the_sweep_goes_on(
    tmp_path: Path, ray_tmpdir: str, baseline: dict[str, dict[str, Any]]
) -> None:
    res = _run_driver(tmp_path, ray_tmpdir, tmp_path / "out", "raise")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _rows(tmp_path / "out")
    # the first trial is the baseline's first (same seed), so the second gets the same point too
    assert rows.keys() == baseline.keys()
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "rel_triplet: injected bug" in failed[0]["error"]
    second = (tmp_path / "flag-raise-order" / "1").read_text()
    assert failed[0]["trial_id"] == second
    (key,) = [k for k, r in rows.items() if r["status"] != "failed"]
    _same_metrics(rows[key], baseline[key])
    assert list(_runs(tmp_path / "steps-raise.log")) == [rows[key]["trial_id"]]  # the failed one never stepped


def test_results_folder_unwritable_is_a_clear_error_and_rows_stay_readable(
    tmp_path: Path, ray_tmpdir: str, baseline: dict[str, dict[str, Any]]
) -> None:
    from dmlbench.results import store

    out = tmp_path / "out"
    # a finished sweep's rows are already under --output
    res = _run_driver(tmp_path, ray_tmpdir, out, "none", name="first")
    assert res.returncode == 0, res.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in (out / "first" / "rows").iterdir()}
    # the next sweep cannot write its rows: its rows "folder" is a file
    (out / "second").mkdir()
    (out / "second" / "rows").write_text("not a folder")
    res = _run_driver(tmp_path, ray_tmpdir, out, "none", name="second")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write") and str(out / "second" / "rows") in last, last
    assert {p.name: p.read_bytes() for p in (out / "first" / "rows").iterdir()} == before
    df, warnings = store.read_rows(out / "first")
    assert warnings == [] and len(df) == 2


def _tune_reports(tune_root: Path) -> dict[str, Any]:
    """Tune's saved view of every trial of the experiments under ``tune_root``: status, last saved
    result, whether it has a checkpoint, and its result log as (iterations since restore, epoch)."""
    from ray import tune

    out: dict[str, Any] = {}
    for exp in sorted(tune_root.glob("*")):
        if not tune.Tuner.can_restore(str(exp)):
            continue
        analysis = tune.ExperimentAnalysis(str(exp))
        for t in analysis.trials:
            df = analysis.trial_dataframes.get(t.trial_id)
            log = []
            if df is not None and len(df) and "trial_epoch" in df:
                df = df[df["trial_epoch"].notna()]
                log = [(int(a), int(b)) for a, b in zip(df["iterations_since_restore"], df["trial_epoch"])]
            out[t.trial_id] = {"status": t.status, "epoch": (t.last_result or {}).get("trial_epoch"),
                               "checkpoint": t.checkpoint is not None, "log": log}  # fmt: skip
    return out


def _starts(log: list[tuple[int, int]]) -> list[int]:
    """The first epoch reported by each (re)start of a trial (Tune counts iterations since restore)."""
    return [epoch for since_restore, epoch in log if since_restore == 1]


def test_driver_sigkill_then_same_command_resumes(tmp_path: Path, ray_tmpdir: str) -> None:
    """Through the real CLI on the built-in triplet method: undisturbed vs killed-and-rerun."""
    base_out, out = tmp_path / "base", tmp_path / "out"
    cmd = [sys.executable, "-m", "dmlbench.cli", "sweep", "--methods", "triplet", *SWEEP_ARGS, "--name", "k"]
    env = _env(tmp_path, ray_tmpdir)
    undisturbed = subprocess.run([*cmd, "--output", str(base_out)], check=False, env=env, capture_output=True, text=True,
                                 timeout=400, start_new_session=True)  # fmt: skip
    assert undisturbed.returncode == 0, undisturbed.stdout[-3000:] + undisturbed.stderr[-3000:]

    rows_dir, tune_root = out / "k" / "rows", out / "k" / "tune"
    proc = subprocess.Popen([*cmd, "--output", str(out)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    half: tuple[str, int] | None = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and half is None:
            time.sleep(0.2)
            if len(list(rows_dir.glob("*.parquet"))) != 1:
                continue
            try:
                saved = _tune_reports(tune_root)
            except Exception:  # Tune is replacing its state file right now: look again
                continue
            for tid, t in saved.items():
                # half-trained in the state a restarted driver restores (Tune saves a running trial
                # as pending): an epoch >= 1 checkpointed, epochs still to train
                unfinished = t["status"] not in ("TERMINATED", "ERROR")
                if unfinished and t["checkpoint"] and 1 <= (t["epoch"] or 0) <= CLI_EPOCHS - 2:
                    half = (tid, int(t["epoch"]))
        # the fault lands mid-run: the driver is alive, one trial has its row, one is half-trained
        assert proc.poll() is None, "the first driver finished before it could be killed"
        assert half is not None, "the first driver never had a half-trained trial in its saved state"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    first = {p.name: p.read_bytes() for p in rows_dir.glob("*.parquet")}
    assert len(first) == 1, "work was not unfinished when the driver was killed"
    before = _tune_reports(tune_root)
    (done,) = [tid for tid, t in before.items() if t["status"] == "TERMINATED"]
    last_logged = before[half[0]]["log"][-1][1]

    again = subprocess.run([*cmd, "--output", str(out)], check=False, env=env, capture_output=True, text=True, timeout=400,
                           start_new_session=True)  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows, expected = _rows(out), _rows(base_out)
    assert rows.keys() == expected.keys()
    for key, row in rows.items():
        _same_metrics(row, expected[key])
    after = {p.name: p.read_bytes() for p in rows_dir.glob("*.parquet")}
    assert first.keys() <= after.keys() and len(after) == 2
    reports = _tune_reports(tune_root)
    # the finished trial was not started again; the half-trained one restarted once, after its checkpoint
    assert _starts(reports[done]["log"]) == [0], f"finished trial {done} was started again"
    fresh, resumed = _starts(reports[half[0]]["log"])
    assert fresh == 0 and half[1] + 1 <= resumed <= last_logged + 1, (half, last_logged, reports[half[0]]["log"])
    assert [e for _, e in reports[half[0]]["log"]][-1] == CLI_EPOCHS
    for name in first:  # the finished trial's row is the one written before the kill
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
