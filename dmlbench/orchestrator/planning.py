"""What a sweep will run, decided before Ray starts: CLI options → :class:`SweepSpec`, validation of
every name, space and dataset, the cells' trial defaults (:func:`cell_base`) and search spaces
(:func:`cell_space`), seeds, and the printed plan with its cost estimate.

Pure of Ray: nothing here connects to a cluster or starts a trial.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmlbench.errors import ConfigError, DatasetError, DmlbenchError
from dmlbench.orchestrator import cluster
from dmlbench.orchestrator.spec import BENCHMARKS, EMBEDDED, Cell, SweepSpec
from dmlbench.results import schema, store


# ---- CLI options → spec ---------------------------------------------------------------------------
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
        check_space(spec, cell, spec.search_space if cell.method == override_method else None)
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


def check_space(spec: SweepSpec, cell: Cell, override: str | None, draws: int = 8) -> None:
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
        **cluster.loader_defaults(spec),  # data-loader workers, threads, pinned memory per --cpus-per-trial
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
    lines.append(cluster.format_resources(spec))
    if p.est_epoch_s is not None:
        gpu = spec.gpus_per_trial if spec.gpus_per_trial is not None else 1.0
        hours = p.max_trial_epochs * p.est_epoch_s / 3600
        lines.append(
            f"estimated cost: ≤ {hours:.2f} trial-hours ({hours * gpu:.2f} GPU-hours) at {p.est_epoch_s:.1f} s/epoch ({p.est_note})"
        )
    else:
        lines.append(f"estimated cost: {p.max_trial_epochs} trial-epochs ({p.est_note})")
    return "\n".join(lines)



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


