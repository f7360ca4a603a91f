"""The registered ``nivmf`` method: (PANC +) EL-nivMF with non-isotropic vMF class proxies.

Wires the pure functions of :mod:`dmlbench.methods.nivmf.vmf` and
:mod:`dmlbench.methods.nivmf.functional` into the Method contract (spec ``shared/specs/nivmf.md``
§1–§2, §6). Evaluation uses the normalised embedding with cosine similarity (spec §3).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from dmlbench.errors import ConfigError
from dmlbench.methods.base import METHODS, Batch, LossOutput, Method, MethodParams, Recipe, TrainContext
from dmlbench.methods.nivmf.functional import class_mean_directions, el_nivmf_loss
from dmlbench.methods.nivmf.vmf import CODE_POLY_DIMS, check_log_cp_dim, log_cp

if TYPE_CHECKING:
    from dmlbench.config import TrialConfig


class NivmfParams(MethodParams):
    """Hyper-parameters of nivMF. Defaults: the CUB200 / D = 128 recipe of ``example_runs.sh``.

    The reference flag each one corresponds to is given in ``docs/methods/nivmf.md``.
    """

    concentration: float = Field(default=6.0, gt=0, description="initial per-dimension proxy κ and initial ‖proxy_v‖")
    init_norm_multiplier: float = Field(default=30.0, gt=0, description="scales the head's initial weights (image κ)")
    temp: float = Field(default=0.003, gt=0, description="initial temperature T of the ELK logits")
    temp_learnable: bool = True
    temp_param: Literal["raw", "log"] = Field(
        default="raw", description="raw: T itself is the parameter (reference); log: log T is (T stays > 0)"
    )
    n_samples: int = Field(default=5, ge=1, description="MC samples S per image, shared by all classes")
    guidance_w: float = Field(default=3.0, ge=0, description="weight of the ProxyAnchor guidance term")
    pa_alpha: float = Field(default=32.0, gt=0)
    pa_delta: float = Field(default=0.1, ge=0)
    kappa_min: float = Field(default=0.1, gt=0, description="floor of the per-dimension proxy concentrations")
    stretch_samples: bool = Field(default=False, description="form (B): stretch samples by K_c (paper); False = code")
    log_cp: Literal["auto", "code_poly", "exact"] = Field(
        default="auto", description="auto: code_poly for D in {128, 512} (recipes), exact otherwise"
    )
    sampler: Literal["exact", "code"] = Field(
        default="exact", description="Wood's b: exact, or the reference code's blended b (biased for 10 < κ ≲ D)"
    )
    warm_start: bool = Field(default=True, description="init proxies from class-mean embeddings (every recipe)")
    subsample_p: float = Field(default=1.0, gt=0, le=1, description="fraction of non-batch classes in the EL softmax")
    proxy_lr_mult: float = Field(default=5000.0, gt=0, description="proxy-direction lr = lr × this")
    kappa_lr_mult: float = Field(default=20000.0, gt=0, description="proxy-concentration lr = lr × this")
    temp_lr_mult: float = Field(default=200.0, gt=0, description="temperature lr = lr × this")
    lr_milestone_frac: float | None = Field(
        default=None, gt=0, lt=1, description="MultiStepLR milestone as a fraction of epochs; None: the trial's schedule"
    )
    lr_gamma: float = Field(default=0.3, gt=0, le=1, description="decay factor at lr_milestone_frac")
    eval_euclidean_raw: bool = Field(
        default=True, description="also score the raw (unnormalised) embedding by euclidean distance, "
        "logged as euclidean_raw/<metric> (spec §3: its norm carries the image's certainty)"
    )

    @model_validator(mode="after")
    def _checks(self) -> NivmfParams:
        for name in ("concentration", "init_norm_multiplier", "temp", "kappa_min"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")
        return self


#: shared by every row of ``example_runs.sh`` (spec §2.2-2.3): torchvision's ImageNet ResNet-50
#: (Cadene ``pretrainedmodels`` = torchvision weights; timm ``resnet50.tv_in1k``), BN statistics
#: frozen with affine trained, 224 px RandomResizedCrop(0.08, 1), batch 64 = 32 classes x 2, Adam
#: lr 1e-5 with coupled decay 4e-4, MultiStepLR per epoch; T0 0.003 (lr x200), S 5, warm start,
#: the reference code's blended vMF sampler (``sampler: code``, which produced the published
#: numbers) and log C_D polynomial, unstretched samples (form A).
_RECIPE_COMMON: dict[str, Any] = {
    "backbone": "resnet50.tv_in1k", "pretrained": True, "image_size": 224, "crop_scale": [0.08, 1.0],
    "bn_policy": "frozen_stats", "lr": 1e-5, "weight_decay": 4e-4, "optimizer": "adam", "classes_per_batch": 32,
    "samples_per_class": 2, "schedule": "multistep", "iters_per_epoch": None,
}
_RECIPE_PARAMS_COMMON: dict[str, Any] = {
    "temp": 0.003, "temp_lr_mult": 200.0, "n_samples": 5, "warm_start": True, "stretch_samples": False,
    "log_cp": "code_poly", "sampler": "code", "pa_alpha": 32.0, "pa_delta": 0.1, "lr_milestone_frac": None,
}
#: ``example_runs.sh`` of the reference code (spec §2.3), per (dataset, D)
RECIPES: dict[tuple[str, int], dict[str, Any]] = {
    ("cub200", 128): {"epochs": 250, "milestones": [25, 50], "gamma": 0.3,
                      "params": {"proxy_lr_mult": 5000.0, "kappa_lr_mult": 20000.0, "concentration": 6.0,
                                 "init_norm_multiplier": 30.0, "guidance_w": 3.0}},
    ("cub200", 512): {"epochs": 250, "milestones": [31], "gamma": 0.1,
                      "params": {"proxy_lr_mult": 5000.0, "kappa_lr_mult": 20000.0, "concentration": 18.0,
                                 "init_norm_multiplier": 50.0, "guidance_w": 5.0}},
    ("cars196", 128): {"epochs": 300, "milestones": [60, 80], "gamma": 0.1,
                       "params": {"proxy_lr_mult": 7500.0, "kappa_lr_mult": 7500.0, "concentration": 9.0,
                                  "init_norm_multiplier": 12.0, "guidance_w": 0.3}},
    ("cars196", 512): {"epochs": 300, "milestones": [105, 170], "gamma": 0.2,
                       "params": {"proxy_lr_mult": 5000.0, "kappa_lr_mult": 20000.0, "concentration": 22.0,
                                  "init_norm_multiplier": 10.0, "guidance_w": 0.1}},
}
#: the D = 128 rows, kept for ``dmlbench train`` (``recommended``)
RECIPES_D128: dict[str, dict[str, Any]] = {d: r for (d, dim), r in RECIPES.items() if dim == 128}
RECIPE_SOURCE = "ExplainableML/Probabilistic_Deep_Metric_Learning@96c7726 example_runs.sh (spec nivmf.md §2.3)"
#: how the reference picked the checkpoint behind its numbers (spec §3)
PAPER_SELECTION = "best test-set cosine R@1 epoch (checkpoint kept whenever test R@1 improved)"
#: small-data settings for the embedded datasets on the tiny CPU backbone (spec §6 smoke config:
#: proxies and κ at 100 × the backbone lr, T at 10 ×; on the embedded preset's lr = 1e-3). The
#: head scale gives an initial image κ ≈ 60 in D = 64 (mean resultant length ≈ 0.5): with κ ≈ 15
#: the samples are nearly uniform on the sphere and the run first loses MAP@R for several epochs.
EMBEDDED_PARAMS: dict[str, Any] = {
    "n_samples": 3, "temp": 0.1, "concentration": 4.0, "init_norm_multiplier": 30.0, "log_cp": "exact",
    "stretch_samples": False, "guidance_w": 0.5, "proxy_lr_mult": 100.0, "kappa_lr_mult": 100.0,
    "temp_lr_mult": 10.0,
}


def resolve_log_cp_mode(mode: str, dim: int) -> Literal["code_poly", "exact"]:
    """The concrete log C_D mode for ``embedding_dim``; ConfigError when it is unsafe there."""
    resolved: Literal["code_poly", "exact"]
    if mode == "auto":
        resolved = "code_poly" if dim in CODE_POLY_DIMS else "exact"
    elif mode in ("code_poly", "exact"):
        resolved = mode  # type: ignore[assignment]
    else:
        raise ConfigError(f"unknown nivmf log_cp {mode!r}; valid values: auto, code_poly, exact.")
    try:
        check_log_cp_dim(dim, resolved)
    except ValueError as err:
        raise ConfigError(f"nivmf: {err}.") from None
    return resolved


@METHODS.register("nivmf")
class Nivmf(Method):
    """EL-nivMF (Kirchhof, Roth et al., ECCV 2022), optionally with ProxyAnchor guidance (PANC).

    Modules/parameters: ``backbone`` (raw embeddings, no normalisation), ``proxy_v`` [C, D]
    (unnormalised proxy vectors, only their direction is used), ``kappa_raw`` [C, D]
    (per-dimension concentrations, floored at ``kappa_min`` in the loss), ``temp_raw`` (T or log T).
    ``embed`` returns the L2-normalised embedding (cosine retrieval, spec §3).
    """

    name = "nivmf"
    Params = NivmfParams
    eval_distance = "cosine"
    eval_distances = {"euclidean_raw": "euclidean"}

    def __init__(self, cfg: TrialConfig, backbone: nn.Module, num_classes: int):
        super().__init__(cfg, backbone, num_classes)
        hp: NivmfParams = self.hparams  # type: ignore[assignment]
        dim = cfg.embedding_dim
        self.dim = dim
        self.log_cp_mode = resolve_log_cp_mode(hp.log_cp, dim)
        if num_classes < 2:
            raise ConfigError(f"nivmf needs at least 2 training classes, got {num_classes}.")
        proxy = torch.empty(num_classes, dim)
        nn.init.xavier_normal_(proxy, gain=hp.concentration)
        self.proxy_v = nn.Parameter(proxy)
        self.kappa_raw = nn.Parameter(torch.full((num_classes, dim), hp.concentration))
        t0 = math.log(hp.temp) if hp.temp_param == "log" else hp.temp
        self.temp_raw = nn.Parameter(torch.tensor(t0), requires_grad=hp.temp_learnable)
        #: set once the warm start ran, so a resumed run (state loaded) does not redo it
        self.register_buffer("proxies_initialised", torch.tensor(False))
        self._generator: torch.Generator | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._sub_generator = torch.Generator().manual_seed(cfg.seed + 1)

    own_schedule_off = {"lr_milestone_frac": None}

    @classmethod
    def recommended(cls, dataset: str, embedded: bool) -> dict[str, Any]:
        """The reference's D = 128 recipe for cub200/cars196, the smoke settings for embedded data."""
        if embedded:
            return {"params": dict(EMBEDDED_PARAMS)}
        if dataset not in RECIPES_D128:
            return {}
        recipe = cls.recipe(dataset, 128, embedded)
        if recipe is None:
            return {}
        settings = copy.deepcopy(recipe.settings)
        # "auto" is the recipe's code_poly at D = 128 and stays valid when a sweep sets another size
        # (the smoke preset's D = 32): a recommendation must not pin what only fits D in {128, 512}
        settings["params"]["log_cp"] = "auto"
        return settings

    @classmethod
    def published_dims(cls, dataset: str) -> tuple[int, ...]:
        """D = 128 and 512 (``example_runs.sh`` has both for CUB200 and CARS196)."""
        return (128, 512)

    @classmethod
    def recipe(cls, dataset: str, dim: int, embedded: bool) -> Recipe | None:
        """``example_runs.sh`` for (dataset, D). SOP and In-Shop have no released recipe (spec §2.3,
        P9): they get the CUB200 row of the same D, marked extrapolated. Other D: the nearest row."""
        if embedded:
            return Recipe({"embedding_dim": dim, "params": dict(EMBEDDED_PARAMS)}, "spec nivmf.md §6 smoke config",
                          "none (embedded stand-in)", "no paper recipe for embedded data: the small-data settings")
        extrapolated = None
        near = min((128, 512), key=lambda d: abs(d - dim))
        key = (dataset, near)
        if dataset not in ("cub200", "cars196"):
            key = ("cub200", near)
            extrapolated = f"the reference released no {dataset} recipe; CUB200 D={near} row"
        elif near != dim:
            extrapolated = f"no D={dim} recipe; the D={near} row"
        row = RECIPES[key]
        params = {**_RECIPE_PARAMS_COMMON, **row["params"]}
        if dim not in CODE_POLY_DIMS:
            params["log_cp"] = "exact"  # the polynomial is fitted for D in {128, 512} only (spec §1.6)
        settings = {**_RECIPE_COMMON, "embedding_dim": dim, **{k: v for k, v in row.items() if k != "params"},
                    "params": params}
        return Recipe(copy.deepcopy(settings), f"{RECIPE_SOURCE}, {key[0]} D={key[1]}", PAPER_SELECTION, extrapolated)

    @classmethod
    def grace_epochs(cls, cfg: TrialConfig) -> int:
        """The first LR milestone (a searched ``lr_milestone_frac`` or the trial's multistep schedule)."""
        frac = cfg.params.get("lr_milestone_frac")
        if frac is not None:
            return max(1, round(float(frac) * cfg.epochs))
        if cfg.schedule == "multistep" and cfg.milestones:
            return max(1, min(cfg.milestones))
        return 1

    @classmethod
    def check_config(cls, cfg: TrialConfig) -> None:
        """Config-time checks that need trial fields (embedding_dim); raises ConfigError."""
        resolve_log_cp_mode(str(cfg.params.get("log_cp", "auto")), cfg.embedding_dim)

    @classmethod
    def build(cls, cfg: TrialConfig, backbone: nn.Module, num_classes: int) -> Nivmf:
        """Construct, and scale the head's initial weights by ``init_norm_multiplier`` (spec §1.1)."""
        method = cls(cfg, backbone, num_classes)
        head = getattr(backbone, "head", None)
        if not isinstance(head, nn.Linear):
            raise ConfigError("nivmf needs a backbone with a linear `head` (the engine's Backbone) to set the initial norm.")
        with torch.no_grad():
            head.weight.mul_(method.params.init_norm_multiplier)
        return method

    @property
    def params(self) -> NivmfParams:
        return self.hparams  # type: ignore[return-value]

    # ---- pieces -------------------------------------------------------------------------------
    def temperature(self) -> Tensor:
        """The current temperature T (float32)."""
        t = self.temp_raw.float()
        return torch.exp(t) if self.params.temp_param == "log" else t

    def log_cp_fn(self, r: Tensor) -> Tensor:
        return log_cp(r, self.dim, self.log_cp_mode)

    def generator(self, device: torch.device) -> torch.Generator:
        """The sampler's own random source, seeded from the trial seed (checkpointed)."""
        if self._generator is None or self._generator.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.cfg.seed)
            self._generator = gen
            if self._pending_rng is not None:
                self._restore_rng(self._pending_rng)
                self._pending_rng = None
        return self._generator

    # ---- contract -------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> LossOutput:
        hp = self.params
        emb = self.backbone(batch.images)
        device_type = emb.device.type
        with torch.autocast(device_type=device_type, enabled=False):  # logits reach ~1e5 (spec P10)
            emb = emb.float()
            temp = self.temperature()
            total, parts = el_nivmf_loss(
                emb, batch.labels, self.proxy_v.float(), self.kappa_raw.float(), temp, self.log_cp_fn,
                n_samples=hp.n_samples, guidance_w=hp.guidance_w, generator=self.generator(emb.device),
                stretch=hp.stretch_samples, kappa_min=hp.kappa_min, alpha=hp.pa_alpha, delta=hp.pa_delta,
                sampler_blend=hp.sampler == "code", subsample=hp.subsample_p,
                subsample_generator=self._sub_generator, host_labels=batch.host_labels,
            )
        terms: dict[str, float | Tensor] = dict(parts.as_dict())
        terms["temp"] = temp.detach()
        terms["proxy_kappa_mean"] = torch.clamp(self.kappa_raw.detach(), min=hp.kappa_min).mean()
        return LossOutput(total, terms)

    def embed(self, images: Tensor) -> Tensor:
        """The normalised embedding (the image vMF's mode), compared by cosine."""
        return nn.functional.normalize(self.backbone(images).float(), dim=-1)

    def embed_for_eval(self, images: Tensor) -> dict[str, Tensor]:
        """The primary normalised embedding, plus the raw one for euclidean scoring (one forward)."""
        raw = self.backbone(images).float()
        out = {"": nn.functional.normalize(raw, dim=-1)}
        if self.params.eval_euclidean_raw:
            out["euclidean_raw"] = raw
        return out

    def configure_scheduler(
        self, optimizer: torch.optim.Optimizer, epochs: int
    ) -> torch.optim.lr_scheduler.LRScheduler | None:
        """One MultiStepLR milestone at ``lr_milestone_frac`` × epochs (searchable), else None."""
        frac = self.params.lr_milestone_frac
        if frac is None:
            return None
        milestone = max(1, round(frac * epochs))
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[milestone], gamma=self.params.lr_gamma)

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """backbone (lr, default wd), proxies / kappa / temp (lr × multiplier, wd 0)."""
        hp = self.params
        groups: list[dict[str, Any]] = [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": base_lr, "name": "backbone"},
            {"params": [self.proxy_v], "lr": base_lr * hp.proxy_lr_mult, "weight_decay": 0.0, "name": "proxies"},
            {"params": [self.kappa_raw], "lr": base_lr * hp.kappa_lr_mult, "weight_decay": 0.0, "name": "kappa"},
        ]
        if self.temp_raw.requires_grad:
            groups.append({"params": [self.temp_raw], "lr": base_lr * hp.temp_lr_mult, "weight_decay": 0.0,
                           "name": "temp"})
        return groups

    @torch.no_grad()
    def on_train_start(self, ctx: TrainContext) -> None:
        """Warm start: proxies ← normalised class means of the untrained network × concentration."""
        if not self.params.warm_start or bool(self.proxies_initialised):
            return
        embeds, labels = ctx.embed_train_set()
        dirs = class_mean_directions(embeds.float().to(self.proxy_v.device), labels.to(self.proxy_v.device),
                                     self.num_classes)
        self.proxy_v.copy_(dirs * self.params.concentration)
        self.proxies_initialised.fill_(True)

    def on_step_end(self, ctx: TrainContext) -> None:
        """A raw temperature that reached T ≤ 0 or a non-finite T (nothing bounds it, spec P3) is a
        divergence at this step. The test runs on the device and is read back with the step logs
        (``ctx.diverged_if``), not here: a per-step ``float(T)`` would wait for the device."""
        t = self.temperature().detach()
        ctx.diverged_if(~((t > 0) & torch.isfinite(t)), {"temp": t})

    def on_epoch_end(self, ctx: TrainContext) -> dict[str, float]:
        k = torch.clamp(self.kappa_raw.detach(), min=self.params.kappa_min)
        return {
            "temp": float(self.temperature().detach()),
            "proxy_kappa_mean": float(k.mean()),
            "proxy_kappa_dead_frac": float((self.kappa_raw.detach() < self.params.kappa_min).float().mean()),
        }

    # ---- checkpointed RNG state -----------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"subsample_rng": self._sub_generator.get_state()}
        if self._generator is not None:
            out["sampler_rng"] = self._generator.get_state()
        elif self._pending_rng is not None:
            out["sampler_rng"] = self._pending_rng["sampler_rng"]
        return out

    def load_extra_state(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"subsample_rng", "sampler_rng"}
        if unknown:
            raise ValueError(f"nivmf checkpoint has unknown extra state {sorted(unknown)}")
        if "subsample_rng" in state:
            self._sub_generator.set_state(state["subsample_rng"].cpu())
        if "sampler_rng" in state:
            if self._generator is None:
                self._pending_rng = {"sampler_rng": state["sampler_rng"]}
            else:
                self._restore_rng(state)

    def _restore_rng(self, state: dict[str, Any]) -> None:
        assert self._generator is not None
        self._generator.set_state(state["sampler_rng"].cpu())
