"""The Ray Tune experiment of one cell: its search (Optuna + ASHA) or its final phase (the best params
retrained with the final seeds), and the rows its terminal trials become.

One experiment = one ``tune.Tuner`` with a deterministic name (:func:`spec.experiment_name`), so a
restarted driver restores it with ``Tuner.restore``. Rows are written twice, idempotently (row ids
are deterministic): by :class:`RowCallback` as each trial ends (so a killed driver loses no finished
trial), and once more for every terminal trial after ``fit`` returns (which also surfaces a row that
could not be written). The callback holds only plain, picklable data: Tune saves it with the
experiment and hands it back on restore, so no private Tune attribute is ever patched.

Several cells' experiments run at once, each ``fit`` in its own thread (:mod:`.scheduler`), so:

* every experiment registers its trainable under its own name (:func:`trainable_name`); Tune's
  default, the function's name, would let one cell's trials run with another cell's settings;
* Tune catches Ctrl-C only in the main thread, so an experiment is stopped through
  :func:`.interrupts.stop_on`: once its event is set, the experiment's
  :class:`~.interrupts.StopCallback` raises :class:`SweepInterrupted` at a step of the experiment
  loop, after the experiment state Tune saved shows every trial that ended as ended (Tune skips its
  final save on that path; a rerun restores the saved state, like after a killed driver);
* the callback keeps ``progress/<experiment>.json`` (running trials with epoch and latest
  metric, the start and end of each finished trial) for the live view and ``dmlbench status``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from dmlbench.errors import DmlbenchError, SweepInterrupted
from dmlbench.orchestrator import cluster, interrupts
from dmlbench.orchestrator.limits import CellLimiter, SeedConfigs
from dmlbench.orchestrator.planning import (
    asha_rungs,
    cell_base,
    cell_seed,
    cell_settings,
    cell_space,
    final_seeds,
    group_stops,
    search_concurrency,
    search_folds,
)
from dmlbench.orchestrator.rows import build_row, sampled_params
from dmlbench.orchestrator.spec import Cell, SweepSpec, experiment_name
from dmlbench.orchestrator.sweepdir import read_progress, stamp_progress, sweep_dir, write_progress
from dmlbench.orchestrator.trainable import (
    EPOCH_KEY,
    ERROR_KEY,
    STATUS_KEY,
    SUMMARY_KEY,
    TIME_ATTR,
    TrainFn,
    run_trial,
)
from dmlbench.results import schema, store

log = logging.getLogger(__name__)


@dataclass
class CellOutcome:
    """What one cell produced: its rows by id and the best search trial's params and score."""

    cell: Cell
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    best_params: dict[str, Any] | None = None
    best_score: float | None = None


@dataclass
class RowSink:
    """Everything needed to turn a terminal Tune trial of one experiment into a row (plain data)."""

    spec: SweepSpec
    cell: Cell
    phase: str
    base: dict[str, Any]
    experiment: str
    #: the trials train several fold models (their search row has fold NULL)
    group: bool = False

    def rows(self, trial: Any) -> list[dict[str, Any]]:
        """Build and write the rows of a terminal trial; returns them. A final trial of fold models
        gives one row per fold model and one for their concatenated embedding; any other trial one."""
        from dmlbench.search_spaces.loader import build_trial_config

        params = sampled_params(dict(trial.config))
        final = self.phase == "final"
        seed = int(params.pop("seed", self.base["seed"])) if final else int(self.base["seed"])
        params.pop("fold", None)
        base = {**self.base, "seed": seed}
        last = dict(trial.last_result or {})
        error = _error_text(trial) if trial.status == "ERROR" else None
        summary = json.loads(last.get(SUMMARY_KEY) or "{}")
        out_dir = sweep_dir(self.spec) / store.ROWS_DIR

        def config_json(b: dict[str, Any]) -> str | None:
            try:
                return build_trial_config(b, params).to_json()
            except DmlbenchError:
                return None

        parts = summary.get("folds") if final and last.get(STATUS_KEY) == "complete" else None
        if not parts:
            row = build_row(self.spec, self.cell, self.phase, trial.trial_id, config_json(base), params, last, error,
                            seed, None if self.group else base["fold"], base)  # fmt: skip
            store.write_row(out_dir, row)
            return [row]
        rows = []
        for part in parts:
            fb = {**base, "fold": part["fold"]}
            fold_last = {**last, SUMMARY_KEY: json.dumps(part)}
            rows.append(build_row(self.spec, self.cell, self.phase, trial.trial_id, config_json(fb), params, fold_last,
                                  None, seed, part["fold"], fb, row_suffix=f"-f{part['fold']}"))  # fmt: skip
        dim = int(base.get("embedding_dim") or 0) * len(parts)
        concat = summary.get("concatenated")
        concat_summary = {**summary, "metrics": concat or {}, "test_metrics": concat or None}
        concat_last = {**last, SUMMARY_KEY: json.dumps(concat_summary)}
        if concat is None:
            concat_last.update({STATUS_KEY: "failed", ERROR_KEY: summary.get("concatenated_error", "no concatenation")})
        rows.append(build_row(self.spec, self.cell, self.phase, trial.trial_id,
                              config_json({**base, "fold": parts[0]["fold"]}), params, concat_last, None, seed, None,
                              {**base, "embedding_dim": dim}, concatenated=True, row_suffix="-concat"))  # fmt: skip
        for row in rows:
            store.write_row(out_dir, row)
        return rows


class RowCallback(tune.Callback):  # type: ignore[misc]
    """Writes a row as each trial ends and keeps the experiment's progress file (live view,
    ``dmlbench status``); stopping is :class:`~dmlbench.orchestrator.interrupts.StopCallback`'s.

    A failed write (disk full) is logged, not raised: an exception inside a Tune callback would end
    the experiment with a traceback; the driver writes every row again after ``fit`` and raises there.
    """

    def __init__(self, sink: RowSink, planned: int, budget: int):
        self.sink = sink
        self.planned = planned
        self.budget = budget
        self.running: dict[str, dict[str, Any]] = {}
        self.ended: dict[str, dict[str, Any]] = {}

    def _progress(self) -> None:
        state = {
            "cell": self.sink.cell.key, "phase": self.sink.phase, "planned": self.planned, "budget": self.budget,
            "running": self.running, "ended": self.ended,
        }  # fmt: skip
        try:
            write_progress(sweep_dir(self.sink.spec), self.sink.experiment, state)
        except OSError as err:
            log.warning("progress of %s not written (%s)", self.sink.experiment, err)

    def setup(self, **info: Any) -> None:
        # a restored experiment keeps the times of the trials that ended before the restart
        old = read_progress(sweep_dir(self.sink.spec), self.sink.experiment).get("ended")
        if isinstance(old, dict):
            self.ended = {**old, **self.ended}
        self._progress()

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.running[trial.trial_id] = {"started": time.time(), "epoch": 0, "metric": None}
        self._progress()

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:  # fmt: skip
        entry = self.running.setdefault(trial.trial_id, {"started": time.time(), "epoch": 0, "metric": None})
        if isinstance(result.get(EPOCH_KEY), (int, float)):
            entry["epoch"] = int(result[EPOCH_KEY])
        value = result.get(self.sink.spec.metric)
        if isinstance(value, (int, float)) and result.get(EPOCH_KEY) is not None:
            entry["metric"] = float(value)
        self._progress()

    def _ended(self, trial: Any) -> None:
        row: dict[str, Any] = {}
        try:
            rows = self.sink.rows(trial)
            row = rows[0] if rows else {}
        except DmlbenchError as err:
            log.warning("row of trial %s not written yet (%s); retried when the experiment ends", trial.trial_id, err)
        entry = self.running.pop(trial.trial_id, None)
        value = row.get(self.sink.spec.metric)
        self.ended[trial.trial_id] = {
            "started": entry["started"] if entry else time.time(), "ended": time.time(),
            "status": row.get(schema.STATUS), "metric": float(value) if isinstance(value, (int, float)) else None,
        }  # fmt: skip
        self._progress()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # experiments saved by an older dmlbench hold only ``sink`` and a set of running trial ids;
        # trials running when the driver stopped start again after a restore
        self.__dict__.update(state)
        self.running = {}
        self.ended = dict(state.get("ended") or {})
        self.planned = int(state.get("planned") or 0)
        self.budget = int(state.get("budget") or 0)


def _error_text(trial: Any) -> str:
    for attr in ("error_msg", "error_message"):
        msg = getattr(trial, attr, None)
        if msg:
            return str(msg).strip().splitlines()[-1][:2000]
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = Path(path).read_text().strip().splitlines()
        return lines[-1][:2000] if lines else "trial errored"
    return "trial errored (see the Ray logs)"


def _cell_split_hash(base: dict[str, Any]) -> str | None:
    """The fold-manifest hash of a cell (the same for every trial and fold), read once here rather
    than by every trial; None when the dataset cannot be read (the trials then fail with the reason)."""
    from dmlbench.engine.trainer import split_hash
    from dmlbench.search_spaces.loader import build_trial_config

    try:
        return split_hash(build_trial_config(base, {}))
    except DmlbenchError:
        return None


_REGISTER = threading.Lock()


def trainable_name(cell: Cell, phase: str) -> str:
    """The name an experiment's trainable is registered under: unique per cell and phase, so
    experiments running side by side never resolve each other's trainable."""
    return f"{cell.slug}-{phase}"


def trainable(spec: SweepSpec, base: dict[str, Any], train_fn: TrainFn | None, name: str,
              folds: list[int | None] | None = None, stops: list[int] | None = None) -> str:  # fmt: skip
    """Register ``run_trial`` bound to the cell's defaults and the folds of its models (search: the
    search folds; final: every fold, or one full-train model; a group's models pause in turn at
    ``stops``: ASHA's rungs and periodic checkpoints, :func:`planning.group_stops`), with the
    trial's resource request, as ``name``; returns the name (what the Tuner gets)."""
    fn = tune.with_parameters(run_trial, base=base, metric=spec.metric, train_fn=train_fn,
                              split_hash=_cell_split_hash(base), folds=folds, stops=stops,
                              checkpoint_every=(spec.checkpoint_period_s, spec.checkpoint_every_epochs))  # fmt: skip
    res: dict[str, float] = {"cpu": spec.cpus_per_trial}
    if spec.gpus_per_trial:  # resolved by cluster.resolve_resources before any experiment starts
        res["gpu"] = spec.gpus_per_trial
    with _REGISTER:  # Tune's registry flushes a shared dict: one registration at a time
        tune.register_trainable(name, tune.with_resources(fn, res))
    return name


def sampler(spec: SweepSpec, cell: Cell) -> Any:
    """The cell's Optuna TPE sampler: seeded per cell, with explicit settings (not version defaults)."""
    import optuna

    return optuna.samplers.TPESampler(
        seed=cell_seed(spec, cell),
        n_startup_trials=max(1, min(10, spec.trials // 3)),
        n_ei_candidates=24,
        multivariate=False,
        constant_liar=True,
    )


def run_config(spec: SweepSpec, sink: RowSink, planned: int) -> Any:
    return tune.RunConfig(
        name=sink.experiment,
        storage_path=cluster.storage_root(spec),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        # the experiment state (trial statuses, searcher) reaches the storage path within ~2 s:
        # a killed driver then restores finished trials as finished (Ray's default syncs every 300 s)
        sync_config=tune.SyncConfig(sync_period=2),
        callbacks=[RowCallback(sink, planned, cell_settings(spec, sink.cell).epochs),
                   interrupts.StopCallback(spec.sweep_id, f"{cluster.storage_root(spec)}/{sink.experiment}")],
        verbose=0,
    )


def storage_fs(path: str) -> tuple[Any, str]:
    """The pyarrow filesystem and the path in it of a Tune storage path (local or ``s3://...``)."""
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def relink_checkpoints(fs: Any, exp_path: str, wanted: list[str]) -> list[str]:
    """Give every checkpoint folder in ``wanted`` (``<trial dir>/checkpoint_<n>``, relative to
    ``exp_path``) that is gone or incomplete the contents of its trial's newest complete checkpoint;
    returns the folders it filled.

    Why: Tune deletes a trial's previous checkpoint as soon as it registers the next one, but writes
    and syncs its experiment state only every second or two (``sync_period``). A driver killed in
    between leaves a state that names the deleted checkpoint, and ``Tuner.restore`` then fails that
    trial ("Could not recover from checkpoint as it does not exist on storage anymore"). The newer
    checkpoint is there (a worker uploads it before the driver hears of it) and holds the trial's
    own epoch and best-so-far (:data:`STATE_FILE`), so the trial resumes from it: less work lost,
    nothing made up. A folder is complete when it has its :data:`STATE_FILE`, which is copied last.
    """
    import pyarrow.fs as pafs

    from dmlbench.orchestrator.trainable import STATE_FILE

    filled = []
    for rel in wanted:
        trial_dir, name = rel.rsplit("/", 1)
        target = f"{exp_path}/{rel}"
        if fs.get_file_info(f"{target}/{STATE_FILE}").type == pafs.FileType.File:
            continue
        infos = fs.get_file_info(pafs.FileSelector(f"{exp_path}/{trial_dir}", allow_not_found=True))
        complete = sorted(
            i.base_name for i in infos
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_") and i.base_name != name
            and fs.get_file_info(f"{i.path}/{STATE_FILE}").type == pafs.FileType.File
        )  # fmt: skip
        if not complete:
            continue  # nothing to resume from: Tune reports the trial's checkpoint as lost
        source = f"{exp_path}/{trial_dir}/{complete[-1]}"
        files = [i for i in fs.get_file_info(pafs.FileSelector(source, recursive=True)) if i.type == pafs.FileType.File]
        files.sort(key=lambda i: i.base_name == STATE_FILE)  # the state file last: it marks the copy complete
        for info in files:
            dest = f"{target}/{info.path[len(source) + 1:]}"
            fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            fs.copy_file(info.path, dest)
        fs.delete_dir(source)  # Tune does not know it; its index is reused by the trial's next checkpoint
        log.warning("%s: the experiment state named %s, which was gone (the driver stopped between a checkpoint and "
                    "the next state save); it now holds %s, the trial's newest checkpoint", exp_path, rel, complete[-1])  # fmt: skip
        filled.append(rel)
    return filled


def relink_lost_checkpoints(path: str) -> list[str]:
    """:func:`relink_checkpoints` for the unfinished trials of the experiment saved at ``path``,
    before ``Tuner.restore`` resumes them."""
    try:
        fs, exp_path = storage_fs(path)
        wanted = ["/".join(t.checkpoint.path.rstrip("/").split("/")[-2:]) for t in tune.ExperimentAnalysis(path).trials
                  if t.status not in interrupts.ENDED_STATUSES and t.checkpoint is not None]  # fmt: skip
        return relink_checkpoints(fs, exp_path.rstrip("/"), wanted)
    except Exception as err:  # a repair only: Tuner.restore reports what is really wrong with the state
        log.warning("%s: lost checkpoints not checked before the restore (%s: %s)", path, type(err).__name__, err)
        return []


def fit(spec: SweepSpec, sink: RowSink, make_tuner: Callable[[], Any], fn: Any, out: CellOutcome) -> None:
    """Run (or restore and continue) the experiment; every terminal trial ends as a row in ``out``.

    Raises :class:`SweepInterrupted` when ``fit`` returned with unfinished trials (Ctrl-C: Tune
    saved its state first) or the sweep was asked to stop (:mod:`.interrupts`), so the caller stops
    instead of moving on; trials interrupted while running stay unfinished (no row) and continue from
    their last checkpoint when the same command runs again.
    """
    interrupts.raise_if_requested(f"experiment {sink.experiment}")  # Ctrl-C: nothing new starts
    if interrupts.stop_requested(spec.sweep_id):
        raise SweepInterrupted(f"sweep stopped before {sink.experiment} started; rerun the same command to continue.")
    path = f"{cluster.storage_root(spec)}/{sink.experiment}"
    if tune.Tuner.can_restore(path):
        relink_lost_checkpoints(path)
        tuner = tune.Tuner.restore(path, trainable=fn, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)  # fmt: skip
    else:
        tuner = make_tuner()
    tuner.fit()
    # the experiment state Tune saved when fit returned (public API; the ResultGrid hides statuses)
    trials = tune.ExperimentAnalysis(path).trials
    unfinished = 0
    for trial in trials:
        if trial.status not in interrupts.ENDED_STATUSES:
            unfinished += 1
            continue
        for row in sink.rows(trial):
            out.rows[row[schema.ROW_ID]] = row
    # when fit returned and its rows were read: the ETA measures each experiment's wrap-up after its
    # last trial from it (the callback rewrites the file without it when the experiment runs again)
    stamp_progress(sweep_dir(spec), sink.experiment, "closed")
    if unfinished or interrupts.requested() or interrupts.stop_requested(spec.sweep_id):
        raise SweepInterrupted(
            f"sweep interrupted with {unfinished} unfinished trial(s) in {sink.experiment}; rerun the same command "
            "(or add --resume) to continue where it stopped."
        )


def run_search(spec: SweepSpec, cell: Cell, train_fn: TrainFn | None, out: CellOutcome) -> None:
    """The cell's search: Optuna (TPE, seeded) proposes, ASHA prunes on the validation metric."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from dmlbench.search_spaces.loader import load_space, load_space_file

    override = None
    if spec.search_space and load_space_file(spec.search_space).method == cell.method:
        override = spec.search_space
    space = cell_space(spec, load_space(cell.method, override), cell)
    base = cell_base(spec, cell, "search")
    st = cell_settings(spec, cell)
    folds: list[int | None] = list(search_folds(spec))
    # a row of a group stands for its fold models (fold NULL; each model's score is in its metrics)
    sink = RowSink(spec, cell, "search", base, experiment_name(spec, cell), group=len(folds) > 1)
    stops = group_stops(st.epochs, asha_rungs(st.grace, spec.reduction_factor, st.epochs), spec.checkpoint_every_epochs)
    fn = trainable(spec, base, train_fn, trainable_name(cell, "search"), folds=folds, stops=stops)

    def make() -> Any:
        search: Any = OptunaSearch(space=space.define_by_run(), metric=spec.metric, mode=spec.mode,
                                   sampler=sampler(spec, cell), study_name=sink.experiment)  # fmt: skip
        limit = search_concurrency(spec)
        if limit or spec.sweep_max_concurrent:
            search = CellLimiter(search, limit or spec.trials, spec.sweep_id, sink.experiment, spec.trials)
        asha = ASHAScheduler(time_attr=TIME_ATTR, metric=spec.metric, mode=spec.mode, max_t=st.epochs,
                             grace_period=st.grace, reduction_factor=spec.reduction_factor)  # fmt: skip
        return tune.Tuner(
            fn,
            tune_config=tune.TuneConfig(search_alg=search, scheduler=asha, num_samples=spec.trials, reuse_actors=True),
            run_config=run_config(spec, sink, spec.trials),
        )

    fit(spec, sink, make, fn, out)
    pick_best(spec, out)


def run_final(spec: SweepSpec, cell: Cell, best_params: dict[str, Any], train_fn: TrainFn | None,
              out: CellOutcome) -> None:  # fmt: skip
    """The cell's final phase: the best params with each final seed (:class:`.limits.SeedConfigs`), no pruning.

    Each seed's trial trains every fold model (train minus fold i, checkpoint selected on fold i:
    early stopping, CCP stages), so nothing is ever selected on test data, and scores each once on
    the test split; its rows are one per fold model and one for their concatenated embedding
    (:mod:`dmlbench.orchestrator.folds`). A ``paper`` cell without fold models trains one model on
    all training classes per seed, scored on test at its last epoch.
    """
    st = cell_settings(spec, cell)
    base = cell_base(spec, cell, "final")
    folds: list[int | None] = list(range(spec.folds)) if st.fold_models else [None]
    if len(folds) > 1:
        base = {**base, "fold": None}
    sink = RowSink(spec, cell, "final", base, experiment_name(spec, cell, phase="final"))
    fn = trainable(spec, base, train_fn, trainable_name(cell, "final"), folds=folds,
                   stops=group_stops(st.epochs, every_epochs=spec.checkpoint_every_epochs))
    configs = [{**best_params, "seed": seed} for seed in final_seeds(spec)]

    def make() -> Any:
        seeds = CellLimiter(SeedConfigs(configs, spec.metric, spec.mode), spec.max_concurrent or len(configs),
                            spec.sweep_id, sink.experiment, len(configs))  # fmt: skip
        return tune.Tuner(
            fn,
            tune_config=tune.TuneConfig(search_alg=seeds, num_samples=len(configs), reuse_actors=True),
            run_config=run_config(spec, sink, spec.final_seeds),
        )

    fit(spec, sink, make, fn, out)


def pick_best(spec: SweepSpec, out: CellOutcome) -> None:
    """Best complete search trial of the cell (by the validation metric)."""
    sign = 1.0 if spec.mode == "max" else -1.0
    for row in out.rows.values():
        if row[schema.PHASE] != "search" or row[schema.STATUS] != "complete":
            continue
        score = json.loads(row[schema.METRICS_JSON] or "{}").get(spec.metric)
        if score is None:
            continue
        if out.best_score is None or sign * score > sign * out.best_score:
            out.best_score = float(score)
            out.best_params = json.loads(row[schema.PARAMS_JSON] or "{}")
