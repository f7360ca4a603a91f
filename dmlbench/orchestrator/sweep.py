"""``dmlbench sweep``: validate, plan cells, run one Tune experiment + Optuna study per cell,
then the final phase, then rebuild the leaderboard and print a summary (DESIGN §2, §5).

Rows are written by the driver (a Tune callback on every terminal trial, and once more for every
terminal trial after each ``fit``); row ids are deterministic, so a resumed sweep rewrites the
same files instead of adding duplicates.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmlbench.errors import ConfigError, DatasetError, DmlbenchError
from dmlbench.orchestrator import cluster
from dmlbench.orchestrator.rows import build_row, sampled_params
from dmlbench.orchestrator.spec import BENCHMARKS, EMBEDDED, Cell, SweepSpec, experiment_name
from dmlbench.orchestrator.trainable import STATUS_KEY, TIME_ATTR, TrainFn, run_trial
from dmlbench.results import schema, store

SPEC_FILE = "sweep.json"
Printer = Callable[[str], None]


# ---- validation (before Ray starts) ----------------------------------------------------------
def expand_names(raw: list[str], kind: str) -> list[str]:
    """Expand ``all`` / ``embedded`` in a comma list of methods or datasets."""
    out: list[str] = []
    for name in raw:
        if kind == "dataset" and name == "all":
            out.extend(BENCHMARKS)
        elif kind == "dataset" and name == "embedded":
            out.extend(EMBEDDED)
        elif kind == "method" and name == "all":
            from dmlbench.methods import METHODS

            out.extend(METHODS.names())
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def validate(spec: SweepSpec) -> None:
    """Every name, every search space and every dataset, before any trial starts."""
    from dmlbench.datasets import DATASETS
    from dmlbench.methods import METHODS
    from dmlbench.search_spaces.loader import load_space, load_space_file

    for m in spec.methods:
        METHODS.get(m)
    for d in spec.datasets:
        DATASETS.get(d)
    _check_backbones(spec.backbones)
    override_method = None
    if spec.search_space:
        override_method = load_space_file(spec.search_space).method
        if override_method not in spec.methods:
            raise ConfigError(
                f"--search-space {spec.search_space} is for method {override_method!r}, which is not in --methods "
                f"({', '.join(spec.methods)})."
            )
    for m in spec.methods:
        load_space(m, spec.search_space if m == override_method else None)
    for cell in spec.cells():
        preflight_space(spec, cell, spec.search_space if cell.method == override_method else None)
    problems = []
    for d in spec.datasets:
        ds_cls = DATASETS.get(d)
        if getattr(ds_cls, "embedded", False):
            n_train = len(ds_cls(None, **dict(spec.trial_base.get("dataset_kwargs") or {})).table().classes("train"))
            if n_train // spec.folds < 2:
                raise ConfigError(
                    f"{d} has {n_train} training classes, too few for {spec.folds} validation folds of at least "
                    f"2 classes each; use --folds {max(2, n_train // 2)} or fewer."
                )
            continue
        chk = ds_cls(spec.data_root or os.environ.get("DMLBENCH_DATA")).check()
        if not chk.usable:
            problems.append(f"{d} is {chk.status} ({chk.message})")
    if problems:
        raise DatasetError(
            "datasets not usable: " + "; ".join(problems) + "; set --data-root or $DMLBENCH_DATA (see docs/datasets.md)."
        )
    cluster.check_writable(Path(spec.output))


def preflight_space(spec: SweepSpec, cell: Cell, override: str | None, draws: int = 8) -> None:
    """Sample a few points of the cell's space (seeded random) and build their TrialConfigs, so a
    space that clashes with the cell's settings fails here, before Ray starts, not in every trial."""
    import optuna

    from dmlbench.search_spaces.loader import build_trial_config, load_space

    space = cell_space(spec, load_space(cell.method, override), cell)
    base = cell_base(spec, cell, "search")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=cell_seed(spec, cell)), direction="maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for _ in range(draws):
        trial = study.ask()
        fixed = space.suggest(trial)
        try:
            build_trial_config(base, {**trial.params, **fixed})
        except ConfigError as err:
            shown = ", ".join(f"{k}={v!r}" for k, v in trial.params.items())
            raise ConfigError(
                f"the search space of {cell.method} gives invalid trials on {cell.dataset}/{cell.backbone} "
                f"(e.g. {shown or 'its fixed values'}): {str(err).rstrip('.')}; fix {space.source} or the method's "
                "recommended settings."
            ) from None
        study.tell(trial, 0.0)


def _check_backbones(names: tuple[str, ...]) -> None:
    try:
        from dmlbench.engine.backbones import BACKBONES
    except ImportError:  # engine not installed: leave the check to the trial
        return
    import timm

    for b in names:
        if b in BACKBONES:
            continue
        if timm.list_models(b) or timm.list_models(b.split(".")[0]):
            continue
        valid = ", ".join(BACKBONES.names())
        raise ConfigError(f"unknown backbone {b!r}; use one of {valid} or a timm model name (timm.list_models()).")


# ---- planning ---------------------------------------------------------------------------------
def sweep_dir(spec: SweepSpec) -> Path:
    return Path(spec.output).expanduser() / spec.sweep_id


def cell_seed(spec: SweepSpec, cell: Cell) -> int:
    """Seed of a cell's Optuna sampler: stable function of the sweep seed and the cell."""
    digest = hashlib.sha256(f"{spec.seed}:{cell.key}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31 - 1)


def final_seeds(spec: SweepSpec) -> list[int]:
    return [spec.seed + 1000 + i for i in range(spec.final_seeds)]


def cell_base(spec: SweepSpec, cell: Cell, phase: str) -> dict[str, Any]:
    """TrialConfig defaults for every trial of a cell (search: fold 0; final: the fold is set per
    seed by :mod:`dmlbench.orchestrator.final`).

    Layers (later wins): the dataset's preset < the method's recommendation for the dataset <
    the sweep's ``trial_base`` (preset / explicit) < what the sweep owns (cell, epochs, folds,
    seeds, phase). Sampled and fixed search-space values come on top, except for the keys
    ``trial_base`` sets, which are taken out of the space (see :func:`cell_space`).
    """
    from dmlbench.datasets import DATASETS
    from dmlbench.methods import METHODS

    ds_cls = DATASETS.get(cell.dataset)
    embedded = bool(getattr(ds_cls, "embedded", False))
    layered: dict[str, Any] = {**dict(getattr(ds_cls, "preset", {}) or {})}
    rec = dict(METHODS.get(cell.method).recommended(cell.dataset, embedded))
    from dmlbench.methods.base import layer_params

    method_cls = METHODS.get(cell.method)
    params = layer_params(method_cls, dict(layered.pop("params", {}) or {}), dict(rec.pop("params", {}) or {}))
    layered.update(rec)
    params = layer_params(method_cls, params, dict(spec.trial_base.get("params") or {}))
    base: dict[str, Any] = {
        **layered,
        **{k: v for k, v in spec.trial_base.items() if k != "params"},
        "params": params,
        "method": cell.method,
        "dataset": cell.dataset,
        "backbone": cell.backbone,
        "epochs": spec.epochs,
        "num_folds": spec.folds,
        "split_seed": spec.seed,
        "seed": spec.seed,
        "phase": phase,
        "fold": 0,
        "early_stop_metric": spec.metric,
    }
    if spec.data_root:
        base["data_root"] = spec.data_root
    return base


@dataclass
class Plan:
    cells: list[Cell]
    trials_per_cell: int
    final_per_cell: int
    max_trial_epochs: int
    est_epoch_s: float | None
    est_note: str

    def total_trials(self) -> int:
        return len(self.cells) * (self.trials_per_cell + self.final_per_cell)


def plan(spec: SweepSpec) -> Plan:
    """Cells, trial counts and a rough cost (seconds per epoch from earlier rows when any)."""
    cells = spec.cells()
    max_epochs = len(cells) * (spec.trials + spec.final_seeds) * spec.epochs
    est, note = None, "no earlier rows to calibrate; run a smoke sweep first for a time estimate"
    try:
        df, _ = store.read_rows(Path(spec.output))
        ok = df[(df[schema.STATUS] == "complete") & df[schema.EPOCHS].notna() & (df[schema.EPOCHS] > 0)]
        ok = ok[ok[schema.BACKBONE].isin(spec.backbones) & ok[schema.DATASET].isin(spec.datasets)]
        if len(ok):
            est = float((ok[schema.WALL_TIME_S] / ok[schema.EPOCHS]).median())
            note = f"median of {len(ok)} earlier rows with these backbones/datasets"
    except DmlbenchError:
        pass
    return Plan(cells, spec.trials, spec.final_seeds, max_epochs, est, note)


def format_plan(spec: SweepSpec, p: Plan) -> str:
    lines = [
        (
            f"sweep {spec.sweep_id}: {len(p.cells)} cell(s), {spec.trials} search trial(s) + "
            f"{spec.final_seeds} final seed(s) each, up to {spec.epochs} epoch(s) per trial"
        )
    ]
    for c in p.cells:
        lines.append(f"  {c.key:<40} {p.trials_per_cell} trials + {p.final_per_cell} final")
    lines.append(f"total: {p.total_trials()} trials, at most {p.max_trial_epochs} trial-epochs (ASHA prunes some)")
    if p.est_epoch_s is not None:
        gpu = spec.gpus_per_trial if spec.gpus_per_trial > 0 else 0.0
        hours = p.max_trial_epochs * p.est_epoch_s / 3600
        lines.append(
            f"estimated cost: ≤ {hours:.2f} trial-hours ({hours * gpu:.2f} GPU-hours) at {p.est_epoch_s:.1f} s/epoch ({p.est_note})"
        )
    else:
        lines.append(f"estimated cost: {p.max_trial_epochs} trial-epochs ({p.est_note})")
    return "\n".join(lines)


# ---- spec file / resume check -------------------------------------------------------------------
def check_resume(spec: SweepSpec, resume: bool, force: bool) -> SweepSpec:
    """Compare with ``sweep.json`` of an existing sweep; refuse a changed spec unless ``force``.

    ``--resume`` without ``--name`` resumes the newest sweep under ``--output``.
    Returns the spec to run (with the resumed sweep's name when one was picked).
    """
    out = Path(spec.output).expanduser()
    if resume and spec.name is None and not (sweep_dir(spec) / SPEC_FILE).exists():
        found = sorted(out.glob(f"*/{SPEC_FILE}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise DmlbenchError(f"--resume: no sweep under {str(out)!r} to resume; drop --resume to start one.")
        spec = spec.model_copy(update={"name": found[-1].parent.name})
    path = sweep_dir(spec) / SPEC_FILE
    if not path.exists():
        if resume:
            raise DmlbenchError(f"--resume: no sweep {spec.sweep_id!r} under {str(out)!r}; drop --resume to start it.")
        return spec
    stored = json.loads(path.read_text())
    old = SweepSpec.model_validate(stored["spec"])
    changes = [c for c in spec.diff(old) if not c.startswith("search_space_digests:")]
    old_digests = stored.get("search_space_digests") or {}
    for method, digest in spec.space_digests().items():
        if method in old_digests and old_digests[method] != digest:
            changes.append(f"the search space of {method} changed since the sweep started")
    if changes and not force:
        raise ConfigError(
            f"sweep {spec.sweep_id!r} already exists with a different spec ({'; '.join(changes)}); "
            "rerun with the old options, pick a new --name, or pass --force to continue it with the new spec."
        )
    return spec


def write_spec(spec: SweepSpec) -> None:
    d = sweep_dir(spec)
    d.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"sweep_id": spec.sweep_id, "spec_hash": spec.spec_hash(), "spec": spec.model_dump(mode="json"),
                       "search_space_digests": spec.space_digests()}, indent=2, sort_keys=True)  # fmt: skip
    tmp = d / f".{SPEC_FILE}.tmp"
    tmp.write_text(text)
    os.replace(tmp, d / SPEC_FILE)


# ---- running ------------------------------------------------------------------------------------
@dataclass
class CellOutcome:
    cell: Cell
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    best_params: dict[str, Any] | None = None
    best_score: float | None = None


class _RowWriter:
    """Writes one row per terminal trial (idempotent by row id) and the cell's progress file."""

    def __init__(self, spec: SweepSpec, cell: Cell, phase: str, base: dict[str, Any], outcome: CellOutcome):
        self.spec, self.cell, self.phase, self.base, self.outcome = spec, cell, phase, base, outcome
        self.rows_dir = sweep_dir(spec) / store.ROWS_DIR
        self.experiment = ""
        self.running: set[str] = set()
        #: the first row that could not be written (disk full, permissions); raised after fit(),
        #: because an exception inside a Tune callback comes out wrapped in a traceback
        self.failure: DmlbenchError | None = None

    def write_in_callback(self, trial: Any) -> None:
        try:
            self.write(trial)
        except DmlbenchError as err:
            self.failure = self.failure or err

    def progress(self, trial_id: str, running: bool) -> None:
        from dmlbench.orchestrator.status import write_progress

        (self.running.add if running else self.running.discard)(trial_id)
        if self.experiment:
            write_progress(sweep_dir(self.spec), self.experiment, self.running)

    def write(self, trial: Any) -> None:
        from dmlbench.search_spaces.loader import build_trial_config

        config = dict(trial.config)
        params = sampled_params(config)
        seed = int(params.pop("seed", self.base["seed"])) if self.phase == "final" else int(self.base["seed"])
        fold = int(params.pop("fold", self.base["fold"])) if self.phase == "final" else self.base["fold"]
        base = {**self.base, "seed": seed, "fold": fold}
        try:
            cfg_json: str | None = build_trial_config(base, params).to_json()
        except DmlbenchError:
            cfg_json = None
        last = dict(trial.last_result or {})
        error = None
        if trial.status == "ERROR":
            error = _error_text(trial)
        row = build_row(self.spec, self.cell, self.phase, trial.trial_id, cfg_json, params, last, error,
                        seed, base.get("fold"), base)  # fmt: skip
        store.write_row(self.rows_dir, row)
        self.outcome.rows[row[schema.ROW_ID]] = row


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


def _row_callback(writer: _RowWriter) -> Any:
    from ray.tune import Callback

    class RowCallback(Callback):  # type: ignore[misc]
        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            writer.progress(trial.trial_id, True)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            writer.write_in_callback(trial)
            writer.progress(trial.trial_id, False)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            writer.write_in_callback(trial)
            writer.progress(trial.trial_id, False)

    return RowCallback()


def _cell_split_hash(base: dict[str, Any]) -> str | None:
    """The fold-manifest hash of a cell (the same for every trial and fold), read once here rather
    than by every trial; None when the dataset cannot be read (the trials then fail with the reason)."""
    from dmlbench.engine.trainer import split_hash
    from dmlbench.search_spaces.loader import build_trial_config

    try:
        return split_hash(build_trial_config(base, {}))
    except DmlbenchError:
        return None


def _trainable(spec: SweepSpec, base: dict[str, Any], train_fn: TrainFn | None) -> Any:
    from ray import tune

    fn = tune.with_parameters(run_trial, base=base, metric=spec.metric, train_fn=train_fn,
                              split_hash=_cell_split_hash(base))  # fmt: skip
    res: dict[str, float] = {"cpu": spec.cpus_per_trial}
    if spec.gpus_per_trial > 0:
        res["gpu"] = spec.gpus_per_trial
    return tune.with_resources(fn, res)


def _sampler(spec: SweepSpec, cell: Cell) -> Any:
    import optuna

    # explicit TPE settings (not left to version defaults)
    return optuna.samplers.TPESampler(
        seed=cell_seed(spec, cell),
        n_startup_trials=max(1, min(10, spec.trials // 3)),
        n_ei_candidates=24,
        multivariate=False,
        constant_liar=True,
    )


def _run_config(spec: SweepSpec, name: str, callbacks: list[Any]) -> Any:
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=cluster.storage_root(spec),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        # the experiment state (trial statuses, searcher) reaches the storage path within ~2 s:
        # a killed driver then restores finished trials as finished (Ray's default syncs every 300 s)
        sync_config=tune.SyncConfig(sync_period=2),
        callbacks=callbacks,
        verbose=0,
    )


def _fit(spec: SweepSpec, name: str, make_tuner: Callable[[], Any], trainable: Any, writer: _RowWriter) -> Any:
    from ray import tune

    path = f"{cluster.storage_root(spec)}/{name}"
    writer.experiment = name
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)  # fmt: skip
        # callbacks are not part of the restored state: attach a fresh row writer
        tuner._local_tuner._run_config.callbacks = [_row_callback(writer)]
    else:
        tuner = make_tuner()
    grid = tuner.fit()
    if writer.failure is not None:
        raise writer.failure
    unfinished = 0
    for trial in grid._experiment_analysis.trials:
        if trial.status in ("TERMINATED", "ERROR"):
            writer.write(trial)
        else:
            unfinished += 1
    writer.running.clear()
    writer.progress("", False)
    if unfinished:
        # Tune returns from fit() on Ctrl-C after saving its state: stop here instead of moving on
        raise SweepInterrupted(
            f"sweep interrupted with {unfinished} unfinished trial(s) in {name}; rerun the same command "
            "(or add --resume) to continue where it stopped."
        )
    return grid


class SweepInterrupted(DmlbenchError):
    """The driver was interrupted; the experiment state is saved and the sweep can be resumed."""


def run_cell_search(spec: SweepSpec, cell: Cell, train_fn: TrainFn | None, out: CellOutcome) -> None:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from dmlbench.search_spaces.loader import load_space, load_space_file

    override = None
    if spec.search_space and load_space_file(spec.search_space).method == cell.method:
        override = spec.search_space
    space = cell_space(spec, load_space(cell.method, override), cell)
    base = cell_base(spec, cell, "search")
    name = experiment_name(spec, cell)
    writer = _RowWriter(spec, cell, "search", base, out)
    trainable = _trainable(spec, base, train_fn)

    def make() -> Any:
        search: Any = OptunaSearch(space=space.define_by_run(), metric=spec.metric, mode=spec.mode,
                                   sampler=_sampler(spec, cell), study_name=name)  # fmt: skip
        if spec.max_concurrent:
            search = ConcurrencyLimiter(search, max_concurrent=spec.max_concurrent)
        asha = ASHAScheduler(time_attr=TIME_ATTR, metric=spec.metric, mode=spec.mode, max_t=spec.epochs,
                             grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)  # fmt: skip
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=search, scheduler=asha, num_samples=spec.trials, reuse_actors=True),
            run_config=_run_config(spec, name, [_row_callback(writer)]),
        )

    _fit(spec, name, make, trainable, writer)
    pick_best(spec, out)


def cell_space(spec: SweepSpec, space: Any, cell: Cell | None = None) -> Any:
    """The cell's space without the trial settings the sweep fixes itself (its ``trial_base``),
    and, with ``recipe_wins``, without what the dataset preset and the method recommend."""
    locked = {k for k in spec.trial_base if k != "params"} | set(spec.trial_base.get("params") or {})
    if spec.recipe_wins and cell is not None:
        from dmlbench.datasets import DATASETS
        from dmlbench.methods import METHODS

        ds_cls = DATASETS.get(cell.dataset)
        preset = dict(getattr(ds_cls, "preset", {}) or {})
        rec = dict(METHODS.get(cell.method).recommended(cell.dataset, bool(getattr(ds_cls, "embedded", False))))
        locked |= {k for k in (*preset, *rec) if k != "params"}
        locked |= set(preset.get("params") or {}) | set(rec.get("params") or {})
    return space.without(frozenset(locked))


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


#: Tune settings for a sweep driver: the legacy reporter (honours verbose=0), and the experiment
#: state saved at least every second (default: every ~10 s or more), so a driver killed right after
#: a trial finished does not restore that trial as unfinished (it would re-enter from its last
#: checkpoint). ``TUNE_GLOBAL_CHECKPOINT_S`` set by the user wins.
_TUNE_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_GLOBAL_CHECKPOINT_S": "1", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


def run(
    spec: SweepSpec,
    *,
    resume: bool = False,
    force: bool = False,
    dry_run: bool = False,
    train_fn: TrainFn | None = None,
    echo: Printer = print,
    num_cpus: int | None = None,
) -> list[CellOutcome]:
    """Run (or with ``dry_run`` only print) a sweep; returns what each cell produced."""
    validate(spec)
    spec = check_resume(spec, resume, force)
    echo(format_plan(spec, plan(spec)))
    if dry_run:
        echo("dry run: nothing started.")
        return []
    import optuna

    # Tune's legacy reporter honours verbose=0 (the new one prints boxes per experiment); Optuna's
    # per-study INFO lines are noise here. Both are restored on the way out.
    old_env = {k: os.environ.get(k) for k in _TUNE_ENV}
    os.environ.update({k: v for k, v in _TUNE_ENV.items() if k not in os.environ or k == "RAY_AIR_NEW_OUTPUT"})
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = cluster.connect(spec, num_cpus=num_cpus)
    try:
        cluster.check_resources(spec, cluster.node_capacity())
        write_spec(spec)
        outcomes: list[CellOutcome] = []
        t0 = time.time()
        for i, cell in enumerate(spec.cells(), 1):
            echo(f"[{i}/{len(spec.cells())}] search {cell.key} ({spec.trials} trials)")
            out = CellOutcome(cell)
            run_cell_search(spec, cell, train_fn, out)
            if spec.final_seeds:
                from dmlbench.orchestrator.final import run_cell_final

                if out.best_params is None:
                    echo(f"  no complete search trial in {cell.key}: final phase skipped")
                else:
                    echo(f"  final {cell.key}: best val {spec.metric}={out.best_score:.4f}, {spec.final_seeds} seed(s)")
                    run_cell_final(spec, cell, out.best_params, train_fn, out)
            outcomes.append(out)
        lb = store.rebuild_leaderboard(Path(spec.output))
        echo(summary_table(outcomes, spec))
        echo(f"done in {time.time() - t0:.0f} s; rows in {sweep_dir(spec) / store.ROWS_DIR}, leaderboard {lb}")
        return outcomes
    finally:
        optuna.logging.set_verbosity(verbosity)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if started:
            import ray

            ray.shutdown()


def summary_table(outcomes: list[CellOutcome], spec: SweepSpec) -> str:
    """Plain text: per cell, trial statuses, best val metric, final test mean ± std over seeds."""
    import statistics

    head = f"{'cell':<36} {'complete':>8} {'pruned':>6} {'diverged':>8} {'failed':>6} {'val ' + spec.metric:>14} {'test ' + spec.metric:>18}"
    lines = [head, "-" * len(head)]
    for o in outcomes:
        search = [r for r in o.rows.values() if r[schema.PHASE] == "search"]
        counts = {s: sum(r[schema.STATUS] == s for r in search) for s in schema.STATUSES}
        finals = [r.get(spec.metric) for r in o.rows.values()
                  if r[schema.PHASE] == "final" and r[schema.STATUS] == "complete" and r.get(spec.metric) is not None]  # fmt: skip
        val = f"{o.best_score:.4f}" if o.best_score is not None else "-"
        if len(finals) >= 2:
            test = f"{statistics.mean(finals):.4f}±{statistics.stdev(finals):.4f}"
        elif finals:
            test = f"{finals[0]:.4f}"
        else:
            test = "-"
        lines.append(f"{o.cell.key:<36} {counts['complete']:>8} {counts['pruned']:>6} {counts['diverged']:>8} "
                     f"{counts['failed']:>6} {val:>14} {test:>18}")  # fmt: skip
    return "\n".join(lines)


def _status_of(last: dict[str, Any]) -> str:
    return str(last.get(STATUS_KEY, ""))


def build_spec(
    *,
    methods: str,
    datasets: str,
    preset: str | None = None,
    **options: Any,
) -> SweepSpec:
    """CLI options → a validated :class:`SweepSpec` (preset < explicit options; ``None`` = not given).

    ``methods``/``datasets``/``backbones`` are comma lists; ``all`` and ``embedded`` expand. Unknown
    method and dataset names raise listing the valid ones.
    """
    from pydantic import ValidationError

    from dmlbench.config import format_validation_error
    from dmlbench.datasets import DATASETS
    from dmlbench.methods import METHODS
    from dmlbench.orchestrator.presets import preset_defaults

    def split(text: str, what: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise ConfigError(f"--{what} is empty; give a comma-separated list.")
        return items

    data: dict[str, Any] = preset_defaults(preset)
    data["preset"] = preset
    mlist = expand_names(split(methods, "methods"), "method")
    dlist = expand_names(split(datasets, "datasets"), "dataset")
    for m in mlist:
        METHODS.get(m)
    for d in dlist:
        DATASETS.get(d)
    data["methods"], data["datasets"] = tuple(mlist), tuple(dlist)
    backbones = options.pop("backbones", None)
    if backbones is not None:
        data["backbones"] = tuple(split(backbones, "backbones"))
    for key, value in options.items():
        if value is not None:
            data[key] = str(value) if isinstance(value, Path) else value
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, SweepSpec, "sweep options")) from None
