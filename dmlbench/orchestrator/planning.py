"""What a sweep will run, decided before Ray starts: CLI options → :class:`SweepSpec`, validation of
every name, space and dataset, the cells' trial defaults (:func:`cell_base`) and search spaces
(:func:`cell_space`), seeds, and the printed plan with its cost estimate.

Pure of Ray: nothing here connects to a cluster or starts a trial.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmlbench.errors import ConfigError, DatasetError, DmlbenchError
from dmlbench.orchestrator import cluster
from dmlbench.orchestrator.spec import BENCHMARKS, EMBEDDED, MLRC_BACKBONE, Cell, SweepSpec
from dmlbench.results import schema, store

#: default fold count of a sweep over embedded datasets only (digits has 6 training classes)
EMBEDDED_FOLDS = 3


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
    if options.pop("subset", None):
        embedded = [d for d in dlist if d in EMBEDDED]
        if embedded:
            raise ConfigError(f"--subset is for partial benchmark datasets; drop it or drop {', '.join(embedded)}.")
        tb = dict(data.get("trial_base") or {})
        tb["dataset_kwargs"] = {**dict(tb.get("dataset_kwargs") or {}), "expect_full": False}
        data["trial_base"] = tb
    backbones = options.pop("backbones", None)
    if backbones is not None:
        data["backbones"] = tuple(split(backbones, "backbones"))
    for key, value in options.items():
        if value is not None:
            data[key] = str(value) if isinstance(value, Path) else value
    if "folds" not in data and all(d in EMBEDDED for d in dlist):
        # the embedded datasets have few training classes (digits: 6): 3 folds of 2 (docs/protocol.md)
        data["folds"] = EMBEDDED_FOLDS
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


def validate(spec: SweepSpec, *, need_data: bool = True) -> list[str]:
    """Every name, search space, recipe and dataset, before any trial starts.

    Returns the benchmark datasets that cannot be used (one sentence each). With ``need_data``
    (a real sweep) any such problem raises :class:`DatasetError`; a dry run prints them with the plan.
    """
    from dmlbench.datasets import DATASETS, data_root
    from dmlbench.methods import METHODS
    from dmlbench.search_spaces.loader import load_space, load_space_file

    for m in spec.methods:
        METHODS.get(m)
    for d in spec.datasets:
        DATASETS.get(d)
    _check_backbones(tuple(dict.fromkeys(c.backbone for c in spec.cells())))
    for cell in spec.cells():
        cell_settings(spec, cell)  # a method without a paper recipe fails here, naming it
    override_method = None
    if spec.search_space:
        override_method = load_space_file(spec.search_space).method
        if override_method not in spec.methods:
            raise ConfigError(
                f"--search-space {spec.search_space} is for method {override_method!r}, which is not in --methods "
                f"({', '.join(spec.methods)})."
            )
    if spec.protocol == "mlrc":
        for m in spec.methods:
            load_space(m, spec.search_space if m == override_method else None)
        for cell in spec.cells():
            check_space(spec, cell, spec.search_space if cell.method == override_method else None)
    bad: list[Any] = []  # DatasetCheck of every unusable benchmark
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
        kwargs = dict(spec.trial_base.get("dataset_kwargs") or {})  # e.g. --subset's expect_full=False
        chk = ds_cls(data_root(spec), **kwargs).check()
        if not chk.usable:
            bad.append(chk)
    problems = [f"{c.name} is {c.status} ({c.message})" for c in bad]
    if bad and need_data:
        from dmlbench.datasets.checks import unusable_message

        # one or two sentences with the fix said once (several missing datasets share one root)
        raise DatasetError(unusable_message(bad, spec.data_root) or "; ".join(problems))
    cluster.check_writable(Path(spec.output))
    return problems


def space_draws(spec: SweepSpec, cell: Cell, override: str | None, draws: int) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """The first ``draws`` points of the cell's space drawn by a random sampler seeded with
    :func:`cell_seed`, as (sampled values, the space's fixed values)."""
    import optuna

    from dmlbench.search_spaces.loader import load_space

    space = cell_space(spec, load_space(cell.method, override), cell)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=cell_seed(spec, cell)), direction="maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for _ in range(draws):
        trial = study.ask()
        fixed = space.suggest(trial)
        yield dict(trial.params), fixed
        study.tell(trial, 0.0)


def check_space(spec: SweepSpec, cell: Cell, override: str | None, draws: int = 8) -> None:
    """Sample a few points of the cell's space (seeded random) and build their TrialConfigs, so a
    space that clashes with the cell's settings fails here, before Ray starts, not in every trial."""
    from dmlbench.search_spaces.loader import build_trial_config, load_space

    base = cell_base(spec, cell, "search")
    for params, fixed in space_draws(spec, cell, override, draws):
        try:
            build_trial_config(base, {**params, **fixed})
        except ConfigError as err:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            source = cell_space(spec, load_space(cell.method, override), cell).source
            raise ConfigError(
                f"the search space of {cell.method} gives invalid trials on {cell.dataset}/{cell.backbone} "
                f"(e.g. {shown or 'its fixed values'}): {str(err).rstrip('.')}; fix {source} or the method's "
                "recommended settings."
            ) from None


def _check_backbones(names: tuple[str, ...]) -> None:
    try:
        from dmlbench.engine.backbones import BACKBONES
    except ImportError:  # engine not installed: leave the check to the trial
        return
    for b in names:
        if b in BACKBONES:
            continue
        import timm  # only for names dmlbench does not register itself (timm's import takes seconds)

        if timm.list_models(b) or timm.list_models(b.split(".")[0]):
            continue
        valid = ", ".join(BACKBONES.names())
        raise ConfigError(f"unknown backbone {b!r}; use one of {valid} or a timm model name (timm.list_models()).")



# ---- planning ---------------------------------------------------------------------------------
#: the MLRC protocol's common settings on the benchmarks (Musgrave et al. 2020 as CCP's tables used
#: it, spec ccp.md §2): BN-Inception with every BN frozen, 227 px crops of scale (0.16, 1), 128-d,
#: batch 32 = 8 classes x 4, Adam lr 1e-5 with decay 1e-4 and a constant LR, validation rounds of
#: MLRC_ROUND_STEPS steps, early stopping after 60 rounds without a 1e-5 gain, at most 10000 rounds.
#: Every key can be overridden (``trial_base`` of a preset, ``--search-space`` fixed values).
MLRC_COMMON: dict[str, Any] = {
    "backbone": MLRC_BACKBONE, "pretrained": True, "bn_policy": "frozen_all", "image_size": 227,
    "crop_scale": [0.16, 1.0], "embedding_dim": 128, "classes_per_batch": 8, "samples_per_class": 4,
    "optimizer": "adam", "lr": 1e-5, "weight_decay": 1e-4, "schedule": "constant", "epochs": 10000,
    "early_stop_patience": 60, "early_stop_min_delta": 1e-5,
}
#: steps per validation round of the MLRC protocol (CCP: 25 CUB/Cars, 250 SOP/In-Shop)
MLRC_ROUND_STEPS: dict[str, int] = {"cub200": 25, "cars196": 25, "sop": 250, "inshop": 250}


@dataclass(frozen=True)
class CellSettings:
    """What a cell's trials receive and why (pure data, computed before Ray starts).

    Attributes:
        base: TrialConfig defaults of the cell's trials (search phase, fold 0; the final phase
            changes phase, seed and fold).
        recipe_epochs: the epochs the method's recipe (or the protocol's common budget) asks for.
        epochs: what trials get: ``recipe_epochs`` capped by ``--epochs``.
        budget_capped: ``epochs < recipe_epochs`` (recorded in every row).
        grace: ASHA grace in epochs (at least what the method needs, at most ``epochs``).
        searched: the cell has a search phase (mlrc).
        fold_models: a final seed trains all ``folds`` fold models (else one model on all training classes).
        recipe_source: where the values come from.
        paper_selection: how the paper selected its reported checkpoint (paper protocol).
        extrapolated: why a recipe is not the paper's own setting, else None.
    """

    cell: Cell
    base: dict[str, Any]
    recipe_epochs: int
    epochs: int
    budget_capped: bool
    grace: int
    searched: bool
    fold_models: bool
    recipe_source: str
    paper_selection: str | None
    extrapolated: str | None


def _layer(method_cls: Any, base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    from dmlbench.methods.base import layer_params

    out = {**base, **{k: v for k, v in extra.items() if k != "params"}}
    out["params"] = layer_params(method_cls, dict(base.get("params") or {}), dict(extra.get("params") or {}))
    return out


def cell_settings(spec: SweepSpec, cell: Cell) -> CellSettings:
    """A cell's trial defaults, budget and provenance under the sweep's protocol.

    Layers (later wins), ``mlrc``: the dataset's preset < the method's recommendation for the
    dataset < the MLRC common settings (benchmarks; the method's own LR schedule off) < the
    sweep's ``trial_base`` < what the sweep owns. ``paper``: the dataset's preset < the method's
    recipe for (dataset, embedding size) < ``trial_base`` < what the sweep owns. The sweep owns the
    cell (method, dataset, backbone, embedding size when the cell has one), the capped epochs, the
    folds and seeds, the phase and the early-stopping metric.
    """
    from dmlbench.config import TrialConfig
    from dmlbench.datasets import DATASETS
    from dmlbench.methods import METHODS

    ds_cls = DATASETS.get(cell.dataset)
    embedded = bool(getattr(ds_cls, "embedded", False))
    method_cls = METHODS.get(cell.method)
    preset = copy.deepcopy(dict(getattr(ds_cls, "preset", {}) or {}))
    layered = _layer(method_cls, {"params": {}}, preset)
    extrapolated = paper_selection = None
    fold_models = True
    if spec.protocol == "paper":
        dims = method_cls.published_dims(cell.dataset)
        dim = cell.dim or (int(preset.get("embedding_dim", 128)) if embedded or not dims else dims[0])
        recipe = method_cls.recipe(cell.dataset, dim, embedded)
        if recipe is None:
            raise ConfigError(
                f"{cell.method} has no published recipe for {cell.dataset} in dmlbench, so it cannot run under "
                f"--protocol paper; run it with --protocol mlrc (a fair search) or drop it from --methods."
            )
        layered = _layer(method_cls, layered, copy.deepcopy(recipe.settings))
        source, paper_selection, extrapolated, fold_models = (recipe.source, recipe.selection, recipe.extrapolated,
                                                              recipe.fold_models)  # fmt: skip
    else:
        layered = _layer(method_cls, layered, copy.deepcopy(method_cls.recommended(cell.dataset, embedded)))
        source = "mlrc common settings (docs/protocol.md) + the method's recommendation"
        if not embedded:
            common = {**MLRC_COMMON, "iters_per_epoch": MLRC_ROUND_STEPS.get(cell.dataset),
                      "params": dict(method_cls.own_schedule_off)}  # fmt: skip
            layered = _layer(method_cls, layered, copy.deepcopy(common))
        else:
            source = "the dataset's small-data preset + the method's recommendation (embedded data)"
    # data-loader workers, threads, pinned memory per --cpus-per-trial, then the sweep's own trial settings
    layered = _layer(method_cls, layered, cluster.loader_defaults(spec))
    layered = _layer(method_cls, layered, copy.deepcopy(dict(spec.trial_base)))
    recipe_epochs = int(layered.get("epochs", TrialConfig.model_fields["epochs"].default))
    epochs = min(recipe_epochs, spec.epochs) if spec.epochs is not None else recipe_epochs
    base: dict[str, Any] = {
        **layered,
        "method": cell.method,
        "dataset": cell.dataset,
        "backbone": cell.backbone,
        "epochs": epochs,
        "num_folds": spec.folds,
        "split_seed": spec.seed,
        "seed": spec.seed,
        "phase": "search",
        "fold": 0,
        "early_stop_metric": spec.metric,
    }
    if cell.dim is not None:
        base["embedding_dim"] = cell.dim
    if spec.reproducible:
        base["deterministic"] = True
    if spec.data_root:
        base["data_root"] = spec.data_root
    searched = spec.protocol == "mlrc"
    grace = epochs
    if searched:
        from dmlbench.search_spaces.loader import build_trial_config

        try:
            need = method_cls.grace_epochs(build_trial_config(base, {}))
        except DmlbenchError:
            need = 1  # the config error is reported by validate/check_space with the space's context
        grace = min(epochs, max(spec.grace_period or 1, need))
    return CellSettings(cell, base, recipe_epochs, epochs, epochs < recipe_epochs, grace, searched, fold_models,
                        source, paper_selection, extrapolated)  # fmt: skip


def cell_seed(spec: SweepSpec, cell: Cell) -> int:
    """Seed of a cell's Optuna sampler: stable function of the sweep seed and the cell."""
    digest = hashlib.sha256(f"{spec.seed}:{cell.key}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31 - 1)


def final_seeds(spec: SweepSpec) -> list[int]:
    return [spec.seed + 1000 + i for i in range(spec.final_seeds)]


def cell_base(spec: SweepSpec, cell: Cell, phase: str) -> dict[str, Any]:
    """TrialConfig defaults for every trial of a cell (:func:`cell_settings`), for ``phase``.

    Search: fold 0 (a search trial sets the fold of each of its fold models). Final: the same, the
    final phase sets seed and fold per fold model; a ``paper`` cell without fold models trains on
    all training classes (``fold=None``) and is scored on test at its last epoch.
    """
    st = cell_settings(spec, cell)
    base = {**st.base, "phase": phase}
    if phase == "final" and not st.fold_models:
        base["fold"] = None
    return base


def search_folds(spec: SweepSpec) -> list[int]:
    """The validation folds a search trial trains a model for (the first ``search_folds``)."""
    return list(range(spec.n_search_folds))


def protocol_label(spec: SweepSpec, concatenated: bool = False) -> str:
    """The rows' ``protocol`` value.

    ``mlrc`` (search score = mean over all folds), ``holdout`` (``--search-folds 1``), ``mlrc-search<s>``
    (``s`` of the folds), ``paper``; rows of the concatenated fold-model embedding add ``-concat<k>``
    (a table of their own: never ranked against single models).

    Example:
        >>> protocol_label(SweepSpec(methods=("ccp",), datasets=("digits",), folds=3, search_folds=1), True)
        'holdout-concat3'
    """
    if spec.protocol == "paper":
        label = "paper"
    elif spec.n_search_folds == spec.folds:
        label = "mlrc"
    elif spec.n_search_folds == 1:
        label = "holdout"
    else:
        label = f"mlrc-search{spec.n_search_folds}"
    return f"{label}-concat{spec.folds}" if concatenated else label


def asha_rungs(grace: int, reduction_factor: int, max_t: int) -> list[int]:
    """The epochs where ASHA compares trials (``grace · rf^i < max_t``): a fold-model group's chunks
    end there, so every fold model has reached the rung when the group reports its fold mean.

    Example:
        >>> asha_rungs(3, 2, 30)
        [3, 6, 12, 24]
    """
    out, r = [], grace
    while r < max_t:
        out.append(r)
        r *= reduction_factor
    return out


def group_stops(epochs: int, rungs: list[int] | None = None, every_epochs: int | None = None) -> list[int]:
    """Where the fold models of a trial pause in turn: ASHA's ``rungs`` (search), every
    ``every_epochs`` epochs when the sweep asks for a checkpoint that often
    (``--checkpoint-every-epochs``) and, for long budgets, every ``max(5, ceil(epochs / 10))``
    epochs, so the trial hands Tune a checkpoint of all its models at least ten times. A group
    hands Tune a checkpoint only when every model has reached the stop, so a worker that dies loses
    at most the round of chunks it was in.

    Example:
        >>> group_stops(100, [3, 6, 12, 24, 48, 96])
        [3, 6, 10, 12, 20, 24, 30, 40, 48, 50, 60, 70, 80, 90, 96]
        >>> group_stops(2)
        []
        >>> group_stops(4, every_epochs=1)
        [1, 2, 3]
    """
    every = max(5, -(-epochs // 10))
    periodic = set(range(every_epochs, epochs, every_epochs)) if every_epochs else set()
    return sorted(set(rungs or []) | set(range(every, epochs, every)) | periodic)


def search_concurrency(spec: SweepSpec) -> int | None:
    """Search trials of one cell running at once: 1 with ``reproducible`` (decisions in trial order)."""
    return 1 if spec.reproducible else spec.max_concurrent


@dataclass
class CellPlan:
    """Counts and cost of one cell."""

    settings: CellSettings
    search_trials: int
    search_models: int  # models trained per search trial
    final_trials: int
    final_models: int  # models trained per final trial
    steps_per_epoch: int | None
    est_gpu_hours: float | None

    @property
    def cell(self) -> Cell:
        return self.settings.cell

    def model_epochs(self) -> int:
        """Upper bound of epochs trained by every model of the cell (ASHA and early stopping cut it)."""
        e = self.settings.epochs
        return e * (self.search_trials * self.search_models + self.final_trials * self.final_models)


@dataclass
class Plan:
    cells: list[CellPlan]
    est_note: str
    missing: list[str] = field(default_factory=list)

    def total_trials(self) -> int:
        return sum(c.search_trials + c.final_trials for c in self.cells)

    def total_gpu_hours(self) -> float | None:
        vals = [c.est_gpu_hours for c in self.cells]
        return None if any(v is None for v in vals) else float(sum(v for v in vals if v is not None))


def _train_images(cell: Cell, base: dict[str, Any], spec: SweepSpec, full_train: bool) -> int | None:
    """Training images of one model of the cell (nominal full-size counts of a benchmark)."""
    from dmlbench.datasets import DATASETS

    ds_cls = DATASETS.get(cell.dataset)
    if getattr(ds_cls, "embedded", False):
        table = ds_cls(None, **dict(base.get("dataset_kwargs") or {})).table()
        n = int((table.split == "train").sum())
    else:
        n = int(getattr(ds_cls, "FULL", {}).get("train_images", 0))
        if not n:
            return None
    return n if full_train else n - n // spec.folds


def _steps_per_epoch(cell: Cell, base: dict[str, Any], spec: SweepSpec, full_train: bool) -> int | None:
    """Steps of one epoch: the trial's ``iters_per_epoch``, else a method-level one (CCP's rounds,
    ``params.iters_per_epoch``), else one pass over the model's training images."""
    iters = base.get("iters_per_epoch") or (base.get("params") or {}).get("iters_per_epoch")
    if iters:
        return int(iters)
    n = _train_images(cell, base, spec, full_train)
    if n is None:
        return None
    batch = int(base.get("classes_per_batch", 16)) * int(base.get("samples_per_class", 2))
    return max(1, n // batch)


def plan(spec: SweepSpec, missing: list[str] | None = None) -> Plan:
    """Cells, trial counts and a cost estimate per cell.

    GPU-hours = model-epochs (the upper bound: no pruning, no early stop) × (training images of an
    epoch / training rate + one validation fold / evaluation rate). Rates come from earlier complete
    GPU rows of the same backbone under ``--output`` when there are any, else from the H100 table
    :data:`THROUGHPUT_H100`.
    """
    measured = _measured_s_per_image(spec)
    cells: list[CellPlan] = []
    notes: set[str] = set()
    for cell in spec.cells():
        st = cell_settings(spec, cell)
        b = st.base
        search_trials = spec.trials if st.searched else 0
        search_models = spec.n_search_folds if st.searched else 0
        final_models = spec.folds if st.fold_models else 1
        cp = CellPlan(st, search_trials, search_models, spec.final_seeds, final_models,
                      _steps_per_epoch(cell, b, spec, full_train=not st.fold_models), None)  # fmt: skip
        batch = int(b.get("classes_per_batch", 16)) * int(b.get("samples_per_class", 2))
        rates = _throughput(cell.backbone, int(b.get("image_size", 224)), batch)
        if cp.steps_per_epoch is not None and (cell.backbone in measured or rates is not None):
            if cell.backbone in measured:
                s_epoch = cp.steps_per_epoch * batch * measured[cell.backbone]
            else:
                assert rates is not None
                train_ips, eval_ips, note = rates
                if note:
                    notes.add(note)
                n_train = _train_images(cell, b, spec, full_train=True) or 0
                s_epoch = cp.steps_per_epoch * batch * _views(cell.method) / train_ips + n_train / spec.folds / eval_ips
            gpus = spec.gpus_per_trial if spec.gpus_per_trial else 1.0  # H100 time: a CPU run is not estimated
            cp.est_gpu_hours = cp.model_epochs() * s_epoch * gpus / 3600
        cells.append(cp)
    note = ("seconds per image from earlier GPU rows of the same backbone" if measured else
            "rates measured on one H100, THROUGHPUT_H100 in orchestrator/planning.py")
    note += "; upper bound: every model trains all its epochs (ASHA pruning and early stopping cut it)"
    if notes:
        note += "; " + "; ".join(sorted(notes))
    return Plan(cells, note, list(missing or []))


def _views(method: str) -> float:
    """Forward/backward passes per training image relative to a plain method (DiVA: two views, one
    of them through the no-grad key network, about 1.5)."""
    from dmlbench.methods import METHODS

    return 1.5 if getattr(METHODS.get(method), "n_views", 1) > 1 else 1.0


#: images per second on one NVIDIA H100 80GB HBM3 (torch 2.11, bf16 autocast, BN statistics frozen,
#: random inputs, 5 warm-up then 30 timed steps), measured for this table with a timm ResNet-50 +
#: Linear(2048, 128) (the script of bench/train_throughput.py, inlined because the device had no
#: dmlbench install): (family, image size, batch) -> (train images/s incl. backward and Adam step,
#: eval images/s at batch 256). Batches below ~64 are launch-bound, hence the per-batch entries.
THROUGHPUT_H100: dict[tuple[str, int, int], tuple[float, float]] = {
    ("resnet50", 224, 32): (1046.0, 9125.0),
    ("resnet50", 224, 64): (2298.0, 9124.0),
    ("resnet50", 224, 112): (2485.0, 9118.0),
    ("resnet50", 227, 32): (1255.0, 7238.0),
}
#: families not measured: estimated with the rate of a measured one at the same size and batch
#: (BN-Inception has half ResNet-50's FLOPs but a batch of 32 is launch-bound, so this is a
#: conservative stand-in, said so in the plan)
THROUGHPUT_STAND_IN: dict[str, str] = {"bninception": "resnet50"}


def _throughput(backbone: str, image_size: int, batch: int) -> tuple[float, float, str] | None:
    """(train images/s, eval images/s, note) for a backbone, from :data:`THROUGHPUT_H100`: the
    nearest measured batch, rates scaled by pixels for another image size."""
    family = "bninception" if backbone.startswith("bninception") else backbone.split(".")[0]
    note = ""
    if family in THROUGHPUT_STAND_IN:
        note = f"{family} rate = {THROUGHPUT_STAND_IN[family]}'s (not measured)"
        family = THROUGHPUT_STAND_IN[family]
    rows = [(abs(b - batch), abs(s - image_size), s, b) for f, s, b in THROUGHPUT_H100 if f == family]
    if not rows:
        return None
    _, _, size, b = min(rows)
    train_ips, eval_ips = THROUGHPUT_H100[(family, size, b)]
    scale = (size / image_size) ** 2
    return train_ips * scale, eval_ips * scale, note


def _measured_s_per_image(spec: SweepSpec) -> dict[str, float]:
    """Median seconds per training image of earlier complete rows under ``--output``, per backbone."""
    try:
        df, _ = store.read_rows(Path(spec.output))
    except DmlbenchError:
        return {}
    if df.empty:
        return {}
    ok = df[(df[schema.STATUS] == "complete") & df[schema.STEPS].notna() & (df[schema.STEPS] > 0)
            & df[schema.GPU_TYPE].notna() & (df[schema.GPU_TYPE] != "cpu")]  # fmt: skip
    out: dict[str, float] = {}
    for backbone, grp in ok.groupby(schema.BACKBONE):
        imgs = []
        for _, row in grp.iterrows():
            try:
                cfg = json.loads(row[schema.CONFIG_JSON] or "{}")
            except json.JSONDecodeError:
                continue
            batch = int(cfg.get("classes_per_batch", 0)) * int(cfg.get("samples_per_class", 0))
            if batch > 0:
                imgs.append(float(row[schema.WALL_TIME_S]) / (float(row[schema.STEPS]) * batch))
        if imgs:
            out[str(backbone)] = float(sorted(imgs)[len(imgs) // 2])
    return out


def _schedule_text(base: dict[str, Any]) -> str:
    params = base.get("params") or {}
    frac = params.get("lr_milestone_frac")
    if frac is not None:
        return f"lr x{params.get('lr_gamma', '?')} at {frac:.3g} of the epochs"
    sched = base.get("schedule", "constant")
    if sched == "multistep":
        return f"multistep {list(base.get('milestones') or [])} x{base.get('gamma')}"
    return str(sched)


def resolved_config(settings: CellSettings) -> dict[str, Any]:
    """The fully resolved TrialConfig (every field, method params included) a trial of the cell
    receives before its sampled values: the search phase's fold 0, or the final phase's first model."""
    from dmlbench.search_spaces.loader import build_trial_config

    base = dict(settings.base)
    if not settings.searched:
        base["phase"] = "final"
        if not settings.fold_models:
            base["fold"] = None
    return build_trial_config(base, {}).to_dict()


def plan_json(spec: SweepSpec, p: Plan) -> dict[str, Any]:
    """The plan as a JSON object: ``sweep``, ``protocol``, ``missing_datasets`` and ``cells``."""
    cells = []
    for c in p.cells:
        st = c.settings
        cells.append({
            "cell": c.cell.key, "method": c.cell.method, "dataset": c.cell.dataset, "backbone": c.cell.backbone,
            "embedding_dim": int(st.base.get("embedding_dim", 0)) or None, "protocol": protocol_label(spec),
            "search_trials": c.search_trials, "models_per_search_trial": c.search_models,
            "final_trials": c.final_trials, "models_per_final_trial": c.final_models,
            "epochs": st.epochs, "recipe_epochs": st.recipe_epochs, "budget_capped": st.budget_capped,
            "asha_grace": st.grace if st.searched else None, "steps_per_epoch": c.steps_per_epoch,
            "est_gpu_hours": c.est_gpu_hours, "recipe_source": st.recipe_source,
            "paper_selection": st.paper_selection, "extrapolated": st.extrapolated,
            "config": resolved_config(st),
        })  # fmt: skip
    return {"sweep": spec.sweep_id, "protocol": spec.protocol, "folds": spec.folds,
            "search_folds": spec.n_search_folds, "final_seeds": spec.final_seeds,
            "reproducible": spec.reproducible, "missing_datasets": p.missing,
            "est_gpu_hours": p.total_gpu_hours(), "estimate": p.est_note, "cells": cells}  # fmt: skip


def format_plan(spec: SweepSpec, p: Plan) -> str:
    """The human plan: per cell the budget, schedule, batch, image and embedding size, weights and cost."""
    label = protocol_label(spec)
    head = (f"sweep {spec.sweep_id}: protocol {label}, {len(p.cells)} cell(s), {spec.folds} folds"
            + (f", search score = mean of {spec.n_search_folds} fold model(s)" if spec.protocol == "mlrc" else "")
            + (", reproducible (one search trial at a time per cell)" if spec.reproducible else ""))  # fmt: skip
    lines = [head]
    capped = []
    for c in p.cells:
        st, b = c.settings, c.settings.base
        pre = b.get("pretrained", True)
        weights = "random init" if pre is False else (f"{b['backbone']} (timm/registered)" if pre is True else str(pre))
        trials = (f"{c.search_trials} search x {c.search_models} models + " if c.search_trials else "") + \
            f"{c.final_trials} final x {c.final_models} model(s)"  # fmt: skip
        cost = f"≈{c.est_gpu_hours:.1f} GPU-h max" if c.est_gpu_hours is not None else "GPU-h unknown"
        lines.append(f"  {c.cell.key}: {trials}; {cost}")
        lines.append(
            f"    epochs {st.epochs}" + (f" (recipe {st.recipe_epochs}, capped)" if st.budget_capped else "")
            + (f" x {c.steps_per_epoch} steps" if c.steps_per_epoch else "")
            + f", schedule {_schedule_text(b)}, batch {b.get('classes_per_batch')}x{b.get('samples_per_class')}"
            + f", {b.get('image_size')} px, dim {b.get('embedding_dim')}, weights {weights}"
            + (f", ASHA grace {st.grace}" if st.searched else "")
        )  # fmt: skip
        if st.extrapolated:
            lines.append(f"    extrapolated: {st.extrapolated}")
        if st.budget_capped:
            capped.append(f"{c.cell.key} {st.recipe_epochs}->{st.epochs}")
    lines.append(f"total: {p.total_trials()} trials")
    lines.append(cluster.format_resources(spec))
    total = p.total_gpu_hours()
    lines.append(f"estimated cost: {f'≤ {total:.1f} GPU-hours' if total is not None else 'unknown'} ({p.est_note})")
    if capped:
        lines.append("warning: --epochs caps the recipes' own budgets (rows record budget_capped): " + ", ".join(capped))
    if p.missing:
        lines.append("missing datasets (the plan above still holds): " + "; ".join(p.missing))
    return "\n".join(lines)


def cell_space(spec: SweepSpec, space: Any, cell: Cell | None = None) -> Any:
    """The cell's space without the trial settings the sweep fixes itself (its ``trial_base``,
    the embedding size of a cell with one, the MLRC common settings on benchmarks), and, with
    ``recipe_wins``, without what the dataset preset and the method recommend."""
    locked = {k for k in spec.trial_base if k != "params"} | set(spec.trial_base.get("params") or {})
    if cell is not None:
        from dmlbench.datasets import DATASETS
        from dmlbench.methods import METHODS

        ds_cls = DATASETS.get(cell.dataset)
        embedded = bool(getattr(ds_cls, "embedded", False))
        method_cls = METHODS.get(cell.method)
        if cell.dim is not None:
            locked.add("embedding_dim")
        if not embedded and spec.protocol == "mlrc":
            locked |= set(MLRC_COMMON) | {"iters_per_epoch"} | set(method_cls.own_schedule_off)
        cell_base_ = cell_settings(spec, cell).base
        n_train = _train_images(cell, cell_base_, spec, full_train=False)
        if n_train:
            space = _bounded(space, method_cls.space_bounds(cell_base_, n_train), cell)
        if spec.recipe_wins:
            preset = dict(getattr(ds_cls, "preset", {}) or {})
            rec = dict(method_cls.recommended(cell.dataset, embedded))
            locked |= {k for k in (*preset, *rec) if k != "params"}
            locked |= set(preset.get("params") or {}) | set(rec.get("params") or {})
    return space.without(frozenset(locked))


def _bounded(space: Any, bounds: dict[str, float], cell: Cell) -> Any:
    """The space with each searched param's ``high`` lowered to its bound (Method.space_bounds)."""
    params = []
    for p in space.params:
        bound = bounds.get(p.name)
        if bound is not None and p.high is not None and p.high > bound:
            if p.low is not None and bound < p.low:
                raise ConfigError(
                    f"{cell.key}: {p.name} must stay <= {bound:g} here, below the space's low {p.low:g}; "
                    f"lower it in the search space ({space.source})."
                )
            p = p.model_copy(update={"high": float(bound)})
        params.append(p)
    return space.model_copy(update={"params": tuple(params)})
