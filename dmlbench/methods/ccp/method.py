"""The registered ``ccp`` method: wires the pure functions of :mod:`.functional` to the trainer.

What lives where (spec §6.2):
    * ``loss``: the multi-proxy objective (:func:`~.functional.ccp_loss`) on the raw head output;
    * ``on_after_backward``: proximal gradient λ(θ − θ_anchor) on the network, then coupled L2
      decay on every non-BN trainable tensor (proxies included); the trainer clips afterwards;
    * ``on_train_start``: proxies by greedy k-center on a pool of augmented training embeddings;
    * ``on_epoch_end``: stage control, stage-best snapshots, projection (anchor ← θ_best, λ, proxies
      re-initialised in place, Adam state kept);
    * ``extra_state``: anchors, snapshots, λ and the controller, so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from dmlbench.errors import ConfigError, DmlbenchError
from dmlbench.methods.base import METHODS, Batch, LossOutput, Method, MethodParams, Recipe, TrainContext
from dmlbench.methods.ccp.functional import (
    StageController,
    ccp_loss,
    coupled_weight_decay_,
    lam_at,
    pool_draws,
    proximal_grad_,
    select_proxies,
    unit_ball,
)
from dmlbench.methods.ccp.params import CCPParams

if TYPE_CHECKING:
    from dmlbench.config import TrialConfig

log = logging.getLogger(__name__)


@METHODS.register("ccp")
class CCP(Method):
    """Deep Metric Learning with Chance Constraints (Gurbuz et al., WACV 2024).

    ``embed(x) = unit_ball(head(trunk(x)))`` compared with Euclidean distance; the head is
    ``Linear(feat_dim → D, bias=False)`` with Xavier-uniform init; proxies are a ``(P, C, D)``
    parameter (row ``k*C + c`` once flattened).
    """

    name: ClassVar[str] = "ccp"
    Params: ClassVar[type[MethodParams]] = CCPParams
    eval_distance: ClassVar[str] = "euclidean"
    exclusive_params: ClassVar[tuple[tuple[str, ...], ...]] = (("pool_size", "pool_ratio"),)

    def __init__(self, cfg: TrialConfig, backbone: nn.Module, num_classes: int):
        super().__init__(cfg, backbone, num_classes)
        hp: CCPParams = self.hparams  # type: ignore[assignment]
        self.hp = hp
        if cfg.fold is None:
            raise ConfigError(
                "ccp's stages are driven by validation MAP@R, but fold=None trains without a validation fold; "
                "set fold to 0..num_folds-1 (the paper's final models are the 4 fold models, spec §4.1)."
            )
        feat_dim = getattr(backbone, "feat_dim", None)
        if not isinstance(feat_dim, int) or not hasattr(backbone, "head"):
            raise ConfigError(
                "ccp needs a dmlbench Backbone (with .feat_dim and .head) to install its bias-free head; "
                f"got {type(backbone).__name__}."
            )
        head = nn.Linear(feat_dim, cfg.embedding_dim, bias=False)
        nn.init.xavier_uniform_(head.weight)
        old = backbone.head
        if isinstance(old, nn.Module):
            head = head.to(next(old.parameters(), torch.empty(0)).device)
        backbone.head = head
        self.P = hp.proxies_per_class
        self.pool_size = hp.effective_pool_size
        self.proxies = nn.Parameter(
            torch.empty(self.P, num_classes, cfg.embedding_dim, device=head.weight.device)
        )
        # He-normal (std sqrt(2 / D)); only used as is with random_init, else overwritten by k-center
        nn.init.normal_(self.proxies, std=math.sqrt(2.0 / cfg.embedding_dim))
        self.base_kwargs, self.base_source = hp.resolved_base_params(cfg.dataset)
        self.controller = StageController(
            hp.stage_patience, hp.stage_min_epochs, hp.stage_min_delta, lag=int(hp.monitor_lag)
        )
        self.lam = 0.0
        self.initialised = False
        self.anchors: list[Tensor] | None = None
        self.best_net: list[Tensor] | None = None
        self.best_q: Tensor | None = None
        self._warned_small_classes = False

    # ---- parameter sets -------------------------------------------------------------------
    def network_named(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable network weights (backbone + head): the proximal set, in a fixed order."""
        return [(n, p) for n, p in self.backbone.named_parameters() if p.requires_grad]

    def decay_params(self) -> list[nn.Parameter]:
        """Trainable tensors that get coupled L2 decay: everything but BatchNorm, proxies included."""
        bn_ids = {
            id(p)
            for m in self.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)
        }
        return [p for p in self.parameters() if p.requires_grad and id(p) not in bn_ids]

    def flat_proxies(self) -> Tensor:
        """``[P*C, D]`` view of the proxies, row ``k*C + c``."""
        return self.proxies.reshape(self.P * self.num_classes, -1)

    # ---- contract -------------------------------------------------------------------------
    def loss(self, batch: Batch) -> LossOutput:
        emb = self.backbone(batch.images)
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return ccp_loss(
                emb.float(),
                batch.labels,
                self.flat_proxies().float(),
                self.num_classes,
                self.hp.base_loss,
                self.hp.batch_term_weight,
                self.hp.proxy_term_weight,
                **self.base_kwargs,
            )

    def embed(self, images: Tensor) -> Tensor:
        """``unit_ball(head(trunk(x)))`` in float32 (norms ≤ 1; compared with Euclidean distance)."""
        return unit_ball(self.backbone(images).float())

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """One group (network + proxies) at ``base_lr`` with optimiser weight decay 0.

        Decay is coupled L2 added in :meth:`on_after_backward` (before clipping), as in the
        reference; Adam/AdamW also get ``betas=(0.9, adam_beta2)``.
        """
        params = [p for _, p in self.network_named()] + [self.proxies]
        group: dict[str, Any] = {"params": params, "lr": base_lr, "weight_decay": 0.0, "name": "ccp"}
        if self.cfg.optimizer in ("adam", "adamw"):
            group["betas"] = (0.9, self.hp.adam_beta2)
        return [group]

    def iters_per_epoch(self) -> int | None:
        """Steps per validation round: the trial's ``iters_per_epoch`` when set, else the params' (25)."""
        return self.cfg.iters_per_epoch or self.hp.iters_per_epoch

    @classmethod
    def recommended(cls, dataset: str, embedded: bool) -> dict[str, Any]:
        """The reference recipe (spec §2-3) for the benchmarks; short stages for embedded data.

        Benchmarks: BN-Inception (ImageNet, all BN frozen) at 227 px with RandomResizedCrop scale
        (0.16, 1), Adam lr 1e-5, eps 1e-7, coupled decay 1e-4, clip-norm 10 then clip-value 10,
        128-d, 8 classes x 4 images, early stopping after 60 rounds (min delta 1e-5), up to 10000
        rounds; P/b = 8/12 with 25-step rounds (CUB, Cars196) or 4/7 with 250-step rounds (SOP,
        In-shop). Embedded data (tiny CNN from scratch): the dataset preset's optimiser settings,
        P = 2, b = 3 (pool_ratio 1.5), 10-step rounds and stage patience 2 so stages change within
        a one-minute run.
        """
        clip = {"grad_clip_norm": 10.0, "grad_clip_value": 10.0, "adam_eps": 1e-7}
        if embedded:
            return {
                **clip,
                "params": {
                    "proxies_per_class": 2,
                    "pool_ratio": 1.5,  # b = 3
                    "iters_per_epoch": 10,
                    "stage_patience": 2,
                },
            }
        large = dataset in ("sop", "inshop")
        params: dict[str, Any] = (
            # pool sizes as ratios (b = round(ratio * P): 7 and 12) so the search space's
            # pool_ratio can replace them
            {"proxies_per_class": 4, "pool_ratio": 1.75, "iters_per_epoch": 250}
            if large
            else {"proxies_per_class": 8, "pool_ratio": 1.5, "iters_per_epoch": 25}
        )
        return {
            **clip,
            "backbone": "bninception",
            "pretrained": True,
            "image_size": 227,
            "crop_scale": [0.16, 1.0],
            "optimizer": "adam",
            "lr": 1e-5,
            "weight_decay": 1e-4,
            "schedule": "constant",
            "bn_policy": "frozen_all",
            "embedding_dim": 128,
            "classes_per_batch": 8,
            "samples_per_class": 4,
            "iters_per_epoch": params["iters_per_epoch"],
            "epochs": 10000,
            "early_stop_metric": "map_at_r",
            "early_stop_patience": 60,
            "early_stop_min_delta": 1e-5,
            "params": params,
        }

    @classmethod
    def published_dims(cls, dataset: str) -> tuple[int, ...]:
        """128 per fold model; the tables' 512 is the concatenation of the 4 fold models (a row of
        its own in the final phase), not a model trained at 512."""
        return (128,)

    @classmethod
    def recipe(cls, dataset: str, dim: int, embedded: bool) -> Recipe | None:
        """The reference's MLRC recipe (spec §2-3): the paper trained 4 class-disjoint fold models,
        each early-stopped on its held-out fold, so ``fold_models`` is set."""
        settings = cls.recommended(dataset, embedded)
        settings["embedding_dim"] = dim
        notes = []
        if embedded:
            notes.append("no paper recipe for embedded data: the small-data settings")
        if dim != 128:
            notes.append(f"the paper's fold models are 128-d; {dim}-d fold models")
        source = ("yetigurbuz/ccp-dml@204b22c configs dml_small/dml_large + supplement Tables 1-3 (spec ccp.md §2-3)"
                  if not embedded else "dmlbench small-data settings")
        selection = ("validation: 4 class-disjoint fold models, each early-stopped on its held-out fold's MAP@R "
                     "(MLRC); 128D = mean over the fold models, 512D = their concatenated embedding")
        return Recipe(settings, source, selection, "; ".join(notes) or None, fold_models=True)

    @classmethod
    def grace_epochs(cls, cfg: TrialConfig) -> int:
        """Three stages' worth of rounds, ``3 x (stage_min_epochs + stage_patience)``: a stage cannot
        end earlier, and CCP's gains arrive after projections (spec §3.3)."""
        hp = CCPParams.model_validate(cfg.params)
        return 3 * (max(hp.stage_min_epochs, 1) + hp.stage_patience)

    # ---- hooks ----------------------------------------------------------------------------
    def on_after_backward(self, ctx: TrainContext) -> None:
        """Proximal gradient (network only, skipped while λ = 0), then coupled decay (``cfg.weight_decay``)."""
        if self.anchors is not None and self.lam > 0.0:
            proximal_grad_([p for _, p in self.network_named()], self.anchors, self.lam)
        coupled_weight_decay_(self.decay_params(), self.cfg.weight_decay)

    @torch.no_grad()
    def reinit_proxies(self, ctx: TrainContext, seeds: Tensor) -> None:
        """Overwrite the proxies in place by k-center on a fresh pool, ``seeds`` ``[S, C, D]``."""
        draws = ctx.embed_train_pool(pool_draws(self.P, self.pool_size))
        if draws.dim() != 3 or draws.shape[1] != self.num_classes:
            raise DmlbenchError(
                f"ccp expected pool draws of shape [T, {self.num_classes}, D], got {list(draws.shape)}."
            )
        new = select_proxies(
            draws.to(self.proxies.device, torch.float32),
            seeds.to(self.proxies.device, torch.float32),
            self.P,
            self.pool_size,
            normalized=self.hp.kcenter_normalized,
        )
        self.proxies.data.copy_(new)  # in place: the optimiser's state for the proxies is kept

    def _warn_if_pool_reuses_images(self, ctx: TrainContext) -> None:
        counts = getattr(ctx, "train_class_counts", None)
        if counts is None or self._warned_small_classes:
            return
        draws = pool_draws(self.P, self.pool_size)
        small = [int(c) for c in counts if int(c) < draws]
        if small:
            self._warned_small_classes = True
            log.warning(
                "ccp: the candidate pool takes %d draws per class but %d training classes have fewer images "
                "(smallest: %d); those classes reuse images under fresh augmentation.",
                draws,
                len(small),
                min(small),
            )

    @torch.no_grad()
    def on_train_start(self, ctx: TrainContext) -> None:
        """Initial proxies by k-center seeded with a zero vector (or random with ``random_init``).

        Skipped when the state was restored from a checkpoint (the proxies are already trained).
        """
        if self.initialised:
            return
        self._warn_if_pool_reuses_images(ctx)
        if not self.hp.random_init:
            zero = torch.zeros(1, self.num_classes, self.proxies.shape[-1])
            self.reinit_proxies(ctx, zero)
        self.lam = 0.0
        self.initialised = True

    @torch.no_grad()
    def on_epoch_end(self, ctx: TrainContext) -> dict[str, float]:
        """Stage control on this round's validation metric; snapshot and projection."""
        if ctx.epoch <= 0:  # the untrained network's score (eval_at_start) is not a training round
            return self._logs(projected=False)
        if self.hp.monitor not in ctx.val_metrics:
            raise ConfigError(
                f"ccp's stage monitor {self.hp.monitor!r} is not among the validation metrics "
                f"({', '.join(sorted(ctx.val_metrics)) or 'none'}); set params.monitor to one of them."
            )
        event = self.controller.step(float(ctx.val_metrics[self.hp.monitor]))
        if event.snapshot:
            self.best_net = [p.detach().clone() for _, p in self.network_named()]
            self.best_q = self.proxies.detach().clone()
        if event.project:
            assert self.best_net is not None and self.best_q is not None  # the stage's first round snapshots
            self.anchors = self.best_net
            self.lam = lam_at(self.controller.n_proj, self.hp.lam, self.hp.lam_decay)
            self.reinit_proxies(ctx, self.best_q)
        return self._logs(projected=event.project)

    def _logs(self, projected: bool) -> dict[str, float]:
        return {
            "ccp/lambda": float(self.lam),
            "ccp/n_projections": float(self.controller.n_proj),
            "ccp/stage_epoch": float(self.controller.ep_in_stage),
            "ccp/projected": float(projected),
        }

    # ---- checkpoint -----------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """Anchors, stage-best snapshots, λ and controller counters (tensors and numbers only)."""
        state: dict[str, Any] = {
            "initialised": bool(self.initialised),
            "lam": float(self.lam),
            "controller": self.controller.state_dict(),
        }
        if self.anchors is not None:
            state["anchors"] = [t.detach().cpu() for t in self.anchors]
        if self.best_net is not None:
            state["best_net"] = [t.detach().cpu() for t in self.best_net]
        if self.best_q is not None:
            state["best_q"] = self.best_q.detach().cpu()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        device = self.proxies.device
        net = self.network_named()
        self.initialised = bool(state["initialised"])
        self.lam = float(state["lam"])
        self.controller.load_state_dict(state["controller"])

        def tensors(key: str) -> list[Tensor] | None:
            if key not in state:
                return None
            ts = list(state[key])
            if len(ts) != len(net) or any(t.shape != p.shape for t, (_, p) in zip(ts, net)):
                raise ValueError(f"ccp checkpoint {key!r} does not match this network's trainable weights")
            return [t.to(device) for t in ts]

        self.best_net = tensors("best_net")
        self.anchors = tensors("anchors")
        self.best_q = state["best_q"].to(device) if "best_q" in state else None
