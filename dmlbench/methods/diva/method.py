"""The registered ``diva`` method: four heads, DaNCE key network and queue, adversarial decorrelation.

Wiring only; the maths is in :mod:`dmlbench.methods.diva.functional` (spec ``shared/specs/diva.md``).

Embedding size: ``TrialConfig.embedding_dim`` is the TOTAL evaluated size, split evenly over the
heads (``head_dim = embedding_dim / len(features)``; the reference is 512 = 4 × 128). The
backbone's own ``head`` is replaced by ``nn.Identity`` (DiVA's heads are this module's Linear
layers on ``backbone.features``), so no parameter is left without a gradient.

Learning rates are relative to the trial's ``lr`` (reference 1e-5): β groups use
``lr × beta_lr_mult`` (50 → 5e-4) with weight decay 0, the decorrelation MLPs
``lr × decorr_lr_mult`` (1 → 1e-5) with weight decay 0, backbone + heads ``lr`` with the trial's
weight decay (4e-4).
"""

from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from dmlbench.errors import ConfigError
from dmlbench.methods.base import METHODS, Batch, LossOutput, Method, MethodParams, Recipe, TrainContext
from dmlbench.methods.diva import functional as Fd

if TYPE_CHECKING:
    from dmlbench.config import TrialConfig

HeadName = Literal["discriminative", "selfsimilarity", "shared", "intra"]
#: head order of the reference ModuleDict; weightings are written in this order
HEAD_ORDER: tuple[str, ...] = ("discriminative", "selfsimilarity", "shared", "intra")
MARGIN_TASKS: tuple[str, ...] = ("discriminative", "shared", "intra")
#: weightings (disc, selfsim, shared, intra) of the reference's ``--evaltypes all`` and
#: ``network_loader.py``; added as extra metrics with ``paper_weights=true``
PAPER_WEIGHTINGS: tuple[tuple[float, float, float, float], ...] = (
    (0.75, 1.25, 1.25, 1.25),
    (0.5, 1.0, 1.0, 1.0),
    (0.5, 1.5, 1.5, 1.5),
    (1.0, 0.5, 0.5, 0.5),
    (1.5, 1.0, 1.0, 1.0),
    (0.5, 2.0, 2.0, 2.0),
)


#: reference sample runs, ResNet-50 (spec §3.1); In-Shop (not in the paper) extrapolates SOP
_SAMPLE_RUNS: dict[str, dict[str, Any]] = {
    "cub200": {"epochs": 350, "params": {"alpha": 0.3, "rho": 1500.0, "n_key_batches": 30,
                                         "lr_milestone_frac": 55 / 350, "lr_gamma": 0.2}},
    "cars196": {"epochs": 350, "params": {"alpha": 0.15, "rho": 100.0, "n_key_batches": 30,
                                          "lr_milestone_frac": 70 / 350, "lr_gamma": 0.2}},
    "sop": {"epochs": 150, "params": {"alpha": 0.2, "rho": 150.0, "n_key_batches": 70,
                                      "lr_milestone_frac": 70 / 150, "lr_gamma": 0.3}},
}
#: the authors' final head weightings (``network_loader.py``, spec §4.2; picked on the test set):
#: CUB 0.5-1-1-1, CARS 0.5-2-2-2 (= 0.25-1-1-1 after normalisation), SOP 1-1-1-1
_PAPER_DISC_WEIGHT: dict[str, float] = {"cub200": 0.5, "cars196": 0.25, "sop": 1.0}
_SAMPLE_RUNS["inshop"] = _SAMPLE_RUNS["sop"]
#: shared by the ResNet-50 sample runs (spec §2, §3.1): torchvision's ImageNet ResNet-50 (timm
#: ``resnet50.tv_in1k``; the reference loads torchvision/Cadene weights), BN statistics frozen,
#: 224 px RandomResizedCrop(0.08, 1), batch 112 = 56 classes x 2, lr 1e-5, decay 4e-4, 4 x 128-d
_BENCHMARK_COMMON: dict[str, Any] = {
    "backbone": "resnet50.tv_in1k", "pretrained": True, "image_size": 224, "crop_scale": [0.08, 1.0],
    "bn_policy": "frozen_stats", "optimizer": "adam", "schedule": "constant", "iters_per_epoch": None,
    "embedding_dim": 512, "classes_per_batch": 56, "samples_per_class": 2, "lr": 1e-5, "weight_decay": 4e-4,
}
_RECIPE_PARAMS_COMMON: dict[str, Any] = {
    "dance_tau": 0.01, "margin": 0.2, "beta_init": 1.2, "beta_lr_mult": 50.0, "ema_momentum": 0.9,
    "decorr_hidden": 512, "shared_mode": "random", "dance_variant": "original",
}
RECIPE_SOURCE = "Confusezius/ECCV2020_DiVA_MultiFeature_DML SampleRuns/ECCV2020_DiVA_SampleRuns.sh (spec diva.md §3.1)"
#: how the reference picked its reported checkpoint and head weighting (spec §4.1-4.2)
PAPER_SELECTION = "best test-set R@1 epoch; head weighting picked among --evaltypes all on the test set"
#: embedded data (tiny backbone from scratch, 16-d heads, a few hundred training images): a small
#: queue, ρ re-tuned for D = 16 (c scales roughly like 1/D², so the R50 values would dominate),
#: a softer DaNCE temperature and a late LR drop.
_EMBEDDED: dict[str, Any] = {
    # alpha and lr_gamma are left to the Params defaults (0.3, 0.2) so a smoke sweep still searches them
    "params": {"rho": 10.0, "n_key_batches": 4, "dance_tau": 0.1, "decorr_hidden": 64,
               "lr_milestone_frac": 0.75,
               # one evaluated embedding keeps the CPU smoke run at about a minute
               "eval_heads": False, "eval_disc_weights": []}
}


def default_directions(features: list[str]) -> list[tuple[str, str]]:
    """Decorrelation directions (source → target) of the reference for a feature list.

    Every auxiliary head → discriminative; with exactly two auxiliary heads also the second →
    the first (reference: disc/selfsim/shared gives ``shared→selfsimilarity``).

    Example:
        >>> default_directions(["discriminative", "selfsimilarity", "shared", "intra"])
        [('selfsimilarity', 'discriminative'), ('shared', 'discriminative'), ('intra', 'discriminative')]
        >>> default_directions(["discriminative", "selfsimilarity", "shared"])[-1]
        ('shared', 'selfsimilarity')
    """
    aux = [f for f in features if f != "discriminative"]
    dirs = [(a, "discriminative") for a in aux]
    if len(aux) == 2:
        dirs.append((aux[1], aux[0]))
    return dirs


def weighting_key(weights: tuple[float, ...]) -> str:
    """Metric key of a head weighting, e.g. ``(0.5, 1, 1, 1) -> "w0.5-1-1-1"``."""
    return "w" + "-".join(f"{w:g}" for w in weights)


class DivaParams(MethodParams):
    """DiVA hyper-parameters (defaults: CUB ResNet-50 sample run of the reference)."""

    features: list[HeadName] = Field(
        default_factory=lambda: list(HEAD_ORDER),
        description="tasks/heads; ['discriminative'] alone is the plain margin-loss baseline",
    )
    directions: list[str] | None = Field(
        default=None, description="decorrelation directions 'src->tgt'; None: the reference's for `features`"
    )
    alpha: float = Field(default=0.3, ge=0, description="tied weight of the three auxiliary tasks")
    alpha_ssl: float | None = Field(default=None, ge=0, description="DaNCE weight; None: alpha")
    alpha_shared: float | None = Field(default=None, ge=0, description="shared-task weight; None: alpha")
    alpha_intra: float | None = Field(default=None, ge=0, description="intra-task weight; None: alpha")
    rho: float | list[float] = Field(default=1500.0, description="decorrelation weight (one, or one per direction)")
    margin: float = Field(default=0.2, ge=0)
    beta_init: float = Field(default=1.2, description="initial class boundary β")
    beta_lr_mult: float = Field(default=50.0, gt=0, description="β lr = lr × this (1e-5 × 50 = 5e-4)")
    miner_lower_cutoff: float = Field(default=0.5, ge=0, lt=2)
    shared_mode: Literal["random", "standard", "full"] = "random"
    dance_tau: float = Field(default=0.01, gt=0)
    dance_variant: Literal["original", "fixed"] = "original"
    dance_weight_on: Literal["logit", "exp"] = "logit"
    dance_lower_cutoff: float = Field(default=0.5, ge=0, lt=2)
    dance_upper_cutoff: float = Field(default=1.4, gt=0)
    n_key_batches: int = Field(default=30, ge=1, description="queue size K = n_key_batches × batch size")
    ema_momentum: float = Field(default=0.9, ge=0, le=1)
    decorr_hidden: int = Field(default=512, ge=1)
    decorr_lr_mult: float = Field(default=1.0, gt=0, description="MLP lr = lr × this")
    lr_milestone_frac: float | None = Field(
        default=55 / 350, gt=0, lt=1, description="MultiStepLR milestone as a fraction of epochs; None: trial schedule"
    )
    lr_gamma: float = Field(default=0.2, gt=0, le=1)
    disc_weight: float = Field(
        default=1.0, gt=0, description="weight of the discriminative head in the evaluated embedding (the others "
        "1): the head weighting, chosen on validation when searched (mlrc), the authors' choice in the paper recipes",
    )
    eval_disc_weights: list[float] = Field(
        default_factory=lambda: [0.5, 0.75, 1.5],
        description="extra weightings w_disc-1-1-1 evaluated for validation selection",
    )
    paper_weights: bool = Field(default=False, description="also evaluate the reference's weightings")
    eval_heads: bool = Field(default=True, description="also evaluate each head alone ('head/<name>' metrics)")

    @field_validator("features")
    @classmethod
    def _check_features(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"features must not repeat a head, got {v}")
        if "discriminative" not in v:
            raise ValueError("features must include 'discriminative' (the decorrelation target)")
        return [h for h in HEAD_ORDER if h in v]

    @field_validator("rho")
    @classmethod
    def _check_rho(cls, v: float | list[float]) -> float | list[float]:
        vals = v if isinstance(v, list) else [v]
        if any(r < 0 for r in vals):
            raise ValueError(f"rho must be ≥ 0, got {v}")
        return v

    @field_validator("eval_disc_weights")
    @classmethod
    def _check_weights(cls, v: list[float]) -> list[float]:
        if any(w <= 0 for w in v):
            raise ValueError(f"eval_disc_weights must be > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _check_cross(self) -> DivaParams:
        dirs = self.direction_pairs()
        for src, tgt in dirs:
            if src not in self.features or tgt not in self.features or src == tgt:
                raise ValueError(
                    f"direction '{src}->{tgt}' needs two different heads among features {self.features}"
                )
        if isinstance(self.rho, list) and len(self.rho) != len(dirs):
            raise ValueError(
                f"rho has {len(self.rho)} values but there are {len(dirs)} decorrelation directions "
                f"({', '.join(f'{s}->{t}' for s, t in dirs) or 'none'}); pass one value per direction or a single number"
            )
        if self.dance_lower_cutoff >= self.dance_upper_cutoff:
            raise ValueError("dance_lower_cutoff must be below dance_upper_cutoff")
        return self

    def direction_pairs(self) -> list[tuple[str, str]]:
        if self.directions is None:
            return default_directions(list(self.features))
        pairs = []
        for d in self.directions:
            if d.count("->") != 1:
                raise ValueError(f"a direction is written 'src->tgt', got {d!r}")
            src, tgt = (s.strip() for s in d.split("->"))
            pairs.append((src, tgt))
        return pairs

    def rho_list(self) -> list[float]:
        n = len(self.direction_pairs())
        return list(self.rho) if isinstance(self.rho, list) else [float(self.rho)] * n

    def task_alpha(self, task: str) -> float:
        own = {"selfsimilarity": self.alpha_ssl, "shared": self.alpha_shared, "intra": self.alpha_intra}[task]
        return self.alpha if own is None else own


def check_diva_config(cfg: TrialConfig) -> None:
    """Cross-field checks between the trial config and DiVA's params; one-sentence ConfigError.

    Call before training (``DiVA.build`` calls it too).
    """
    hp = DivaParams.model_validate(cfg.params)
    n = len(hp.features)
    if cfg.embedding_dim % n:
        raise ConfigError(
            f"diva splits embedding_dim over its {n} heads, but {cfg.embedding_dim} is not a multiple of {n}; "
            f"use e.g. embedding_dim={128 * n}."
        )
    mining = [f for f in hp.features if f in MARGIN_TASKS]
    if mining and cfg.samples_per_class < 2:
        raise ConfigError(
            f"diva's {', '.join(mining)} task(s) need at least 2 samples per class in a batch; "
            f"set samples_per_class ≥ 2 (got {cfg.samples_per_class})."
        )
    if "discriminative" in hp.features and cfg.classes_per_batch < 2:
        raise ConfigError("diva's distance-weighted miner needs at least 2 classes per batch.")
    if hp.lr_milestone_frac is not None and cfg.schedule != "constant":
        raise ConfigError(
            f"diva supplies its own MultiStepLR (params lr_milestone_frac, lr_gamma) but the trial sets "
            f"schedule={cfg.schedule!r}; set schedule=constant or params.lr_milestone_frac=null."
        )


@METHODS.register("diva")
class DiVA(Method):
    """DiVA: diverse visual feature aggregation, four embedding heads (Milbich et al., ECCV 2020).

    Details in the module docstring and ``docs/methods/diva.md``.
    """

    name = "diva"
    Params = DivaParams
    n_views = 2
    eval_distance = "cosine"
    hparams: DivaParams

    def __init__(self, cfg: TrialConfig, backbone: nn.Module, num_classes: int):
        check_diva_config(cfg)
        if hasattr(backbone, "head"):
            backbone.head = nn.Identity()
        super().__init__(cfg, backbone, num_classes)
        hp = self.hparams
        self.head_names: list[str] = list(hp.features)
        feat_dim = int(backbone.feat_dim)  # type: ignore[arg-type]
        self.head_dim = cfg.embedding_dim // len(self.head_names)
        self.batch_size = cfg.classes_per_batch * cfg.samples_per_class

        self.heads = nn.ModuleDict({h: nn.Linear(feat_dim, self.head_dim) for h in self.head_names})
        self.betas = nn.ParameterDict(
            {
                h: nn.Parameter(torch.full((num_classes,), float(hp.beta_init)))
                for h in self.head_names
                if h in MARGIN_TASKS
            }
        )
        self.directions = hp.direction_pairs()
        self.rho = hp.rho_list()
        self.decorr = nn.ModuleDict(
            {f"{s}->{t}": Fd.make_decorrelation_mlp(self.head_dim, hp.decorr_hidden) for s, t in self.directions}
        )
        self.use_dance = "selfsimilarity" in self.head_names
        if self.use_dance:
            # momentum key network: a frozen copy of backbone + selfsimilarity head (only that head's
            # keys are used); registered so it moves/saves with the module, but requires_grad=False,
            # in no param group, and forced to eval mode by ``train``.
            self.key_backbone = copy.deepcopy(backbone)
            self.key_head = copy.deepcopy(self.heads["selfsimilarity"])
            for p in itertools.chain(self.key_backbone.parameters(), self.key_head.parameters()):
                p.requires_grad_(False)
            self.queue = Fd.FifoQueue(hp.n_key_batches * self.batch_size, self.head_dim)
        self._gen = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + 7)
        self._pending_keys: Tensor | None = None
        self.train(True)

    @classmethod
    def check_config(cls, cfg: TrialConfig) -> None:
        """Cross-field checks against the trial (batch composition, embedding split, schedule)."""
        check_diva_config(cfg)

    own_schedule_off = {"lr_milestone_frac": None}

    @classmethod
    def recommended(cls, dataset: str, embedded: bool) -> dict[str, Any]:
        """Reference sample-run settings per benchmark (spec §3.1), small-data settings for embedded sets."""
        if embedded:
            return copy.deepcopy(_EMBEDDED)
        recipe = cls.recipe(dataset, 512, embedded) if dataset in _SAMPLE_RUNS else None
        return recipe.settings if recipe is not None else {}

    @classmethod
    def published_dims(cls, dataset: str) -> tuple[int, ...]:
        """512 = 4 heads x 128 (every sample run)."""
        return (512,)

    @classmethod
    def recipe(cls, dataset: str, dim: int, embedded: bool) -> Recipe | None:
        """The ResNet-50 sample run of ``dataset``; In-Shop (not in the paper) takes the SOP run, and
        another total size than 512 keeps the run with heads of ``dim / 4``, both marked extrapolated."""
        if embedded:
            return Recipe({**copy.deepcopy(_EMBEDDED), "embedding_dim": dim}, "dmlbench small-data settings",
                          "none (embedded stand-in)", "no paper recipe for embedded data: the small-data settings")
        run = _SAMPLE_RUNS.get(dataset)
        if run is None:
            return None
        notes = []
        if dataset == "inshop":
            notes.append("DiVA has no In-Shop setting; the SOP sample run")
        if dim != 512:
            notes.append(f"the sample runs use 4 x 128 = 512; {dim} gives heads of {dim // 4}")
        disc = _PAPER_DISC_WEIGHT["sop" if dataset == "inshop" else dataset]
        settings = {**_BENCHMARK_COMMON, "embedding_dim": dim, "epochs": run["epochs"],
                    "params": {**_RECIPE_PARAMS_COMMON, **run["params"], "disc_weight": disc}}
        source = f"{RECIPE_SOURCE}, {'sop' if dataset == 'inshop' else dataset} R50"
        return Recipe(copy.deepcopy(settings), source, PAPER_SELECTION, "; ".join(notes) or None)

    @classmethod
    def space_bounds(cls, base: dict[str, Any], n_train_images: int) -> dict[str, float]:
        """The queue holds at most the run's training images: ``n_key_batches <= N / batch``."""
        batch = int(base.get("classes_per_batch", 56)) * int(base.get("samples_per_class", 2))
        return {"n_key_batches": max(1, n_train_images // batch)}

    @classmethod
    def grace_epochs(cls, cfg: TrialConfig) -> int:
        """The LR milestone (``lr_milestone_frac`` x epochs): rankings change at the drop (spec §3.2)."""
        frac = cfg.params.get("lr_milestone_frac")
        return max(1, round(float(frac) * cfg.epochs)) if frac is not None else 1

    # ---- modes / helpers ----------------------------------------------------------------
    def train(self, mode: bool = True) -> DiVA:
        super().train(mode)
        if self.use_dance:
            self.key_backbone.eval()
            self.key_head.eval()
        return self

    def key_modules(self) -> list[nn.Module]:
        return [self.key_backbone, self.key_head] if self.use_dance else []

    def online_key_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """(key parameters, matching online parameters) for the EMA."""
        if not self.use_dance:
            return [], []
        key = list(self.key_backbone.parameters()) + list(self.key_head.parameters())
        online = list(self.backbone.parameters()) + list(self.heads["selfsimilarity"].parameters())
        return key, online

    def head_embeddings(self, images: Tensor) -> dict[str, Tensor]:
        """Per-head L2-normalised embeddings (float32) of ``images``."""
        feats = self.backbone.features(images)  # type: ignore[operator]
        return {h: F.normalize(self.heads[h](feats).float(), dim=-1) for h in self.head_names}

    @torch.no_grad()
    def key_embed(self, images: Tensor) -> Tensor:
        """Key-network selfsimilarity embedding (unit norm, float32, no grad)."""
        feats = self.key_backbone.features(images)  # type: ignore[operator]
        return F.normalize(self.key_head(feats).float(), dim=-1)

    # ---- contract -----------------------------------------------------------------------
    def loss(self, batch: Batch) -> LossOutput:
        hp = self.hparams
        if len(batch.views) < 2 and self.use_dance:
            raise ValueError("diva needs two views per image (n_views = 2)")
        y = batch.labels
        # Triplets are drawn on the CPU with the CPU generator self._gen (seeded, checkpointed), from
        # the host labels (no read-back) and, for the discriminative and the shared task, the
        # distance-weighted probabilities, computed on the device and copied back: one host sync
        # each per step. Those two copies are inherent (the draws, and which rows are anchors,
        # depend on the values; drawing on the device would change the seeded stream); the
        # losses, counts and logs below stay on the device.
        y_host = batch.labels_on_host()
        heads = self.head_embeddings(batch.views[0])
        device_type = y.device.type
        terms: dict[str, float | Tensor] = {}
        with torch.autocast(device_type=device_type, enabled=False):
            heads = {h: v.float() for h, v in heads.items()}
            disc_t = Fd.sample_distance_triplets(heads["discriminative"].detach(), y_host, self._gen,
                                                 hp.miner_lower_cutoff)
            total, info = Fd.margin_loss(heads["discriminative"], y, disc_t, self.betas["discriminative"], hp.margin)
            terms["disc"] = total.detach()
            terms["disc_active"] = info["n_active"]
            if self.use_dance:
                k = self.key_embed(batch.views[1])
                l_dance, dinfo = Fd.dance_loss(
                    heads["selfsimilarity"], k, self.queue.keys, hp.dance_tau, hp.dance_variant,
                    hp.dance_lower_cutoff, hp.dance_upper_cutoff, hp.dance_weight_on,
                )
                self._pending_keys = k.detach()
                total = total + hp.task_alpha("selfsimilarity") * l_dance
                terms["dance"] = l_dance.detach()
                terms["dance_s_pos"] = dinfo["s_pos_mean"]
            if "shared" in heads:
                t = Fd.sample_shared_triplets(heads["shared"].detach(), y_host, self._gen, hp.shared_mode,
                                              hp.miner_lower_cutoff)
                l_sh, _ = Fd.margin_loss(heads["shared"], y, t, self.betas["shared"], hp.margin)
                total = total + hp.task_alpha("shared") * l_sh
                terms["shared"] = l_sh.detach()
            if "intra" in heads:
                t = Fd.sample_intra_triplets(y_host, self._gen, y.device)
                l_in, _ = Fd.margin_loss(heads["intra"], y, t, self.betas["intra"], hp.margin)
                total = total + hp.task_alpha("intra") * l_in
                terms["intra"] = l_in.detach()
            if self.directions:
                l_adv, clogs = Fd.adversarial_loss(heads, self.decorr, self.directions, self.rho)
                total = total + l_adv
                terms["adv"] = l_adv.detach()
                terms.update(clogs)
        return LossOutput(total, terms)

    def primary_weights(self) -> dict[str, float]:
        """Head weights of the evaluated embedding: ``disc_weight`` for the discriminative head, 1 else."""
        return {h: (self.hparams.disc_weight if h == "discriminative" else 1.0) for h in self.head_names}

    def embed(self, images: Tensor) -> Tensor:
        """Evaluated embedding: ``normalize(cat(w_h φ_h))`` of the normalised heads (``primary_weights``)."""
        return Fd.weighted_concat(self.head_embeddings(images), self.primary_weights())

    def pool_embed(self, images: Tensor) -> Tensor:
        return self.embed(images)

    def eval_weightings(self) -> list[tuple[float, ...]]:
        """Extra head weightings (head order) evaluated besides 1-1-1-1."""
        n = len(self.head_names)
        if n == 1:
            return []
        out: list[tuple[float, ...]] = [(w,) + (1.0,) * (n - 1) for w in self.hparams.eval_disc_weights]
        if self.hparams.paper_weights and self.head_names == list(HEAD_ORDER):
            out += [w for w in PAPER_WEIGHTINGS if w not in out]
        return [w for w in out if any(x != 1.0 for x in w)]

    def embed_for_eval(self, images: Tensor) -> dict[str, Tensor]:
        """Primary ``""`` = 1-1-1-1; ``"head/<name>"`` per head; ``"w<wd>-<w>-…"`` other weightings."""
        heads = self.head_embeddings(images)
        out = {"": Fd.weighted_concat(heads, self.primary_weights())}
        if len(heads) > 1:
            if self.hparams.eval_heads:
                for h, v in heads.items():
                    out[f"head/{h}"] = v
            for w in self.eval_weightings():
                out[weighting_key(w)] = Fd.weighted_concat(heads, dict(zip(self.head_names, w, strict=True)))
        return out

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        hp = self.hparams
        groups: list[dict[str, Any]] = [
            {
                "name": "backbone+heads",
                "params": [p for p in itertools.chain(self.backbone.parameters(), self.heads.parameters()) if p.requires_grad],
                "lr": base_lr,
                "weight_decay": self.cfg.weight_decay,
            }
        ]
        for h, beta in self.betas.items():
            groups.append({"name": f"beta/{h}", "params": [beta], "lr": base_lr * hp.beta_lr_mult, "weight_decay": 0.0})
        if self.directions:
            groups.append(
                {
                    "name": "decorrelation",
                    "params": list(self.decorr.parameters()),
                    "lr": base_lr * hp.decorr_lr_mult,
                    "weight_decay": 0.0,
                }
            )
        key_ids = {id(p) for m in self.key_modules() for p in m.parameters()}
        assert not any(id(p) in key_ids for g in groups for p in g["params"]), "key net in a param group"
        return groups

    def configure_scheduler(
        self, optimizer: torch.optim.Optimizer, epochs: int
    ) -> torch.optim.lr_scheduler.LRScheduler | None:
        frac = self.hparams.lr_milestone_frac
        if frac is None:
            return None
        milestone = max(1, round(frac * epochs))
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[milestone], gamma=self.hparams.lr_gamma)

    # ---- hooks --------------------------------------------------------------------------
    @torch.no_grad()
    def on_train_start(self, ctx: TrainContext) -> None:
        """Fill the queue with the key net's embeddings of ``n_key_batches`` training batches (view A).

        Skipped when the queue is already filled (a resumed run restores it from the checkpoint).
        """
        self.train(self.training)
        if not self.use_dance or bool(self.queue.filled):
            return
        need = self.hparams.n_key_batches
        n_train = int(sum(ctx.train_class_counts)) if ctx.train_class_counts is not None else None
        if n_train is not None and self.queue.size > n_train:
            raise ConfigError(
                f"diva's queue of {self.queue.size} keys (n_key_batches={need} x batch {self.batch_size}) is larger "
                f"than the {n_train} training images of this trial, so it would hold repeated images as negatives; "
                f"lower n_key_batches to at most {n_train // self.batch_size} or the batch size."
            )
        keys: list[Tensor] = []
        while len(keys) < need:
            before = len(keys)
            for batch in ctx.train_loader:
                keys.append(self.key_embed(batch.views[0].to(ctx.device)))
                if len(keys) == need:
                    break
            if len(keys) == before:
                raise ConfigError("diva cannot fill its queue: the training loader yields no batches.")
        filled = torch.cat(keys)
        if filled.shape[0] != self.queue.size:
            raise ConfigError(
                f"diva's queue expects full batches of {self.batch_size} ({self.queue.size} keys) but the loader "
                f"gave {filled.shape[0]}; the training loader must drop incomplete batches."
            )
        self.queue.init(filled)

    @torch.no_grad()
    def on_step_end(self, ctx: TrainContext) -> None:
        """After the optimiser step: EMA of the key net, then enqueue this step's keys."""
        if not self.use_dance:
            return
        key, online = self.online_key_pairs()
        Fd.ema_update_(key, online, self.hparams.ema_momentum)
        if self._pending_keys is not None:
            self.queue.push(self._pending_keys)
            self._pending_keys = None

    def extra_state(self) -> dict[str, Any]:
        return {"miner_generator": self._gen.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"miner_generator"}
        if unknown:
            raise ValueError(f"diva extra state has unknown keys {sorted(unknown)}")
        if "miner_generator" in state:
            self._gen.set_state(state["miner_generator"].to(torch.uint8).cpu())
