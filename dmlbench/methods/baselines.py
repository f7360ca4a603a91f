"""Standard baselines on pytorch-metric-learning losses and miners.

Each is a registered method with its ``Params``, its own parameter groups (proxy / β learning
rates as multipliers of the base LR) and a search space ``search_spaces/<name>.yaml``. Losses are
computed in float32 on the raw embedding (PML's distances L2-normalise internally).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field
from pytorch_metric_learning import losses, miners
from torch import Tensor, nn

from dmlbench.config import TrialConfig
from dmlbench.methods.base import METHODS, Batch, LossOutput, Method, MethodParams


class _PMLMethod(Method):
    """Backbone + a PML loss (+ optional miner); loss parameters get ``loss_lr_mult × base_lr``."""

    has_loss_params: ClassVar[bool] = False

    def __init__(self, cfg: TrialConfig, backbone: nn.Module, num_classes: int):
        super().__init__(cfg, backbone, num_classes)
        self.criterion = self.make_loss(cfg.embedding_dim)
        self.miner = self.make_miner()

    def make_loss(self, dim: int) -> nn.Module:
        raise NotImplementedError

    def make_miner(self) -> nn.Module | None:
        return None

    def loss(self, batch: Batch) -> LossOutput:
        emb = self.backbone(batch.images).float()
        labels = batch.labels
        if self.miner is not None:
            tuples = self.miner(emb, labels)
            total = self.criterion(emb, labels, tuples)
            n = tuples[0].numel() if isinstance(tuples, tuple) else 0
            return LossOutput(total, {"mined": float(n)})
        return LossOutput(self.criterion(emb, labels))

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        net = [p for p in self.backbone.parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": net, "lr": base_lr, "name": "network"}]
        loss_params = [p for p in self.criterion.parameters() if p.requires_grad]
        if loss_params:
            mult = float(getattr(self.hparams, "loss_lr_mult", 1.0))
            groups.append({"params": loss_params, "lr": base_lr * mult, "weight_decay": 0.0, "name": "loss"})
        return groups

    def log_stats(self, batch: Batch) -> dict[str, float | Tensor]:
        return {}


class ProxyAnchorParams(MethodParams):
    margin: float = Field(default=0.1, ge=0, description="δ")
    alpha: float = Field(default=32.0, gt=0, description="scale α")
    loss_lr_mult: float = Field(default=100.0, gt=0, description="proxy LR = base LR × this")


@METHODS.register("proxyanchor")
class ProxyAnchor(_PMLMethod):
    """Proxy Anchor (Kim et al., CVPR 2020)."""

    name = "proxyanchor"
    Params = ProxyAnchorParams

    def make_loss(self, dim: int) -> nn.Module:
        p = self.hparams
        return losses.ProxyAnchorLoss(self.num_classes, dim, margin=p.margin, alpha=p.alpha)


class ProxyNCAParams(MethodParams):
    softmax_scale: float = Field(default=10.0, gt=0, description="1 / temperature")
    loss_lr_mult: float = Field(default=100.0, gt=0, description="proxy LR = base LR × this")


@METHODS.register("proxynca")
class ProxyNCA(_PMLMethod):
    """ProxyNCA (Movshovitz-Attias et al., ICCV 2017) with a softmax scale (ProxyNCA++ style)."""

    name = "proxynca"
    Params = ProxyNCAParams

    def make_loss(self, dim: int) -> nn.Module:
        return losses.ProxyNCALoss(self.num_classes, dim, softmax_scale=self.hparams.softmax_scale)


class MultiSimilarityParams(MethodParams):
    alpha: float = Field(default=2.0, gt=0)
    beta: float = Field(default=50.0, gt=0)
    base: float = Field(default=0.5, description="λ")
    miner_epsilon: float = Field(default=0.1, ge=0, description="MS pair-mining margin ε")


@METHODS.register("multisimilarity")
class MultiSimilarity(_PMLMethod):
    """Multi-Similarity loss with its pair miner (Wang et al., CVPR 2019)."""

    name = "multisimilarity"
    Params = MultiSimilarityParams

    def make_loss(self, dim: int) -> nn.Module:
        p = self.hparams
        return losses.MultiSimilarityLoss(alpha=p.alpha, beta=p.beta, base=p.base)

    def make_miner(self) -> nn.Module | None:
        return miners.MultiSimilarityMiner(epsilon=self.hparams.miner_epsilon)


class MarginParams(MethodParams):
    margin: float = Field(default=0.2, ge=0)
    beta_init: float = Field(default=1.2, gt=0, description="initial per-class β")
    loss_lr_mult: float = Field(default=50.0, gt=0, description="β LR = base LR × this")
    cutoff: float = Field(default=0.5, ge=0, description="distance-weighted sampling lower cutoff")
    nonzero_loss_cutoff: float = Field(default=1.4, gt=0)


@METHODS.register("margin")
class Margin(_PMLMethod):
    """Margin loss with learnable per-class β and distance-weighted sampling (Wu et al., ICCV 2017)."""

    name = "margin"
    Params = MarginParams

    def make_loss(self, dim: int) -> nn.Module:
        p = self.hparams
        return losses.MarginLoss(
            margin=p.margin, beta=p.beta_init, learn_beta=True, num_classes=self.num_classes
        )

    def make_miner(self) -> nn.Module | None:
        p = self.hparams
        return miners.DistanceWeightedMiner(cutoff=p.cutoff, nonzero_loss_cutoff=p.nonzero_loss_cutoff)


class TripletParams(MethodParams):
    margin: float = Field(default=0.2, gt=0)
    mining: Literal["semihard", "hard", "all"] = "semihard"


@METHODS.register("triplet")
class Triplet(_PMLMethod):
    """Triplet margin loss with semi-hard negative mining (Schroff et al., CVPR 2015)."""

    name = "triplet"
    Params = TripletParams

    def make_loss(self, dim: int) -> nn.Module:
        return losses.TripletMarginLoss(margin=self.hparams.margin)

    def make_miner(self) -> nn.Module | None:
        return miners.TripletMarginMiner(margin=self.hparams.margin, type_of_triplets=self.hparams.mining)
