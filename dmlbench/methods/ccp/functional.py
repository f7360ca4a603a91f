"""CCP maths as pure functions (spec ``shared/specs/ccp.md`` §1 and §6.1).

Every function takes explicit tensors and returns tensors; nothing here knows about modules,
optimisers or the trainer. The :class:`~dmlbench.methods.ccp.method.CCP` class only wires them.

Conventions:
    * proxies are stored as a ``(P, C, D)`` tensor; flattened row-major, row ``k * C + c`` is proxy
      ``k`` of class ``c`` (so the class of row ``r`` is ``r % C``);
    * embeddings and proxies are *unit-ball projected* (``v / max(1, ||v||)``) inside every loss,
      never L2-normalised;
    * losses use the exact reductions of the reference code (see each docstring).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from dmlbench.methods.base import LossOutput

BaseLoss = Literal["c1", "c2", "ms", "triplet"]
BASE_LOSSES: tuple[str, ...] = ("c1", "c2", "ms", "triplet")

#: active-count guard of the reference reductions (C2, triplet)
_COUNT_EPS = 1e-16


# ---- geometry ------------------------------------------------------------------------------
def unit_ball(x: Tensor) -> Tensor:
    """Project each row onto the unit ball: ``x / max(1, ||x||_2)``.

    Identity inside the ball, radial projection outside (not L2 normalisation).

    Example:
        >>> unit_ball(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp_min(1.0)


def proxy_class_ids(num_classes: int, per_class: int) -> Tensor:
    """Class of every flattened proxy row: row ``r`` belongs to class ``r % C``.

    Example:
        >>> proxy_class_ids(3, 2)
        tensor([0, 1, 2, 0, 1, 2])
    """
    return torch.arange(num_classes * per_class) % num_classes


def pair_masks(y_rows: Tensor, y_cols: Tensor, exclude_diagonal: bool) -> tuple[Tensor, Tensor]:
    """Positive and negative pair masks between row labels and column labels.

    Args:
        y_rows: ``[N]`` labels of the anchors (batch samples).
        y_cols: ``[M]`` labels of the columns (batch samples or proxy classes).
        exclude_diagonal: batch-vs-batch term: ``(i, i)`` is neither positive nor negative.

    Returns:
        ``(pos, neg)`` boolean ``[N, M]`` masks.

    Example:
        >>> pos, neg = pair_masks(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), True)
        >>> pos.int().tolist(), neg.int().tolist()
        ([[0, 1, 0], [1, 0, 0], [0, 0, 0]], [[0, 0, 1], [0, 0, 1], [1, 1, 0]])
    """
    same = y_rows[:, None] == y_cols[None, :]
    neg = ~same
    if exclude_diagonal:
        if y_rows.shape[0] != y_cols.shape[0]:
            raise ValueError("exclude_diagonal needs as many rows as columns")
        eye = torch.eye(y_rows.shape[0], dtype=torch.bool, device=y_rows.device)
        same = same & ~eye
    return same, neg


def euclid(a: Tensor, b: Tensor, diag_safe: bool = False, eps: float = 1e-12) -> Tensor:
    """Euclidean (not squared) distances ``||a_i - b_j||`` with finite gradients everywhere.

    Squared distances come from the expansion ``|a|² + |b|² − 2 a·b`` (memory ``N × M``), clamped at
    ``eps`` before the square root so a zero distance has a zero (not infinite) gradient. With
    ``diag_safe`` (``a`` and ``b`` are the same batch) the diagonal is set to 1 before the root and to
    exactly 0 after it, so it carries no gradient at all.

    Example:
        >>> euclid(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [3.0, 4.0]]), True)
        tensor([[0., 5.],
                [5., 0.]])
    """
    sq = (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2.0 * (a @ b.T)
    sq = sq.clamp_min(0.0)
    if diag_safe:
        if a.shape[0] != b.shape[0]:
            raise ValueError("diag_safe needs as many rows as columns")
        eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
        return sq.masked_fill(eye, 1.0).clamp_min(eps).sqrt().masked_fill(eye, 0.0)
    return sq.clamp_min(eps).sqrt()


# ---- base losses ---------------------------------------------------------------------------
def contrastive_c2(
    d: Tensor, pos: Tensor, neg: Tensor, m_pos: float, m_neg: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """C2 contrastive loss on Euclidean distances (plain hinge, not squared).

    ``L = Σ_{pos, d>m+} (d − m+) / (#active_pos + 1e-16) + Σ_{neg, d<m−} (m− − d) / (#active_neg + 1e-16)``

    Example:
        >>> d = torch.tensor([[0.0, 0.5, 0.2]])
        >>> pos, neg = torch.tensor([[False, True, False]]), torch.tensor([[False, False, True]])
        >>> loss, info = contrastive_c2(d, pos, neg, m_pos=0.1, m_neg=0.3)
        >>> round(float(loss), 4), int(info["n_active_pos"]), int(info["n_active_neg"])
        (0.5, 1, 1)
    """
    act_pos = pos & (d > m_pos)
    act_neg = neg & (d < m_neg)
    n_pos = act_pos.sum()
    n_neg = act_neg.sum()
    zero = d.new_zeros(())
    l_pos = torch.where(act_pos, d - m_pos, zero).sum() / (n_pos + _COUNT_EPS)
    l_neg = torch.where(act_neg, m_neg - d, zero).sum() / (n_neg + _COUNT_EPS)
    return l_pos + l_neg, {"n_active_pos": n_pos.detach(), "n_active_neg": n_neg.detach()}


def contrastive_c1(s: Tensor, pos: Tensor, neg: Tensor, m: float) -> Tensor:
    """C1 ("original") contrastive loss on similarities, XBM style.

    ``L = [Σ_pos relu(1 − s − 1e-5) + Σ_neg relu(s − m)] / N_rows``

    Example:
        >>> s = torch.tensor([[1.0, 0.6, 0.8], [0.6, 1.0, 0.1]])
        >>> pos = torch.tensor([[False, True, False], [True, False, False]])
        >>> neg = torch.tensor([[False, False, True], [False, False, True]])
        >>> round(float(contrastive_c1(s, pos, neg, m=0.5)), 5)  # (0.39999 * 2 + 0.3) / 2
        0.54999
    """
    zero = s.new_zeros(())
    l_pos = torch.where(pos, torch.relu(1.0 - s - 1e-5), zero).sum()
    l_neg = torch.where(neg, torch.relu(s - m), zero).sum()
    return (l_pos + l_neg) / s.shape[0]


def _log1p_sum_exp(x: Tensor, mask: Tensor) -> Tensor:
    """Row-wise ``log(1 + Σ_{mask} exp(x))`` as ``logsumexp([0, x_masked])`` (overflow-safe)."""
    masked = torch.where(mask, x, torch.full_like(x, -math.inf))
    return torch.logsumexp(torch.cat([x.new_zeros(x.shape[0], 1), masked], dim=1), dim=1)


def multi_similarity(s: Tensor, pos: Tensor, neg: Tensor, alpha: float, beta: float, base: float) -> Tensor:
    """Multi-similarity loss without pair mining, mean over anchor rows.

    ``l_i = (1/α) log(1 + Σ_pos exp(−α (s − λ))) + (1/β) log(1 + Σ_neg exp(β (s − λ)))``; a row
    without positives contributes only its negative part.

    Example:
        >>> s = torch.tensor([[0.5, 0.5]])
        >>> pos, neg = torch.tensor([[True, False]]), torch.tensor([[False, True]])
        >>> round(float(multi_similarity(s, pos, neg, 2.0, 40.0, 0.5)), 4)  # ln2/2 + ln2/40
        0.3639
    """
    l_pos = _log1p_sum_exp(-alpha * (s - base), pos) / alpha
    l_neg = _log1p_sum_exp(beta * (s - base), neg) / beta
    return (l_pos + l_neg).mean()


def triplet_all(d: Tensor, pos: Tensor, neg: Tensor, m: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Triplet loss over all ``(i, p, n)`` of the same row, averaged over active triplets.

    ``t = d_ip − d_in + m``; ``L = Σ_{t>0} t / (#{t>0} + 1e-16)``.

    Computed without the ``N × M × M`` tensor: per row the negative distances are sorted once, so
    for each positive ``p`` the active negatives are those with ``d_in < d_ip + m`` (a prefix of the
    sorted row) and their sum is a prefix sum. Memory ``O(N × M)``.

    Example:
        >>> d = torch.tensor([[0.0, 0.3, 0.2, 0.6]])
        >>> pos = torch.tensor([[False, True, False, False]])
        >>> neg = torch.tensor([[False, False, True, True]])
        >>> loss, info = triplet_all(d, pos, neg, m=0.1)   # only (p=1, n=2): 0.3 - 0.2 + 0.1
        >>> round(float(loss), 5), int(info["n_active"])
        (0.2, 1)
    """
    n_rows = d.shape[0]
    neg_d = torch.where(neg, d, torch.full_like(d, math.inf))
    sorted_neg, _ = torch.sort(neg_d, dim=1)
    finite = torch.isfinite(sorted_neg)
    # prefix sums with a leading 0: prefix[:, k] = sum of the k smallest negative distances
    prefix = torch.cat([d.new_zeros(n_rows, 1), torch.where(finite, sorted_neg, 0.0).cumsum(dim=1)], dim=1)
    thresh = (d + m).contiguous()
    # number of negatives strictly below d_ip + m, i.e. active triplets (t > 0) for (i, p)
    k = torch.searchsorted(sorted_neg.detach().contiguous(), thresh.detach(), right=False)
    k = torch.where(pos, k, torch.zeros_like(k))
    sums = k.to(d.dtype) * thresh - prefix.gather(1, k)
    sums = torch.where(pos, sums, d.new_zeros(()))
    n_active = k.sum()
    return sums.sum() / (n_active + _COUNT_EPS), {"n_active": n_active.detach()}


def base_loss_value(
    base_loss: str, rows: Tensor, cols: Tensor, pos: Tensor, neg: Tensor, same_set: bool, **params: float
) -> Tensor:
    """One base loss between projected ``rows`` and ``cols`` with the given masks.

    ``params``: c1 ``margin``; c2 ``pos_margin``, ``neg_margin``; ms ``alpha``, ``beta``, ``base``;
    triplet ``margin``.
    """
    if base_loss in ("c1", "ms"):
        s = rows @ cols.T
        if base_loss == "c1":
            return contrastive_c1(s, pos, neg, params["margin"])
        return multi_similarity(s, pos, neg, params["alpha"], params["beta"], params["base"])
    d = euclid(rows, cols, diag_safe=same_set)
    if base_loss == "c2":
        return contrastive_c2(d, pos, neg, params["pos_margin"], params["neg_margin"])[0]
    if base_loss == "triplet":
        return triplet_all(d, pos, neg, params["margin"])[0]
    raise ValueError(f"unknown base loss {base_loss!r}; valid: {', '.join(BASE_LOSSES)}")


def ccp_loss(
    E: Tensor,
    y: Tensor,
    Q: Tensor,
    C: int,
    base_loss: str,
    w_batch: float,
    w_proxy: float,
    **base_params: float,
) -> LossOutput:
    """CCP per-step objective (spec §1.4): ``w_batch · L(Ê, Ê) + w_proxy · L(Ê, Q̂)``.

    Args:
        E: ``[N, D]`` raw batch embeddings; y: ``[N]`` labels in ``0..C-1``.
        Q: ``[P*C, D]`` raw proxies, row ``k*C + c`` of class ``c``.
        C: number of training classes.
        base_loss: ``c1``, ``c2``, ``ms`` or ``triplet``.
        w_batch, w_proxy: weights of the batch-pair and sample-vs-proxy terms (0.1 and 1.0).
        base_params: the base loss's parameters (see :func:`base_loss_value`).

    Returns:
        ``LossOutput(total, terms={"pair": batch term, "proxy": proxy term})`` (terms unweighted,
        detached). Computed in float32 (or the input's dtype if wider).

    Example:
        >>> E = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); y = torch.tensor([0, 1])
        >>> out = ccp_loss(E, y, E.clone(), 2, "c1", 0.1, 1.0, margin=0.5)
        >>> round(float(out.total), 5)   # positives at s=1 give relu(-1e-5)=0; negatives s=0 < 0.5
        0.0
    """
    dtype = torch.promote_types(E.dtype, torch.float32)
    e = unit_ball(E.to(dtype))
    q = unit_ball(Q.to(dtype))
    if Q.shape[0] % C:
        raise ValueError(f"Q has {Q.shape[0]} rows, not a multiple of C={C}")
    q_cls = proxy_class_ids(C, Q.shape[0] // C).to(y.device)
    pos, neg = pair_masks(y, q_cls, exclude_diagonal=False)
    proxy_term = base_loss_value(base_loss, e, q, pos, neg, False, **base_params)
    if w_batch != 0.0:
        pos_b, neg_b = pair_masks(y, y, exclude_diagonal=True)
        pair_term = base_loss_value(base_loss, e, e, pos_b, neg_b, True, **base_params)
    else:
        pair_term = e.new_zeros(())
    total = w_batch * pair_term + w_proxy * proxy_term
    return LossOutput(total, {"pair": pair_term.detach(), "proxy": proxy_term.detach()})


# ---- gradient transforms -------------------------------------------------------------------
@torch.no_grad()
def proximal_grad_(params: Sequence[Tensor], anchors: Sequence[Tensor], lam: float) -> None:
    """Add the proximal gradient ``λ (w − w_anchor)`` to each ``w.grad`` in place.

    Parameters without a gradient are skipped (as the reference's gradient transformers do).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True); w.grad = torch.zeros(2)
        >>> proximal_grad_([w], [torch.tensor([0.0, 4.0])], lam=0.5); w.grad
        tensor([ 0.5000, -1.0000])
    """
    if len(params) != len(anchors):
        raise ValueError(f"{len(params)} parameters but {len(anchors)} anchors")
    if lam == 0.0:
        return
    for p, a in zip(params, anchors):
        if p.grad is not None:
            p.grad.add_(p.detach() - a.to(p.device, p.dtype), alpha=lam)


@torch.no_grad()
def coupled_weight_decay_(params: Iterable[Tensor], wd: float) -> None:
    """Coupled L2 weight decay: ``w.grad += wd · w`` in place (before clipping and Adam).

    Example:
        >>> w = torch.tensor([1.0, -2.0], requires_grad=True); w.grad = torch.ones(2)
        >>> coupled_weight_decay_([w], 0.1); w.grad
        tensor([1.1000, 0.8000])
    """
    if wd == 0.0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.add_(p.detach(), alpha=wd)


# ---- proxy (re-)initialisation -------------------------------------------------------------
@torch.no_grad()
def greedy_kcenter(pool: Tensor, seeds: Tensor, k: int, normalized: bool = False) -> Tensor:
    """Greedy k-center on squared Euclidean distances, seeded (spec §1.5).

    ``m_j = min_s ||x_j − s||²``; repeat ``k`` times: pick ``j* = argmax m`` (first index on ties),
    then ``m_j = min(m_j, ||x_j − x_j*||²)``. A picked index is never picked again, even when every
    remaining distance is 0 (duplicate candidates), so the picks are distinct indices.

    Args:
        pool: ``[M, D]`` raw candidate embeddings (``M ≥ k``).
        seeds: ``[S, D]`` seed points (a zero vector at the start, the stage-best proxies later).
        k: number of points to pick.
        normalized: L2-normalise pool and seeds first (reference option, off by default).

    Returns:
        ``[k]`` indices into ``pool`` in pick order.

    Example:
        >>> pool = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [2.9, 0.1]])
        >>> greedy_kcenter(pool, torch.zeros(1, 2), 2).tolist()   # largest norm, then farthest from it
        [1, 2]
    """
    if pool.shape[0] < k:
        raise ValueError(f"k-center needs at least k={k} candidates, got {pool.shape[0]}")
    x = pool.double()
    s = seeds.double()
    if normalized:
        x = torch.nn.functional.normalize(x, dim=-1)
        s = torch.nn.functional.normalize(s, dim=-1)
    m = (
        (torch.cdist(x, s).pow(2)).min(dim=1).values
        if s.shape[0]
        else torch.full((x.shape[0],), math.inf, dtype=x.dtype, device=x.device)
    )
    picked = torch.zeros(x.shape[0], dtype=torch.bool)
    out = torch.empty(k, dtype=torch.long)
    for i in range(k):
        j = int(torch.argmax(torch.where(picked.to(m.device), -math.inf, m)))  # argmax: first max
        out[i] = j
        picked[j] = True
        m = torch.minimum(m, (x - x[j]).pow(2).sum(-1))
    return out


def pool_draws(per_class: int, pool_size: int) -> int:
    """Number of one-image-per-class draws for a candidate pool: ``b`` if ``b ≥ P`` else ``b·P``.

    Example:
        >>> pool_draws(8, 12), pool_draws(4, 2), pool_draws(4, 1)
        (12, 8, 4)
    """
    return pool_size if pool_size >= per_class else pool_size * per_class


def pool_layout(draws: Tensor, per_class: int, pool_size: int) -> Tensor:
    """Turn ``T`` draws of one embedding per class into per-class candidate pools.

    Args:
        draws: ``[T, C, D]`` with ``T = pool_draws(P, b)``.

    Returns:
        ``[C, T, D]``: row ``c`` is the candidate pool of class ``c`` (draw order kept).

    Example:
        >>> pool_layout(torch.arange(12.0).view(3, 2, 2), per_class=2, pool_size=3)[1].tolist()
        [[2.0, 3.0], [6.0, 7.0], [10.0, 11.0]]
    """
    expected = pool_draws(per_class, pool_size)
    if draws.dim() != 3 or draws.shape[0] != expected:
        raise ValueError(
            f"expected [{expected}, C, D] draws for P={per_class}, b={pool_size}, got {list(draws.shape)}"
        )
    return draws.transpose(0, 1)


def assemble_proxies(picks_per_class: Sequence[Tensor], C: int, P: int) -> Tensor:
    """Stack per-class picks (each ``[P, D]``) into the flat ``[P*C, D]`` layout, row ``k*C + c``.

    Example:
        >>> a = torch.tensor([[0.0], [1.0]]); b = torch.tensor([[10.0], [11.0]])
        >>> assemble_proxies([a, b], C=2, P=2).flatten().tolist()
        [0.0, 10.0, 1.0, 11.0]
    """
    if len(picks_per_class) != C or any(p.shape[0] != P for p in picks_per_class):
        raise ValueError(f"need {C} classes of {P} picks each")
    return torch.stack(list(picks_per_class), dim=1).reshape(P * C, -1)


@torch.no_grad()
def select_proxies(
    draws: Tensor, seeds: Tensor, per_class: int, pool_size: int, normalized: bool = False
) -> Tensor:
    """New proxies from pool draws: k-center per class, or the first ``P`` draws when ``b == 1``.

    Args:
        draws: ``[T, C, D]`` raw embeddings (``T = pool_draws(P, b)``).
        seeds: ``[S, C, D]`` per-class seeds (``S = 1`` zero vector at start, ``P`` best proxies later).

    Returns:
        ``[P, C, D]`` proxies (flatten row-major for the ``k*C + c`` layout).

    Example:
        >>> d = torch.tensor([[[1.0]], [[5.0]], [[2.0]]])          # T=3 draws, C=1, D=1
        >>> select_proxies(d, torch.zeros(1, 1, 1), 2, 3).flatten().tolist()  # 5: largest norm; 2: farthest from 5
        [5.0, 2.0]
    """
    pools = pool_layout(draws, per_class, pool_size)
    C, _, D = pools.shape
    if pool_size == 1:
        return draws[:per_class].clone()
    picks = []
    for c in range(C):
        idx = greedy_kcenter(pools[c], seeds[:, c, :], per_class, normalized=normalized)
        picks.append(pools[c][idx.to(pools.device)])
    return assemble_proxies(picks, C, per_class).view(per_class, C, D)


# ---- stage control -------------------------------------------------------------------------
@dataclass(frozen=True)
class StageEvent:
    """What the controller decided for one validation round."""

    snapshot: bool
    project: bool
    monitored: float


class StageController:
    """Stage state machine of CCP (spec §1.5); pure Python, no tensors.

    Each :meth:`step` takes this round's validation value (maximised). The stage's first round
    always snapshots (best is −inf); later rounds snapshot when the value beats the stage best by
    more than ``min_delta``. After ``patience`` rounds without improvement (and at least
    ``min_epochs`` rounds in the stage) it projects and starts a new stage (best ← −inf).
    With ``lag=1`` the decision uses the previous round's value (``v_{-1} = 0``), reproducing the
    reference code's callback order, while the caller still snapshots the current weights.

    Example:
        >>> sc = StageController(patience=2)
        >>> [(e.snapshot, e.project) for e in map(sc.step, [0.1, 0.2, 0.2, 0.2, 0.15])]
        [(True, False), (True, False), (False, False), (False, True), (True, False)]
    """

    def __init__(self, patience: int, min_epochs: int = 1, min_delta: float = 1e-5, lag: int = 0):
        if patience < 1 or min_epochs < 1 or min_delta < 0 or lag not in (0, 1):
            raise ValueError(
                "StageController needs patience >= 1, min_epochs >= 1, min_delta >= 0, lag in {0, 1}"
            )
        self.patience = patience
        self.min_epochs = min_epochs
        self.min_delta = min_delta
        self.lag = lag
        self.best = -math.inf
        self.wait = 0
        self.ep_in_stage = 0
        self.n_proj = 0
        self.prev_value = 0.0

    def step(self, value: float) -> StageEvent:
        monitored = value
        if self.lag:
            monitored, self.prev_value = self.prev_value, float(value)
        self.ep_in_stage += 1
        snapshot = self.best == -math.inf or monitored > self.best + self.min_delta
        if snapshot:
            self.best = monitored
            self.wait = 0
        else:
            self.wait += 1
        project = self.ep_in_stage >= self.min_epochs and self.wait >= self.patience
        if project:
            self.n_proj += 1
            self.best = -math.inf
            self.wait = 0
            self.ep_in_stage = 0
        return StageEvent(snapshot=snapshot, project=project, monitored=monitored)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "wait": self.wait,
            "ep_in_stage": self.ep_in_stage,
            "n_proj": self.n_proj,
            "prev_value": self.prev_value,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.wait = int(state["wait"])
        self.ep_in_stage = int(state["ep_in_stage"])
        self.n_proj = int(state["n_proj"])
        self.prev_value = float(state["prev_value"])


def lam_at(n_proj: int, lam0: float, decay: float) -> float:
    """λ after ``n_proj`` projections: 0 in stage 1, else ``λ₀ · decay^(n_proj − 1)``.

    Example:
        >>> lam_at(0, 2e-4, 0.5), lam_at(1, 2e-4, 0.5), lam_at(3, 2e-4, 0.5)
        (0.0, 0.0002, 5e-05)
    """
    return 0.0 if n_proj == 0 else lam0 * decay ** (n_proj - 1)
