"""DiVA maths as pure functions (spec ``shared/specs/diva.md`` §1.2–1.5, §6.1).

Every function takes explicit tensors (and an explicit ``torch.Generator`` where it samples), so
each piece is unit-testable on hand-made inputs. Embeddings are rows of ``x[B, D]``; triplets
are ``LongTensor[T, 3]`` of row indices ``(anchor, positive, negative)``.

The numerics follow the reference code that produced the published numbers (margin loss with
an OR-count normaliser, distance-weighted miner without upper cutoff, DaNCE with global-max and
batch-axis normalisation by default), with the documented alternatives as options.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dmlbench.methods.devicemath import divide_by_count

SharedMode = Literal["random", "standard", "full"]
DanceVariant = Literal["original", "fixed"]
DanceWeightOn = Literal["logit", "exp"]

#: floor of ``1 - d^2/4`` in the log-weight (keeps d → 2 finite; identical to the reference
#: wherever the reference is finite)
_LOG_FLOOR = 1e-8


def _calc_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp16/bf16/fp32) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def log_distance_weight(d: Tensor, dim: int) -> Tensor:
    """Log of the inverse density of pairwise distances on the unit sphere ``S^{dim-1}``.

    ``ℓ(d) = (2 − D)·ln d − ((D − 3)/2)·ln(1 − d²/4)`` with ``1 − d²/4`` floored at 1e-8.

    Example:
        >>> round(float(log_distance_weight(torch.tensor(1.0), 3)), 6)   # (2-3)*ln 1 - 0 = 0
        0.0
        >>> round(float(log_distance_weight(torch.tensor(0.5), 4)), 4)   # -2 ln .5 - .5 ln(.9375)
        1.4186
    """
    return (2.0 - dim) * torch.log(d) - ((dim - 3.0) / 2.0) * torch.log(
        torch.clamp(1.0 - d.pow(2) / 4.0, min=_LOG_FLOOR)
    )


# ---- margin loss ---------------------------------------------------------------------------
def margin_loss(
    x: Tensor, y: Tensor, triplets: Tensor, beta: Tensor, margin: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Margin loss (Wu et al. 2017) with a learnable boundary β per anchor class.

    For each triplet ``(a, p, n)``: ``d = sqrt(||x_a − x_b||² + 1e-8)``, ``β_t = beta[y[a]]``,
    ``h+ = relu(d_ap − β_t + m)``, ``h− = relu(β_t − d_an + m)``; the loss is
    ``Σ (h+ + h−) / N`` with ``N`` the number of triplets with *any* active hinge (0 if N = 0).

    Args:
        x: embeddings ``[B, D]``.
        y: the TRUE class of each row ``[B]`` (indexes ``beta``, also for the shared task).
        triplets: ``[T, 3]`` row indices (anchor, positive, negative).
        beta: ``[C]`` per-class boundaries.
        margin: ``m``.

    Returns:
        ``(loss, {"n_active": N})``, ``N`` a 0-d tensor on the device (read it back only to log it).

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.5]])
        >>> loss, info = margin_loss(x, torch.tensor([0, 0, 1]), torch.tensor([[0, 1, 2]]),
        ...                          torch.tensor([1.2, 1.2]), 0.2)
        >>> # h+ = relu(1 - 1.2 + .2) = 0 (up to 1e-8); h- = relu(1.2 - .5 + .2) = 0.9
        >>> round(float(loss), 4), int(info["n_active"])
        (0.9, 1)
    """
    if triplets.numel() == 0:
        return x.sum() * 0.0 + beta.sum() * 0.0, {"n_active": torch.zeros((), dtype=torch.long, device=x.device)}
    a, p, n = triplets[:, 0], triplets[:, 1], triplets[:, 2]
    d_ap = torch.sqrt((x[a] - x[p]).pow(2).sum(-1) + 1e-8)
    d_an = torch.sqrt((x[a] - x[n]).pow(2).sum(-1) + 1e-8)
    b = beta[y[a]]
    pos = F.relu(d_ap - b + margin)
    neg = F.relu(b - d_an + margin)
    n_active = ((pos > 0) | (neg > 0)).sum()  # stays on the device: no host sync per step
    total = (pos + neg).sum()
    return divide_by_count(total, n_active.clamp(min=1)), {"n_active": n_active.detach()}


# ---- distance-weighted mining --------------------------------------------------------------
@torch.no_grad()
def distance_weighted_probs(x: Tensor, y: Tensor, lower: float = 0.5, upper: float | None = None,
                            check: bool = True) -> Tensor:
    """Negative-sampling probabilities ``q[B, B]`` of the distance-weighted miner (detached).

    ``d_ij = max(lower, ||x_i − x_j||)``, ``q_ij ∝ exp(ℓ(d_ij) − max_j ℓ)`` over the valid
    negatives ``y_j ≠ y_i`` (and ``d_ij ≤ upper`` when ``upper`` is given), zero elsewhere. The
    max is taken over valid entries only: after row normalisation this equals the reference's
    max over the whole row, without its underflow. Rows with no valid negative are all zero;
    every other row sums to 1. Non-finite probabilities raise FloatingPointError (``check=False``
    leaves that test to the caller: the samplers make it on their host copy, which costs no
    extra device sync).

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
        >>> q = distance_weighted_probs(x, torch.tensor([0, 1, 1]))
        >>> # D = 2: q ∝ sqrt(1 - d²/4): d01 = √2 -> √.5, d02 = 2 -> √1e-8 (floor)
        >>> [round(v, 5) for v in q[0].tolist()]
        [0.0, 0.99986, 0.00014]
    """
    dt = _calc_dtype(x)
    xf = x.detach().to(dt)
    dist = torch.cdist(xf, xf).clamp(min=lower)
    logw = log_distance_weight(dist, xf.shape[1])
    valid = y[:, None] != y[None, :]
    if upper is not None:
        valid &= dist <= upper
    logw = logw.masked_fill(~valid, float("-inf"))
    row_max = logw.max(dim=1, keepdim=True).values
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    q = torch.exp(logw - row_max)
    z = q.sum(dim=1, keepdim=True)
    q = torch.where(z > 0, q / z.clamp(min=torch.finfo(dt).tiny), torch.zeros_like(q))
    if check:
        _check_finite(q)
    return q


def _check_finite(q: Tensor) -> None:
    if not bool(torch.isfinite(q).all()):
        raise FloatingPointError("distance-weighted sampling probabilities are not finite")


def _labels_on_host(y: Tensor) -> Tensor:
    """``y`` on the CPU: itself when it is there (the trainer's host copy of the batch labels), else
    a read-back (a device sync)."""
    return y.detach() if y.device.type == "cpu" else y.detach().cpu()


def _probs_on_host(x: Tensor, y_host: Tensor, lower: float, upper: float | None = None) -> Tensor:
    """:func:`distance_weighted_probs` computed on ``x``'s device and copied to the host, checked
    there. The copy is the samplers' one host sync per call, and it is inherent: the triplets are
    drawn from these probabilities with the CPU generator (a device generator would change every
    seeded draw), and which rows are anchors depends on them."""
    q = distance_weighted_probs(x, y_host.to(x.device, non_blocking=True), lower, upper, check=False).cpu()
    _check_finite(q)
    return q


def _uniform_choice(mask: Tensor, generator: torch.Generator) -> Tensor:
    """One column per row of ``mask[R, B]`` (every row has a True), uniformly, on CPU."""
    w = mask.to(torch.float64)
    return torch.multinomial(w if w.device.type == "cpu" else w.cpu(), 1, generator=generator).squeeze(1)


def sample_distance_triplets(
    x: Tensor, y: Tensor, generator: torch.Generator, lower: float = 0.5, upper: float | None = None
) -> Tensor:
    """Distance-weighted triplets: one per anchor whose label occurs ≥ 2 times (and has a negative).

    Positive uniform among the anchor's other same-label rows; negative ``~ q_a``
    (:func:`distance_weighted_probs`). Sampling uses ``generator`` (a CPU generator). ``y`` may
    be on the host (no read-back then); the triplets are on ``x``'s device.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
        >>> t = sample_distance_triplets(x, torch.tensor([0, 0, 1, 2]), g)
        >>> t[:, 0].tolist(), t[:, 1].tolist()   # anchors 0 and 1 (label 0 twice), positives swap
        ([0, 1], [1, 0])
    """
    y_cpu = _labels_on_host(y)
    q = _probs_on_host(x, y_cpu, lower, upper)
    same = y_cpu[:, None] == y_cpu[None, :]
    pos_mask = same & ~torch.eye(len(y_cpu), dtype=torch.bool)
    anchors = torch.nonzero(pos_mask.any(1) & (q.sum(1) > 0)).squeeze(1)
    if anchors.numel() == 0:
        return torch.zeros((0, 3), dtype=torch.long, device=x.device)
    pos = _uniform_choice(pos_mask[anchors], generator)
    neg = torch.multinomial(q[anchors].to(torch.float64), 1, generator=generator).squeeze(1)
    return torch.stack([anchors, pos, neg], dim=1).to(x.device, non_blocking=True)


def sample_shared_triplets(
    x: Tensor,
    y: Tensor,
    generator: torch.Generator,
    mode: SharedMode = "random",
    lower: float = 0.5,
) -> Tensor:
    """Triplets for the class-shared task.

    * ``random`` (reference default): permute the label vector with ``generator``, then run
      :func:`sample_distance_triplets` on the permuted labels (positives are random pairs,
      negatives may share the true class).
    * ``standard``: every row is an anchor; negative distance-weighted among rows of another
      class; positive uniform among rows whose class differs from both anchor and negative.
    * ``full``: like ``standard`` but the positive is distance-weighted too (``q_a`` restricted
      to classes other than the anchor's and the negative's).

    Anchors without a valid negative or positive are skipped. ``y`` may be on the host (no
    read-back then); the triplets are on ``x``'s device.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
        >>> y = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> t = sample_shared_triplets(x, y, g, "standard")
        >>> bool(((y[t[:, 0]] != y[t[:, 1]]) & (y[t[:, 1]] != y[t[:, 2]]) & (y[t[:, 0]] != y[t[:, 2]])).all())
        True
    """
    if mode == "random":
        perm = torch.randperm(len(y), generator=generator)
        return sample_distance_triplets(x, _labels_on_host(y)[perm], generator, lower)
    if mode not in ("standard", "full"):
        raise ValueError(f"unknown shared mode {mode!r}; valid modes: random, standard, full")
    y_cpu = _labels_on_host(y)
    q = _probs_on_host(x, y_cpu, lower)
    anchors = torch.nonzero(q.sum(1) > 0).squeeze(1)
    if anchors.numel() == 0:
        return torch.zeros((0, 3), dtype=torch.long, device=x.device)
    neg = torch.multinomial(q[anchors].to(torch.float64), 1, generator=generator).squeeze(1)
    ok = (y_cpu[None, :] != y_cpu[anchors][:, None]) & (y_cpu[None, :] != y_cpu[neg][:, None])
    keep = ok.any(1)
    anchors, neg, ok = anchors[keep], neg[keep], ok[keep]
    if anchors.numel() == 0:
        return torch.zeros((0, 3), dtype=torch.long, device=x.device)
    if mode == "standard":
        pos = _uniform_choice(ok, generator)
    else:
        qp = q[anchors].to(torch.float64) * ok
        # a row whose valid positives all have zero weight (past a cutoff) falls back to uniform
        qp = torch.where(qp.sum(1, keepdim=True) > 0, qp, ok.to(torch.float64))
        pos = torch.multinomial(qp, 1, generator=generator).squeeze(1)
    return torch.stack([anchors, pos, neg], dim=1).to(x.device, non_blocking=True)


def sample_intra_triplets(y: Tensor, generator: torch.Generator, device: torch.device | None = None) -> Tensor:
    """Intra-class triplets (reference ``intra_random``): ``B`` draws, each of a class uniform
    over the classes present, then anchor, positive and negative uniformly WITH replacement
    from that class's rows (degenerate triplets a = p or a = n are intended). Drawn on the CPU
    from ``y`` (give host labels: no read-back), returned on ``device`` (default: ``y``'s).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.tensor([3, 3, 5, 5])
        >>> t = sample_intra_triplets(y, g)
        >>> t.shape, bool((y[t[:, 0]] == y[t[:, 1]]).all() and (y[t[:, 0]] == y[t[:, 2]]).all())
        (torch.Size([4, 3]), True)
    """
    y_cpu = _labels_on_host(y)
    classes = torch.unique(y_cpu)
    draws = classes[torch.randint(len(classes), (len(y_cpu),), generator=generator)]
    members = y_cpu[None, :] == draws[:, None]  # [B, B]
    w = members.to(torch.float64)
    cols = [torch.multinomial(w, 1, generator=generator).squeeze(1) for _ in range(3)]
    return torch.stack(cols, dim=1).to(y.device if device is None else device, non_blocking=True)


# ---- DaNCE -----------------------------------------------------------------------------------
@torch.no_grad()
def dance_weights(
    q: Tensor,
    queue: Tensor,
    lower: float = 0.5,
    upper: float = 1.4,
    variant: DanceVariant = "original",
) -> Tensor:
    """Distance-adapted weights ``w[B, K]`` of the DaNCE negatives (constants, no gradient).

    ``d = max(lower, sqrt(max(0, 2 − 2 q·M_j)))`` (unit-norm inputs), ``ℓ = ℓ(d)``;
    ``original``: ``w̃ = exp(ℓ − max over the whole matrix)``, zero past ``upper``, floored at
    1e-45, normalised over the batch axis (columns sum to 1); ``fixed``: row max and rows sum to 1.

    Example:
        >>> qq = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> w = dance_weights(qq, torch.tensor([[1.0, 0.0]]))   # d = [0.5, √2 > 1.4: cut to 1e-45]
        >>> w[:, 0].tolist()                                    # the column sums to 1
        [1.0, 1.401298464324817e-45]
    """
    dt = _calc_dtype(q)
    s = q.detach().to(dt) @ queue.detach().to(dt).T
    d = torch.sqrt(torch.clamp(2.0 - 2.0 * s, min=0.0)).clamp(min=lower)
    logw = log_distance_weight(d, q.shape[1])
    if variant == "original":
        w = torch.exp(logw - logw.max())
    elif variant == "fixed":
        w = torch.exp(logw - logw.max(dim=1, keepdim=True).values)
    else:
        raise ValueError(f"unknown DaNCE variant {variant!r}; valid variants: original, fixed")
    w = w.masked_fill(d > upper, 0.0).clamp(min=1e-45)
    axis = 0 if variant == "original" else 1
    return w / w.sum(dim=axis, keepdim=True)


def dance_loss(
    q: Tensor,
    k: Tensor,
    queue: Tensor,
    tau: float,
    variant: DanceVariant = "original",
    lower: float = 0.5,
    upper: float = 1.4,
    weight_on: DanceWeightOn = "logit",
) -> tuple[Tensor, dict[str, Tensor]]:
    """DaNCE: InfoNCE of queries against their keys and a queue, negatives distance-weighted.

    ``weight_on="logit"`` (reference): ``L = mean_i CE([s+_i, w_i1 s_i1, …, w_iK s_iK] / τ, 0)``;
    ``weight_on="exp"``: ``L = mean_i [log(e^{s+/τ} + Σ_j w_ij e^{s_ij/τ}) − s+/τ]``.
    Computed in float32 (float64 inputs stay float64); ``w`` from :func:`dance_weights`.

    Args:
        q: online queries ``[B, D]`` (unit norm).
        k: key embeddings of the other view ``[B, D]`` (unit norm, no grad needed).
        queue: past keys ``[K, D]`` (unit norm).
        tau: temperature.

    Returns:
        ``(loss, {"s_pos_mean", "n_cut"})`` as 0-d tensors on the device (logs, read back with the
        step logs); ``n_cut`` counts query–queue pairs past ``upper``.

    Example:
        >>> qq = torch.tensor([[1.0, 0.0]]); kk = torch.tensor([[1.0, 0.0]])
        >>> M = torch.tensor([[0.0, 1.0]])      # s = 0: loss = log(e^{1/τ} + e^0) - 1/τ
        >>> round(float(dance_loss(qq, kk, M, tau=1.0)[0]), 4)   # log(1 + e^-1)
        0.3133
    """
    dt = _calc_dtype(q)
    qf, kf, mf = q.to(dt), k.detach().to(dt), queue.detach().to(dt)
    s_pos = (qf * kf).sum(dim=1)
    s_neg = qf @ mf.T
    w = dance_weights(qf, mf, lower, upper, variant)
    if weight_on == "logit":
        logits = torch.cat([s_pos[:, None], w * s_neg], dim=1) / tau
    elif weight_on == "exp":
        logits = torch.cat([s_pos[:, None] / tau, s_neg / tau + torch.log(w)], dim=1)
    else:
        raise ValueError(f"unknown DaNCE weight placement {weight_on!r}; valid: logit, exp")
    target = torch.zeros(len(qf), dtype=torch.long, device=qf.device)
    loss = F.cross_entropy(logits, target)
    with torch.no_grad():
        d = torch.sqrt(torch.clamp(2.0 - 2.0 * s_neg, min=0.0))
        info = {"s_pos_mean": s_pos.mean(), "n_cut": (d.clamp(min=lower) > upper).sum().to(s_pos.dtype)}
    return loss, info


# ---- adversarial decorrelation ---------------------------------------------------------------
class _GradReverse(torch.autograd.Function):
    """Identity forward; gradient multiplied by ``−scale`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: Tensor, scale: float = 1.0) -> Tensor:
    """Gradient-reversal layer: returns ``x``; backward passes ``−scale · grad``.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> (3 * grad_reverse(x)).sum().backward()
        >>> x.grad.tolist()
        [-3.0, -3.0]
    """
    out: Tensor = _GradReverse.apply(x, scale)
    return out


def make_decorrelation_mlp(dim: int, hidden: int = 512) -> nn.Sequential:
    """The per-direction projection ``Linear(D→hidden) → ReLU → Linear(hidden→D)`` (torch init)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))


def decorrelation(z_src: Tensor, z_tgt: Tensor, mlp: nn.Module) -> Tensor:
    """Correlation ``c = mean_{b,d} (z_tgt[b,d] · normalize(mlp(z_src))[b,d])²``.

    A mean of squared element-wise products (not a squared cosine).

    Example:
        >>> z = torch.tensor([[1.0, 0.0]])
        >>> float(decorrelation(z, z, torch.nn.Identity()))   # ((1·1)² + 0²) / (1·2)
        0.5
    """
    r = F.normalize(mlp(z_src), dim=-1)
    return (z_tgt * r).pow(2).mean()


def adversarial_loss(
    heads: Mapping[str, Tensor],
    mlps: Mapping[str, nn.Module],
    directions: Sequence[tuple[str, str]],
    rho: Sequence[float],
) -> tuple[Tensor, dict[str, Tensor]]:
    """``L_adv = − Σ_k ρ_k · c_k`` with ``c_k = decorrelation(normalize(GRL(φ_src)), normalize(GRL(φ_tgt)), g_k)``.

    The MLPs ``g_k`` (keyed ``"src->tgt"``) descend ``L_adv`` (maximise correlation); through the
    gradient reversal the heads descend ``+Σ ρ c`` (minimise it).

    Returns:
        ``(L_adv, {"c/src->tgt": c_k})``, the ``c_k`` detached 0-d tensors on the device (logs).

    Example:
        >>> h = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[1.0, 0.0]])}
        >>> loss, logs = adversarial_loss(h, {"a->b": torch.nn.Identity()}, [("a", "b")], [2.0])
        >>> float(loss), float(logs["c/a->b"])
        (-1.0, 0.5)
    """
    if len(rho) != len(directions):
        raise ValueError(f"rho has {len(rho)} values but there are {len(directions)} directions")
    total: Tensor | None = None
    logs: dict[str, Tensor] = {}
    for (src, tgt), r in zip(directions, rho, strict=True):
        z_src = F.normalize(grad_reverse(heads[src]), dim=-1)
        z_tgt = F.normalize(grad_reverse(heads[tgt]), dim=-1)
        c = decorrelation(z_src, z_tgt, mlps[f"{src}->{tgt}"])
        logs[f"c/{src}->{tgt}"] = c.detach()
        term = -r * c
        total = term if total is None else total + term
    if total is None:
        total = sum((h.sum() * 0.0 for h in heads.values()), torch.zeros(()))
    return total, logs


# ---- momentum encoder, queue, aggregation -----------------------------------------------------
@torch.no_grad()
def ema_update_(target_params: Iterable[Tensor], online_params: Iterable[Tensor], m: float) -> None:
    """In place ``θ_t ← m·θ_t + (1 − m)·θ_o`` over matching parameter lists (buffers not touched).

    Example:
        >>> t, o = [torch.tensor([1.0])], [torch.tensor([3.0])]
        >>> ema_update_(t, o, 0.9); round(float(t[0]), 6)
        1.2
    """
    for t, o in zip(list(target_params), list(online_params), strict=True):
        t.mul_(m).add_(o.detach().to(t.dtype), alpha=1.0 - m)


class FifoQueue(nn.Module):
    """A first-in-first-out memory of ``K`` keys of dimension ``D`` (rows oldest → newest).

    Held as buffers (``keys``, ``filled``), so it is in the module's ``state_dict`` and moves with
    ``.to(device)``. ``push`` drops the oldest ``B`` rows and appends the new ones.

    Example:
        >>> fq = FifoQueue(4, 1)
        >>> fq.init(torch.arange(4.0)[:, None]); fq.push(torch.tensor([[9.0], [8.0]]))
        >>> fq.keys.squeeze(1).tolist()
        [2.0, 3.0, 9.0, 8.0]
    """

    keys: Tensor
    filled: Tensor

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be ≥ 1, got {size} × {dim}")
        self.size = size
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def init(self, keys: Tensor) -> None:
        """Fill the whole queue with ``keys[K, D]``."""
        if keys.shape != self.keys.shape:
            raise ValueError(f"queue init needs {tuple(self.keys.shape)} keys, got {tuple(keys.shape)}")
        self.keys.copy_(keys.detach())
        self.filled.fill_(True)

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        """Drop the oldest ``B`` rows, append ``keys[B, D]`` at the end (``B ≤ K``)."""
        b = keys.shape[0]
        if b > self.size:
            raise ValueError(f"cannot push {b} keys into a queue of {self.size}")
        self.keys.copy_(torch.cat([self.keys[b:], keys.detach().to(self.keys.dtype)], dim=0))


def weighted_concat(heads: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``normalize(cat_h(w_h · φ_h))`` over ``heads`` in their order (heads should be unit-norm).

    Example:
        >>> h = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[0.0, 1.0]])}
        >>> weighted_concat(h, {"a": 3.0, "b": 4.0}).tolist()
        [[0.6000000238418579, 0.0, 0.0, 0.800000011920929]]
    """
    missing = [k for k in heads if k not in weights]
    if missing:
        raise ValueError(f"no weight for heads {', '.join(missing)}")
    return F.normalize(torch.cat([weights[k] * v for k, v in heads.items()], dim=-1), dim=-1)
