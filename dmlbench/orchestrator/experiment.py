"""The sweep's Ray Tune experiment: every cell's search (Optuna + ASHA) and final phase (the best params
retrained with the final seeds) as one experiment, and the rows its terminal trials become.

Why one experiment for the whole sweep: Tune hands an ended trial's process to the next trial only
inside one experiment, so all cells' trials share the trial processes (no process start per cell
phase), and free slots go to whichever cell has a trial to start. What stays per cell (its Optuna
study and ASHA, its caps, its final phase after its own search) is :mod:`.multiplex`'s.

The experiment has a deterministic name (:func:`spec.sweep_experiment_name`), so a restarted
driver restores it with ``Tuner.restore``, whatever phase each cell was in. Rows are written twice,
idempotently (row ids are deterministic): by :class:`RowCallback` as each trial ends (so a killed
driver loses no finished trial), and once more for every terminal trial after ``fit`` returns
(which also surfaces a row that could not be written). The callback holds only plain, picklable
data: Tune saves it with the experiment and hands it back on restore, so no private Tune attribute
is ever patched. It also keeps one ``progress/<cell phase>.json`` per cell phase (running trials
with epoch and latest metric, the start and end of each finished trial) for the live view and
``dmlbench status``.

``fit`` runs in a driver thread (:mod:`.scheduler`), and Tune catches Ctrl-C only in the main
thread, so the experiment is stopped through :func:`.interrupts.stop_on`: once its event is set,
the experiment's :class:`~.interrupts.StopCallback` raises :class:`SweepInterrupted` at a step of
the experiment loop, after the experiment state Tune saved shows every trial that ended as ended
(Tune skips its final save on that path; a rerun restores the saved state, like after a killed
driver).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from dmlbench.errors import ConfigError, DmlbenchError, SweepInterrupted
from dmlbench.orchestrator import cluster, interrupts
from dmlbench.orchestrator.multiplex import (
    CellSchedulers,
    CellTrials,
    Limits,
    SweepSearcher,
    route,
    set_limits,
)
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
from dmlbench.orchestrator.spec import Cell, SweepSpec, experiment_name, sweep_experiment_name
from dmlbench.orchestrator.sweepdir import read_progress, stamp_progress, sweep_dir, write_progress
from dmlbench.orchestrator.trainable import (
    EPOCH_KEY,
    ERROR_KEY,
    STATUS_KEY,
    SUMMARY_KEY,
    TIME_ATTR,
    TrainFn,
    part_key,
    run_routed_trial,
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
    """Writes a row as each trial ends and keeps one progress file per cell phase (live view,
    ``dmlbench status``); stopping is :class:`~dmlbench.orchestrator.interrupts.StopCallback`'s.

    ``sinks``, ``planned`` and ``budget`` are by part key (:func:`.trainable.part_key`); a trial's
    part is read from its config. A failed write (disk full) is logged, not raised: an exception
    inside a Tune callback would end the experiment with a traceback; the driver writes every row
    again after ``fit`` and raises there.
    """

    def __init__(self, sinks: dict[str, RowSink], planned: dict[str, int], budget: dict[str, int]):
        self.sinks = sinks
        self.planned = planned
        self.budget = budget
        self.running: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in sinks}
        self.ended: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in sinks}

    def _progress(self, key: str) -> None:
        sink = self.sinks[key]
        state = {
            "cell": sink.cell.key, "phase": sink.phase, "planned": self.planned[key], "budget": self.budget[key],
            "running": self.running[key], "ended": self.ended[key],
        }  # fmt: skip
        try:
            write_progress(sweep_dir(sink.spec), sink.experiment, state)
        except OSError as err:
            log.warning("progress of %s not written (%s)", sink.experiment, err)

    def _part(self, trial: Any) -> str | None:
        key = route(trial)
        return key if key in self.sinks else None

    def setup(self, **info: Any) -> None:
        # a restored experiment keeps the times of the trials that ended before the restart
        for key, sink in self.sinks.items():
            old = read_progress(sweep_dir(sink.spec), sink.experiment).get("ended")
            if isinstance(old, dict):
                self.ended[key] = {**old, **self.ended[key]}
            self._progress(key)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if (key := self._part(trial)) is None:
            return
        self.running[key][trial.trial_id] = {"started": time.time(), "epoch": 0, "metric": None}
        self._progress(key)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:  # fmt: skip
        if (key := self._part(trial)) is None:
            return
        entry = self.running[key].setdefault(trial.trial_id, {"started": time.time(), "epoch": 0, "metric": None})
        if isinstance(result.get(EPOCH_KEY), (int, float)):
            entry["epoch"] = int(result[EPOCH_KEY])
        value = result.get(self.sinks[key].spec.metric)
        if isinstance(value, (int, float)) and result.get(EPOCH_KEY) is not None:
            entry["metric"] = float(value)
        self._progress(key)

    def _ended(self, trial: Any) -> None:
        if (key := self._part(trial)) is None:
            return
        sink = self.sinks[key]
        row: dict[str, Any] = {}
        try:
            rows = sink.rows(trial)
            row = rows[0] if rows else {}
        except DmlbenchError as err:
            log.warning("row of trial %s not written yet (%s); retried when the experiment ends", trial.trial_id, err)
        entry = self.running[key].pop(trial.trial_id, None)
        value = row.get(sink.spec.metric)
        self.ended[key][trial.trial_id] = {
            "started": entry["started"] if entry else time.time(), "ended": time.time(),
            "status": row.get(schema.STATUS), "metric": float(value) if isinstance(value, (int, float)) else None,
        }  # fmt: skip
        self._progress(key)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # trials running when the driver stopped start again after a restore; the ended ones are
        # read back from the progress files in setup()
        self.__dict__.update(state)
        self.running = {k: {} for k in self.sinks}
        self.ended = {k: dict(v) for k, v in (state.get("ended") or {}).items()}
        for k in self.sinks:
            self.ended.setdefault(k, {})


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
    from dmlbench.datasets import trial_split_hash
    from dmlbench.search_spaces.loader import build_trial_config

    try:
        return trial_split_hash(build_trial_config(base, {}))
    except DmlbenchError:
        return None


_REGISTER = threading.Lock()


@dataclass
class Part:
    """One cell phase of the sweep: what its trials train (``run_routed_trial``'s part) and where
    their rows and progress go."""

    cell: Cell
    phase: str
    sink: RowSink
    planned: int
    budget: int
    #: ``base``, ``split_hash``, ``folds`` and ``stops`` for :func:`.trainable.run_trial`
    trial: dict[str, Any]

    @property
    def key(self) -> str:
        return part_key(self.cell.slug, self.phase)


def sweep_parts(spec: SweepSpec) -> list[Part]:
    """Every cell phase of the sweep, cell by cell: the search (of a searched cell; a group of the
    search folds' models, pausing at ASHA's rungs and periodic checkpoints, :func:`planning.group_stops`),
    then the final phase (the best params per final seed: every fold model, or one model on all
    training classes; a cell the protocol does not search has only this one)."""
    parts = []
    for cell in spec.cells():
        st = cell_settings(spec, cell)
        if st.searched:
            base = cell_base(spec, cell, "search")
            folds: list[int | None] = list(search_folds(spec))
            stops = group_stops(st.epochs, asha_rungs(st.grace, spec.reduction_factor, st.epochs), spec.checkpoint_every_epochs)
            # a row of a group stands for its fold models (fold NULL; each model's score is in its metrics)
            sink = RowSink(spec, cell, "search", base, experiment_name(spec, cell), group=len(folds) > 1)
            parts.append(Part(cell, "search", sink, spec.trials, st.epochs,
                              {"base": base, "split_hash": _cell_split_hash(base), "folds": folds, "stops": stops}))  # fmt: skip
        if spec.final_seeds or not st.searched:
            base = cell_base(spec, cell, "final")
            folds = list(range(spec.folds)) if st.fold_models else [None]
            if len(folds) > 1:
                base = {**base, "fold": None}
            sink = RowSink(spec, cell, "final", base, experiment_name(spec, cell, phase="final"))
            parts.append(Part(cell, "final", sink, spec.final_seeds, st.epochs,
                              {"base": base, "split_hash": _cell_split_hash(base), "folds": folds,
                               "stops": group_stops(st.epochs, every_epochs=spec.checkpoint_every_epochs)}))  # fmt: skip
    return parts


def trainable(spec: SweepSpec, parts: list[Part], train_fn: TrainFn | None) -> str:
    """Register :func:`.trainable.run_routed_trial` bound to every cell phase's part, with the
    trial's resource request, under the sweep's experiment name; returns the name (what the Tuner
    gets). Named per sweep: two sweeps in one driver never resolve each other's trainable."""
    fn = tune.with_parameters(run_routed_trial, parts={p.key: p.trial for p in parts}, metric=spec.metric,
                              train_fn=train_fn,
                              checkpoint_every=(spec.checkpoint_period_s, spec.checkpoint_every_epochs))  # fmt: skip
    res: dict[str, float] = {"cpu": spec.cpus_per_trial}
    if spec.gpus_per_trial:  # resolved by cluster.resolve_resources before the experiment starts
        res["gpu"] = spec.gpus_per_trial
    name = sweep_experiment_name(spec)
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


def run_config(spec: SweepSpec, parts: list[Part]) -> Any:
    return tune.RunConfig(
        name=sweep_experiment_name(spec),
        storage_path=cluster.storage_root(spec),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        # the experiment state (trial statuses, searcher) reaches the storage path within ~2 s:
        # a killed driver then restores finished trials as finished (Ray's default syncs every 300 s)
        sync_config=tune.SyncConfig(sync_period=2),
        callbacks=[RowCallback({p.key: p.sink for p in parts}, {p.key: p.planned for p in parts},
                               {p.key: p.budget for p in parts}),
                   interrupts.StopCallback(spec.sweep_id, f"{cluster.storage_root(spec)}/{sweep_experiment_name(spec)}")],
        verbose=0,
    )  # fmt: skip


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


def searcher(spec: SweepSpec, parts: list[Part]) -> SweepSearcher:
    """Every cell's trials as one searcher (:mod:`.multiplex`): per searched cell Optuna TPE (seeded
    per cell, its own study) over the cell's space, then the final seeds."""
    from ray.tune.search.optuna import OptunaSearch

    from dmlbench.search_spaces.loader import load_space, load_space_file

    phases: dict[Cell, set[str]] = {}
    for p in parts:
        phases.setdefault(p.cell, set()).add(p.phase)
    cells = []
    for cell, has in phases.items():
        search = None
        if "search" in has:
            override = None
            if spec.search_space and load_space_file(spec.search_space).method == cell.method:
                override = spec.search_space
            space = cell_space(spec, load_space(cell.method, override), cell)
            search = OptunaSearch(space=space.define_by_run(), metric=spec.metric, mode=spec.mode,
                                  sampler=sampler(spec, cell), study_name=experiment_name(spec, cell))  # fmt: skip
        seeds = final_seeds(spec) if "final" in has else []
        cells.append(CellTrials(cell.key, cell.slug, search, spec.trials if search is not None else 0, list(seeds)))
    return SweepSearcher(cells, spec.metric, spec.mode, limits=limits(spec), sweep_id=spec.sweep_id)


def limits(spec: SweepSpec) -> Limits:
    """Trials in flight at most: ``--sweep-max-concurrent`` over all cells; per cell search
    ``--max-concurrent`` (1 with ``--reproducible``), per cell final phase ``--max-concurrent``."""
    return Limits(cap=spec.sweep_max_concurrent, search=search_concurrency(spec), final=spec.max_concurrent)


def cell_schedulers(spec: SweepSpec, parts: list[Part]) -> CellSchedulers:
    """Per searched cell its own ASHA, pruning on the validation metric at the cell's rungs."""
    from ray.tune.schedulers import ASHAScheduler

    ashas = {}
    for p in parts:
        if p.phase == "search":
            st = cell_settings(spec, p.cell)
            ashas[p.cell.slug] = ASHAScheduler(time_attr=TIME_ATTR, metric=spec.metric, mode=spec.mode,
                                               max_t=st.epochs, grace_period=st.grace,
                                               reduction_factor=spec.reduction_factor)  # fmt: skip
    return CellSchedulers(ashas)


def _refuse_per_cell_layout(spec: SweepSpec, parts: list[Part]) -> None:
    """A sweep started by a dmlbench that ran one Tune experiment per cell phase cannot be continued
    as one experiment (its trials and searchers live in the old ones)."""
    root = cluster.storage_root(spec)
    old = [p.sink.experiment for p in parts if tune.Tuner.can_restore(f"{root}/{p.sink.experiment}")]
    if old:
        raise ConfigError(
            f"sweep {spec.sweep_id} was started by an older dmlbench that ran one Tune experiment per cell phase "
            f"({len(old)} found in {root}, e.g. {old[0]}); this version runs a sweep as one experiment and cannot "
            "continue it: its rows stay readable; run it again under a new --name."
        )


@contextmanager
def _pending_trials(slots: int | None) -> Iterator[None]:
    """Let Tune keep as many trials waiting for a slot as the sweep has slots. Tune's default for a
    searcher other than its own grid/random one is a single pending trial: it then starts one trial
    at a time, each only once the previous one got its process, and a sweep on 8 slots ran 4 trials
    at once (``bench/cluster_utilisation.py``). ``TUNE_MAX_PENDING_TRIALS_PG`` set by the user wins
    (on an autoscaling cluster, whose new nodes are asked for by pending trials, set it higher)."""
    if "TUNE_MAX_PENDING_TRIALS_PG" in os.environ:
        yield
        return
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(1, slots or 1))
    try:
        yield
    finally:
        os.environ.pop("TUNE_MAX_PENDING_TRIALS_PG", None)


def run_sweep(spec: SweepSpec, train_fn: TrainFn | None, outcomes: dict[Cell, CellOutcome],
              slots: int | None = None) -> None:  # fmt: skip
    """Run (or restore and continue) the sweep's experiment: every cell's search and final phase
    (:mod:`.multiplex`); every terminal trial ends as a row in its cell's outcome, and each cell's
    best search trial is picked (:func:`pick_best`). ``slots``: the trials the cluster runs at once
    (:func:`.scheduler.trial_slots`), as many as Tune keeps waiting for a slot.

    Raises :class:`SweepInterrupted` when ``fit`` returned with unfinished trials (Ctrl-C: Tune
    saved its state first) or the sweep was asked to stop (:mod:`.interrupts`); trials interrupted
    while running stay unfinished (no row) and continue from their last checkpoint when the same
    command runs again.
    """
    name = sweep_experiment_name(spec)
    interrupts.raise_if_requested(f"experiment {name}")  # Ctrl-C: nothing new starts
    if interrupts.stop_requested(spec.sweep_id):
        raise SweepInterrupted(f"sweep stopped before {name} started; rerun the same command to continue.")
    parts = sweep_parts(spec)
    by_key = {p.key: p for p in parts}
    fn = trainable(spec, parts, train_fn)
    path = f"{cluster.storage_root(spec)}/{name}"
    if tune.Tuner.can_restore(path):
        relink_lost_checkpoints(path)
        tuner = tune.Tuner.restore(path, trainable=fn, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)  # fmt: skip
    else:
        _refuse_per_cell_layout(spec, parts)
        tuner = tune.Tuner(
            fn,
            tune_config=tune.TuneConfig(search_alg=searcher(spec, parts), scheduler=cell_schedulers(spec, parts),
                                        num_samples=sum(p.planned for p in parts), reuse_actors=True),
            run_config=run_config(spec, parts),
        )  # fmt: skip
    set_limits(spec.sweep_id, limits(spec))  # this run's limits, also for a restored searcher
    try:
        with _pending_trials(slots):
            tuner.fit()
    finally:
        set_limits(spec.sweep_id, None)
    # the experiment state Tune saved when fit returned (public API; the ResultGrid hides statuses)
    trials = tune.ExperimentAnalysis(path).trials
    unfinished = 0
    for trial in trials:
        if trial.status not in interrupts.ENDED_STATUSES:
            unfinished += 1
            continue
        part = by_key.get(route(trial) or "")
        if part is None:
            log.warning("trial %s of %s belongs to no cell phase of this sweep; no row", trial.trial_id, name)
            continue
        for row in part.sink.rows(trial):
            outcomes[part.cell].rows[row[schema.ROW_ID]] = row
    # when fit returned and its rows were read: the ETA measures the experiment's wrap-up after its
    # last trial from it (the callback rewrites the files without it when the experiment runs again)
    for p in parts:
        stamp_progress(sweep_dir(spec), p.sink.experiment, "closed")
    for out in outcomes.values():
        pick_best(spec, out)
    if unfinished or interrupts.requested() or interrupts.stop_requested(spec.sweep_id):
        raise SweepInterrupted(
            f"sweep interrupted with {unfinished} unfinished trial(s) in {name}; rerun the same command "
            "(or add --resume) to continue where it stopped."
        )


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
