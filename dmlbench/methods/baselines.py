"""Standard baselines on pytorch-metric-learning losses and miners.

Each is a registered method with its ``Params``, its own parameter groups (proxy / β learning
rates as multipliers of the base LR) and a search space ``search_spaces/<name>.yaml``. Losses are
computed in float32 on the raw embedding (PML's distances L2-normalise internally).

Host syncs per step (a read-back of a device value, which makes the CPU wait for the GPU): PML's
code tests values on the host in places that need not. The subclasses below give the same
numbers and gradients without them: :class:`DeviceDivisorReducer` (``DivisorReducer`` tests
``isnan(output)`` on every call, only needed for float16, and margin's shared divisor twice;
proxyanchor, margin) and
:class:`DeviceMultiSimilarityLoss` (an ``assert`` that no pair is both positive and negative,
true by construction). What is left is inherent: margin's ``if divisor != 0`` on its count of
active triplets decides whether β enters the autograd graph at all (a None gradient, which the
optimiser skips, vs a zero one, which Adam still steps), and PML's miners and losses whose
outputs have data-dependent sizes (index lists from ``torch.where`` and boolean masks):
ProxyAnchor's count of the batch's classes (``len(torch.where(...)[0])``: doing it on the device
would mean rewriting PML's loss, not subclassing it), multisimilarity's and triplet's miners, margin's distance-weighted miner (per-class loops, a
device ``multinomial``), triplet's threshold reducer and proxynca's ``exp[exp != 0]``; doing
those on the device would change the computation or the miner's random stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from pytorch_metric_learning import losses, miners, reducers
from torch import Tensor, nn

from dmlbench.config import TrialConfig
from dmlbench.methods.base import METHODS, Batch, LossOutput, Method, MethodParams


@dataclass(frozen=True)
class KnownDivisor:
    """A tensor divisor whose ``!= 0`` was read back once (:class:`DeviceMarginLoss`), for
    :class:`DeviceDivisorReducer`: every sub-loss sharing it reuses that answer."""

    value: Tensor
    nonzero: bool


class DeviceDivisorReducer(reducers.DivisorReducer):
    """PML's ``DivisorReducer`` without its ``isnan(output)`` read-back, which only matters for
    float16 losses (those still take PML's path, as they would). ``divisor != 0`` stays a host
    test: for a Python number (proxyanchor) it costs nothing; for a tensor (margin's count of
    active triplets) it is a read-back, kept because the branch decides which tensors are in the
    autograd graph (see the module docstring), and made once per step (:class:`KnownDivisor`)."""

    def sum_and_divide(self, losses: Tensor, embeddings: Tensor, divisor: Any) -> Tensor:
        known = isinstance(divisor, KnownDivisor)
        if losses.dtype == torch.float16:
            return super().sum_and_divide(losses, embeddings, divisor.value if known else divisor)  # type: ignore[no-any-return]
        if divisor.nonzero if known else divisor != 0:
            return torch.sum(losses) / (divisor.value if known else divisor)
        return self.zero_loss(embeddings)  # type: ignore[no-any-return]


class DeviceMarginLoss(losses.MarginLoss):
    """PML's ``MarginLoss`` whose reducer reads its count of active triplets back once per step
    (PML's: twice, for the margin term and for β's term, which share it)."""

    def get_default_reducer(self) -> reducers.BaseReducer:
        return DeviceDivisorReducer()

    def compute_loss(self, *args: Any) -> dict[str, Any]:
        out: dict[str, Any] = super().compute_loss(*args)
        divisor = out["margin_loss"].get("divisor")
        if isinstance(divisor, Tensor):
            known = KnownDivisor(divisor, bool(divisor != 0))  # the read-back (see DeviceDivisorReducer)
            for term in out.values():
                if term.get("divisor") is divisor:
                    term["divisor"] = known
        return out


class DeviceMultiSimilarityLoss(losses.MultiSimilarityLoss):
    """PML's ``MultiSimilarityLoss`` without the per-step ``assert not torch.any(pos & neg)`` (a
    host read): pairs from the miner, or from the labels, are positive or negative by construction."""

    @staticmethod
    def _assert_either_pos_or_neg(pos_mask: Tensor, neg_mask: Tensor) -> None:
        return None


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
        return losses.ProxyAnchorLoss(self.num_classes, dim, margin=p.margin, alpha=p.alpha,
                                      reducer=DeviceDivisorReducer())


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
        return DeviceMultiSimilarityLoss(alpha=p.alpha, beta=p.beta, base=p.base)

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
        return DeviceMarginLoss(margin=p.margin, beta=p.beta_init, learn_beta=True, num_classes=self.num_classes)

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
