"""CCP hyper-parameters (spec §3) and the per-dataset base-loss table (spec §3.2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dmlbench.methods.base import MethodParams
from dmlbench.methods.ccp.functional import BaseLoss

#: base-loss parameters of the supplement, per dataset (spec §3.2); "code" = released defaults
BASE_PARAMS: dict[str, dict[str, dict[str, float]]] = {
    "c1": {
        "cub200": {"margin": 0.5},
        "cars196": {"margin": 0.5},
        "inshop": {"margin": 0.5},
        "sop": {"margin": 0.5},
        "code": {"margin": 0.5},
    },
    "c2": {
        "cub200": {"pos_margin": 0.0, "neg_margin": 0.3841},
        "cars196": {"pos_margin": 0.2652, "neg_margin": 0.5409},
        "inshop": {"pos_margin": 0.2858, "neg_margin": 0.5130},
        "sop": {"pos_margin": 0.2858, "neg_margin": 0.5130},
        "code": {"pos_margin": 0.0, "neg_margin": 0.5},
    },
    "triplet": {
        "cub200": {"margin": 0.0961},
        "cars196": {"margin": 0.1190},
        "inshop": {"margin": 0.0451},
        "sop": {"margin": 0.0451},
        "code": {"margin": 0.05},
    },
    "ms": {
        "cub200": {"alpha": 2.0, "beta": 40.0, "base": 0.5},
        "cars196": {"alpha": 14.35, "beta": 75.83, "base": 0.66},
        "inshop": {"alpha": 8.49, "beta": 57.38, "base": 0.41},
        "sop": {"alpha": 2.0, "beta": 40.0, "base": 0.5},
        "code": {"alpha": 2.0, "beta": 50.0, "base": 0.5},
    },
}

#: Params field that overrides each base-loss parameter
_OVERRIDES: dict[str, dict[str, str]] = {
    "c1": {"margin": "margin"},
    "c2": {"pos_margin": "pos_margin", "neg_margin": "neg_margin"},
    "triplet": {"margin": "margin"},
    "ms": {"alpha": "ms_alpha", "beta": "ms_beta", "base": "ms_base"},
}


class CCPParams(MethodParams):
    """Hyper-parameters of CCP. Defaults are the reference code's CUB/Cars196 recipe (spec §3.1).

    Trial-level settings of the recipe (lr 1e-5, weight decay 1e-4 applied as coupled L2, Adam eps
    1e-7, clip-norm 10 then clip-value 10, ``bn_policy=frozen_all``) are ``TrialConfig`` fields; the
    search space's ``fixed:`` block sets them for sweeps (see ``docs/methods/ccp.md``).
    """

    base_loss: BaseLoss = Field(default="c2", description="pair loss made multi-proxy: c1, c2, ms, triplet")
    base_params: Literal["paper", "code_default"] = Field(
        default="paper",
        description="paper: per-dataset base-loss table of the supplement (code defaults for other datasets); "
        "code_default: the released configs' values on every dataset",
    )
    margin: float | None = Field(default=None, ge=0, description="c1/triplet margin override")
    pos_margin: float | None = Field(default=None, ge=0, description="c2 positive margin override")
    neg_margin: float | None = Field(default=None, ge=0, description="c2 negative margin override")
    ms_alpha: float | None = Field(default=None, gt=0, description="MS alpha override")
    ms_beta: float | None = Field(default=None, gt=0, description="MS beta override")
    ms_base: float | None = Field(default=None, description="MS base similarity override")

    proxies_per_class: int = Field(default=8, ge=1, description="P (SOP/In-shop recipe: 4)")
    pool_size: int | None = Field(
        default=None, ge=1, description="candidates per class b (default 12; SOP/In-shop recipe: 7)"
    )
    pool_ratio: float | None = Field(
        default=None,
        ge=1.0,
        description="b = max(1, round(pool_ratio * P)); alternative to pool_size for searches",
    )
    small_pool: Literal["error", "expand"] = Field(
        default="error",
        description="1 < b < P: 'error' (k-center cannot pick P of b candidates) or 'expand' "
        "(the reference code's rule: draw b*P candidates)",
    )
    lam: float = Field(default=2e-4, ge=0, description="proximal coefficient λ0 (λ = 0 in the first stage)")
    lam_decay: float = Field(default=1.0, gt=0, description="λ at the j-th projection = λ0 * decay^(j-1)")
    stage_patience: int = Field(default=3, ge=1, description="rounds without improvement that end a stage")
    stage_min_epochs: int = Field(default=1, ge=1, description="minimum rounds in a stage")
    stage_min_delta: float = Field(
        default=1e-5, ge=0, description="improvement threshold of the stage monitor"
    )
    monitor: str = Field(
        default="map_at_r", description="validation metric of the stage controller (maximised)"
    )
    monitor_lag: Literal[0, 1] = Field(default=0, description="1: reference code's one-round-late monitor")
    batch_term_weight: float = Field(default=0.1, ge=0, description="weight of the batch-vs-batch term")
    proxy_term_weight: float = Field(default=1.0, ge=0, description="weight of the sample-vs-proxy term")
    kcenter_normalized: bool = Field(default=False, description="k-center on L2-normalised embeddings")
    random_init: bool = Field(default=False, description="stage 1 keeps He-normal random proxies")
    iters_per_epoch: int | None = Field(
        default=25,
        ge=1,
        description="steps per validation round (25 CUB/Cars, 250 SOP/In-shop); the trial's iters_per_epoch "
        "wins when set; None: the trainer's default (one pass)",
    )
    adam_beta2: float = Field(default=0.999, gt=0, lt=1, description="Adam beta2 (supplement: 0.99)")

    @model_validator(mode="after")
    def _check_pool(self) -> CCPParams:
        if self.pool_size is not None and self.pool_ratio is not None:
            raise ValueError("set either pool_size or pool_ratio, not both")
        b, p = self.effective_pool_size, self.proxies_per_class
        if 1 < b < p and self.small_pool == "error":
            raise ValueError(
                f"more proxies per class (proxies_per_class={p}) than the candidate pool (pool_size={b}): "
                f"greedy k-center cannot pick {p} distinct candidates from {b}; set pool_size >= {p}, "
                "pool_size=1 (the first P draws become the proxies), or small_pool='expand' "
                f"(the reference code's rule: draw {b}*{p} candidates)"
            )
        return self

    @property
    def effective_pool_size(self) -> int:
        """Candidates per class ``b`` from ``pool_size``, ``pool_ratio`` or the default 12."""
        if self.pool_size is not None:
            return self.pool_size
        if self.pool_ratio is not None:
            return max(1, round(self.pool_ratio * self.proxies_per_class))
        return 12

    def resolved_base_params(self, dataset: str) -> tuple[dict[str, float], str]:
        """The base loss's parameters for ``dataset`` and where they came from.

        Returns:
            ``(params, source)`` with source ``paper:<dataset>``, ``code_default`` (asked for, or a
            dataset outside the supplement's table) plus ``+override`` when a field overrides one.

        Example:
            >>> CCPParams(base_loss="c2").resolved_base_params("cars196")
            ({'pos_margin': 0.2652, 'neg_margin': 0.5409}, 'paper:cars196')
            >>> CCPParams(base_loss="c2", neg_margin=0.4).resolved_base_params("digits")
            ({'pos_margin': 0.0, 'neg_margin': 0.4}, 'code_default+override')
        """
        table = BASE_PARAMS[self.base_loss]
        if self.base_params == "paper" and dataset in table:
            params, source = dict(table[dataset]), f"paper:{dataset}"
        else:
            params, source = dict(table["code"]), "code_default"
        for key, field in _OVERRIDES[self.base_loss].items():
            value = getattr(self, field)
            if value is not None:
                params[key] = float(value)
                source = source.split("+")[0] + "+override"
        return params, source
