"""``SweepSpec``: the validated, frozen description of one sweep (DESIGN §2, §5).

The CLI builds a ``SweepSpec``; everything downstream (cells, experiment names, the sweep id, the
resume check) derives from it. Fields that change *what* is computed form the identity hash;
where and on what it runs (``output``, ``address``, ``storage``, the concurrency caps, the
resources per trial) does not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dmlbench.config import TrialConfig

#: spec fields that do not change the results (excluded from the identity hash): where and on what
#: it runs (the resources per trial are resolved against the cluster when the sweep starts)
RUNTIME_FIELDS = frozenset({
    "output", "address", "storage", "max_concurrent", "sweep_max_concurrent", "name", "dashboard_host", "gpus_per_trial",
    "cpus_per_trial", "allow_cpu", "checkpoint_period_s", "checkpoint_every_epochs",
})  # fmt: skip
EMBEDDED = ("synthetic", "digits")
BENCHMARKS = ("cub200", "cars196", "sop", "inshop")
METRIC_MODES = {"map_at_r": "max", "r_precision": "max", "precision_at_1": "max", "nmi": "max", "f1": "max"}


Protocol = Literal["mlrc", "paper"]
PROTOCOLS: tuple[str, ...] = ("mlrc", "paper")


class SweepSpec(BaseModel):
    """One sweep: methods × datasets × backbones × embedding sizes under one named protocol.

    ``protocol`` (docs/protocol.md): ``mlrc`` searches each cell (a trial trains ``search_folds``
    fold models and scores their mean validation metric) and retrains the best params per seed as
    all ``folds`` fold models; ``paper`` runs each method's published recipe, no search.
    ``epochs`` is a cap on every recipe's own epochs (recorded as ``budget_capped`` in the rows);
    ``None`` leaves each recipe its own budget.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    methods: tuple[str, ...] = Field(min_length=1)
    datasets: tuple[str, ...] = Field(min_length=1)
    backbones: tuple[str, ...] | None = Field(
        default=None, min_length=1,
        description="None: the protocol's backbone (mlrc: BN-Inception; paper: each recipe's; embedded data: tiny)",
    )
    protocol: Protocol = "mlrc"
    embedding_dims: tuple[int, ...] | None = Field(
        default=None, min_length=1,
        description="sweep axis; None: mlrc's common size, or every size a method's paper published",
    )
    trials: int = Field(default=20, ge=1, description="search trials per cell")
    epochs: int | None = Field(default=None, ge=1, description="cap on every recipe's epochs (None: no cap)")
    grace_period: int | None = Field(
        default=None, ge=1, description="ASHA grace in epochs; None: what each method's recipe needs (at least)"
    )
    reduction_factor: int = Field(default=2, ge=2, description="ASHA reduction factor")
    reproducible: bool = Field(
        default=False,
        description="each cell runs its search trials one at a time (ASHA decides in trial order, TPE sees every "
        "earlier trial) with deterministic kernels: the same command and seed give the same rows on the same hardware",
    )
    metric: str = Field(default="map_at_r", description="validation metric the search maximises")
    gpus_per_trial: float | None = Field(
        default=None, ge=0, description="GPUs per trial (fractions share one); None: 1 on a cluster with GPUs, else 0"
    )
    cpus_per_trial: float = Field(default=1.0, gt=0, description="CPUs per trial: data-loader workers and threads")
    allow_cpu: bool = Field(default=False, description="let trials on the benchmark datasets train on CPU")
    max_concurrent: int | None = Field(default=None, ge=1, description="trials running at once per cell")
    sweep_max_concurrent: int | None = Field(
        default=None, ge=1, description="trials running at once in the whole sweep, all cells together"
    )
    search_space: str | None = Field(default=None, description="YAML overriding its method's space")
    folds: int = Field(default=4, ge=2)
    search_folds: int | None = Field(
        default=None, ge=1, description="fold models per search trial (None: all folds; 1: a hold-out, labelled so)"
    )
    final_seeds: int = Field(default=3, ge=0)
    seed: int = 0
    name: str | None = None
    output: str = "results"
    address: str | None = None
    storage: str | None = None
    dashboard_host: str = "127.0.0.1"
    preset: Literal["smoke"] | None = None
    data_root: str | None = None
    max_failures: int = Field(default=1, ge=0, description="restarts of a trial whose worker died or hit OOM")
    checkpoint_period_s: float = Field(
        default=600.0, gt=0, description="hand Tune a resumable checkpoint when this many seconds passed since the "
        "trial's last one (a lost worker costs at most about this much work)",
    )  # fmt: skip
    checkpoint_every_epochs: int | None = Field(
        default=None, ge=1, description="also hand one every this many epochs (None: by time only)"
    )
    trial_base: dict[str, Any] = Field(default_factory=dict, description="TrialConfig defaults for every trial")
    recipe_wins: bool = Field(
        default=False,
        description="keys set by the dataset preset or the method's recommendation are not searched "
        "(smoke: the small-data recipes stay, the rest of the space is searched)",
    )

    @field_validator("methods", "datasets", "backbones")
    @classmethod
    def _no_duplicates(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return v
        dup = sorted({x for x in v if v.count(x) > 1})
        if dup:
            raise ValueError(f"listed twice: {', '.join(dup)}")
        if any(not x.strip() for x in v):
            raise ValueError("empty name in the list")
        return v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "/\\ ") or v.startswith(".")):
            raise ValueError("a sweep name must be non-empty, without spaces or slashes, not starting with '.'")
        return v

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in METRIC_MODES:
            raise ValueError(f"unknown metric {v!r}; valid: {', '.join(METRIC_MODES)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        unknown = sorted(set(self.trial_base) - set(TrialConfig.model_fields))
        if unknown:
            raise ValueError(f"trial_base has unknown trial settings: {', '.join(unknown)}")
        if self.grace_period is not None and self.epochs is not None and self.grace_period > self.epochs:
            raise ValueError(f"grace_period ({self.grace_period}) must not exceed epochs ({self.epochs})")
        if self.search_folds is not None and self.search_folds > self.folds:
            raise ValueError(f"search_folds ({self.search_folds}) must not exceed folds ({self.folds})")
        if self.embedding_dims is not None:
            if any(d < 1 for d in self.embedding_dims):
                raise ValueError(f"embedding sizes must be positive, got {list(self.embedding_dims)}")
            if len(set(self.embedding_dims)) != len(self.embedding_dims):
                raise ValueError(f"embedding size listed twice in {list(self.embedding_dims)}")
        return self

    @property
    def n_search_folds(self) -> int:
        """Fold models per search trial."""
        return self.search_folds or self.folds

    # ---- identity ---------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What determines the results: the spec's fields (but where and how fast it runs) and the
        content of every search space the sweep uses (editing a YAML makes a new sweep id)."""
        ident = {k: v for k, v in self.model_dump(mode="json").items() if k not in RUNTIME_FIELDS}
        ident["search_space_digests"] = self.space_digests()
        return ident

    def space_digests(self) -> dict[str, str]:
        """``method -> sha256[:12]`` of the search-space file each method's cells use."""
        from dmlbench.search_spaces.loader import default_space_path, load_space_file

        override = None
        if self.search_space and Path(self.search_space).is_file():
            override = Path(self.search_space)
            override_method = load_space_file(override).method
        out: dict[str, str] = {}
        for m in self.methods:
            path = override if override is not None and override_method == m else default_space_path(m)
            out[m] = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"
        return out

    def spec_hash(self, length: int = 10) -> str:
        """Stable hash of :meth:`identity`.

        Example:
            >>> a = SweepSpec(methods=("ccp",), datasets=("digits",))
            >>> a.spec_hash() == a.model_copy(update={"output": "elsewhere"}).spec_hash()
            True
        """
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:length]

    @property
    def sweep_id(self) -> str:
        """``--name`` when given, else ``sweep-<spec hash>`` (the same command → the same id)."""
        return self.name or f"sweep-{self.spec_hash(8)}"

    @property
    def mode(self) -> str:
        return METRIC_MODES[self.metric]

    def cells(self) -> list[Cell]:
        """Every (method, dataset, backbone, embedding size) cell, in a deterministic order.

        Without ``backbones``, each cell gets its protocol's backbone (:func:`default_backbone`);
        without ``embedding_dims``, the ``paper`` protocol has one cell per size the method's paper
        published (``Method.published_dims``) and ``mlrc`` one cell at its common size (dim None,
        resolved by the planner).
        """
        out: list[Cell] = []
        for m in self.methods:
            for d in self.datasets:
                for b in self.backbones or (default_backbone(self.protocol, m, d),):
                    for dim in self._dims(m, d):
                        out.append(Cell(m, d, b, dim))
        return out

    def _dims(self, method: str, dataset: str) -> tuple[int | None, ...]:
        if self.embedding_dims is not None:
            return self.embedding_dims
        if self.protocol == "paper" and not _embedded(dataset):
            from dmlbench.methods import METHODS

            return METHODS.get(method).published_dims(dataset) or (None,)
        return (None,)

    def diff(self, other: SweepSpec) -> list[str]:
        """Human-readable differences of the identity fields (``other`` is the old spec)."""
        new, old = self.identity(), other.identity()
        return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(new) | set(old)) if new.get(k) != old.get(k)]


def _embedded(dataset: str) -> bool:
    from dmlbench.datasets import DATASETS

    return bool(getattr(DATASETS.get(dataset), "embedded", False))


#: the MLRC protocol's common backbone (Musgrave et al. 2020; CCP's tables, spec ccp.md §2)
MLRC_BACKBONE = "bninception"


def default_backbone(protocol: str, method: str, dataset: str) -> str:
    """A cell's backbone when the sweep names none: the embedded datasets' preset backbone
    (``tiny``); else ``mlrc``: BN-Inception; ``paper``: the method's recipe (ResNet-50 for
    methods without one)."""
    from dmlbench.datasets import DATASETS

    ds = DATASETS.get(dataset)
    if getattr(ds, "embedded", False):
        return str(dict(getattr(ds, "preset", {}) or {}).get("backbone", "tiny"))
    if protocol == "mlrc":
        return MLRC_BACKBONE
    from dmlbench.methods import METHODS

    cls = METHODS.get(method)
    dims = cls.published_dims(dataset)
    recipe = cls.recipe(dataset, dims[0], False) if dims else None
    return str(recipe.settings.get("backbone", "resnet50")) if recipe is not None else "resnet50"


@dataclass(frozen=True)
class Cell:
    """One (method, dataset, backbone[, embedding size]) cell of the sweep matrix.

    ``dim`` is None when the sweep has no embedding-size axis for this cell (the protocol's single
    size); the key then stays ``method/dataset/backbone``.
    """

    method: str
    dataset: str
    backbone: str
    dim: int | None = None

    @property
    def key(self) -> str:
        """Schema ``cell`` value, e.g. ``ccp/digits/tiny`` or ``nivmf/cub200/resnet50.tv_in1k/d512``."""
        base = f"{self.method}/{self.dataset}/{self.backbone}"
        return base if self.dim is None else f"{base}/d{self.dim}"

    @property
    def slug(self) -> str:
        """File-name-safe key, e.g. ``ccp-digits-tiny`` or ``nivmf-cub200-resnet50_tv_in1k-d512``."""
        parts = [self.method, self.dataset, self.backbone] + ([f"d{self.dim}"] if self.dim is not None else [])
        return "-".join(x.replace("/", "_").replace(".", "_") for x in parts)


def sweep_experiment_name(spec: SweepSpec) -> str:
    """Deterministic name of the sweep's Tune experiment (and of its trainable); the spec hash is
    part of it, as in :func:`experiment_name`."""
    return f"{spec.sweep_id}-{spec.spec_hash(6)}"


def experiment_name(spec: SweepSpec, cell: Cell, phase: str = "search") -> str:
    """Deterministic name of a cell phase: its Optuna study, its progress file (and, in sweeps of
    dmlbench before one experiment per sweep, its Tune experiment).

    The spec hash is part of it, so a sweep continued with ``--force`` under a changed spec
    starts new experiments while keeping the rows already written. The protocol is part of the
    spec hash; the embedding size is part of the cell's slug.
    """
    suffix = "" if phase == "search" else f"-{phase}"
    return f"{spec.sweep_id}-{cell.slug}-{spec.spec_hash(6)}{suffix}"
