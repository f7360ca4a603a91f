"""EL-nivMF loss maths: nivMF log-likelihood, MC expected-likelihood logits, CE and PA guidance.

Pure functions with explicit tensor inputs (spec ``shared/specs/nivmf.md`` §1.2–§1.4, §6).
Everything is vectorised as [B, S, D] × [C, D] → [B, S, C] (spec P6); the stretched form (B)
uses two matmuls instead of a [B, S, C, D] tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dmlbench.methods.nivmf.vmf import vmf_rsample, vmf_rsample_from_noise

LogCpFn = Callable[[Tensor], Tensor]


def nivmf_loglik(z: Tensor, proxy_v: Tensor, kappa_raw: Tensor, log_cp_fn: LogCpFn,
                 stretch: bool = False, kappa_min: float = 0.1) -> Tensor:
    """nivMF class log-likelihood ℓ_c(z) of unit vectors z (spec §1.2).

    With μ_c = v_c/‖v_c‖, K_c = diag(max(k_c, kappa_min)), m_c = K_c μ_c and r_c = ‖m_c‖:

    * form (A), ``stretch=False`` (the reference EL-nivMF code):
      ℓ_c(z) = log C_D(r_c) + r_c·cos(z, m_c) + Σ_d log K_c,dd − log r_c;
    * form (B), ``stretch=True`` (the paper's construction, the repo's point-nivMF ablation):
      r_c·cos(K_c z, m_c) instead, computed as ⟨z, K_c m_c⟩/‖K_c z‖ with
      ‖K_c z‖² = (z ⊙ z) @ (K_c²)ᵀ (two matmuls, no [B, S, C, D] tensor).

    Args:
        z: [..., D] samples (normalised here; any leading shape, typically [B, S, D]).
        proxy_v: [C, D] unnormalised proxy vectors (only their direction is used).
        kappa_raw: [C, D] raw per-dimension concentrations.
        log_cp_fn: ``r -> log C_D(r)`` on a [C] tensor.
        stretch: form (B) instead of form (A).
        kappa_min: floor of the concentrations (entries below get zero gradient, spec P4).

    Returns:
        [..., C] log-likelihoods.

    Example:
        K = a·I (every entry a ≥ kappa_min): m̂_c = μ_c, r_c = a and both forms give
        log C_D(a) + a·cos(z, μ_c) + (D − 1) log a; with log C ≡ 0, a = 2, D = 2, z = μ:

        >>> v = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
        >>> k = torch.full((1, 2), 2.0, dtype=torch.float64)
        >>> z = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
        >>> zero = lambda r: torch.zeros_like(r)
        >>> round(float(nivmf_loglik(z, v, k, zero)[0, 0]), 6), round(2 + math.log(2), 6)
        (2.693147, 2.693147)
    """
    z = F.normalize(z, dim=-1)
    mu = F.normalize(proxy_v, dim=-1)
    kap = torch.clamp(kappa_raw, min=kappa_min)
    m = kap * mu  # [C,D]
    r = m.norm(dim=-1)  # [C]
    det = torch.log(kap).sum(-1) - torch.log(r)  # [C]
    if stretch:
        num = z @ (kap * m).T  # ⟨K z, m⟩
        kz_norm = torch.sqrt(torch.clamp((z * z) @ (kap * kap).T, min=1e-30))
        sim = num / kz_norm
    else:
        sim = z @ m.T  # r·cos(z, m) for unit z
    return log_cp_fn(r) + sim + det


def elk_logits(loglik: Tensor, temp: Tensor | float) -> Tensor:
    """Monte-Carlo expected-likelihood logits: logsumexp_s(ℓ/T) − log S (spec §1.3).

    The temperature is applied inside the average, before the log-mean-exp.

    Args:
        loglik: [B, S, C] log-likelihoods of S samples per image.
        temp: temperature T > 0 (scalar tensor or float).

    Returns:
        [B, C] logits.

    Example:
        >>> ll = torch.tensor([[[0.0], [math.log(3.0)]]], dtype=torch.float64)  # S = 2, C = 1
        >>> float(elk_logits(ll, 1.0)[0, 0]) == math.log((1.0 + 3.0) / 2)
        True
    """
    s = loglik.shape[-2]
    return torch.logsumexp(loglik / temp, dim=-2) - math.log(s)


def proxy_nca_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """ProxyNCA++-style CE with the positive in the denominator: mean_i[−s_iy + logsumexp_c s_ic].

    Example:
        >>> round(float(proxy_nca_ce(torch.zeros(1, 4), torch.tensor([2]))), 6) == round(math.log(4), 6)
        True
    """
    return F.cross_entropy(logits, labels)


def proxy_anchor_guidance(x_norm: Tensor, proxy_dir: Tensor, labels: Tensor,
                          alpha: float = 32.0, delta: float = 0.1) -> Tensor:
    """ProxyAnchor guidance exactly as the reference ``oproxy`` (spec §1.4).

    * positives: P[i, j] = x̂_iᵀ μ_{y_j} masked to y_i = y_j; per batch column j
      log(1 + Σ_i exp(−α(P_ij − δ))), averaged over the B columns (a class drawn n times counts
      n times);
    * negatives: N[i, c] = x̂_iᵀ μ_c masked to y_i ≠ c; per proxy log(1 + Σ_i exp(α(N_ic + δ))),
      averaged over all C proxies (an empty column contributes 0).

    Args:
        x_norm: [B, D] unit embeddings.
        proxy_dir: [C, D] unit proxy directions.
        labels: [B] int labels in 0..C−1.
        alpha: scale α.
        delta: margin δ.

    Returns:
        0-d loss = positive term + negative term.

    Example:
        One image on its own proxy (cos 1), C = 1 (no negatives): log(1 + exp(−α(1 − δ))).

        >>> x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        >>> got = float(proxy_anchor_guidance(x, x, torch.tensor([0]), alpha=1.0, delta=0.1))
        >>> round(got, 9) == round(math.log1p(math.exp(-0.9)), 9)
        True
    """
    sims = x_norm @ proxy_dir.T  # [B,C]
    num_classes = proxy_dir.shape[0]
    lowest = torch.finfo(sims.dtype).min
    pos_sims = sims[:, labels]  # [B(i), B(j)] = x̂_i · μ_{y_j}
    pos_mask = labels.unsqueeze(1) == labels.unsqueeze(0)
    pos_in = torch.where(pos_mask, -alpha * (pos_sims - delta), torch.full_like(pos_sims, lowest))
    pos_in = torch.cat([pos_in, torch.zeros_like(pos_in[:1])], dim=0)
    pos = torch.logsumexp(pos_in, dim=0).mean()
    neg_mask = F.one_hot(labels, num_classes).to(torch.bool).logical_not()  # [B,C]
    neg_in = torch.where(neg_mask, alpha * (sims + delta), torch.full_like(sims, lowest))
    neg_in = torch.cat([neg_in, torch.zeros_like(neg_in[:1])], dim=0)
    neg = torch.logsumexp(neg_in, dim=0).mean()
    return pos + neg


def class_mean_directions(embeds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Per-class mean embedding, L2-normalised (the warm start of the proxies, spec §2.1).

    Args:
        embeds: [N, D] raw embeddings.
        labels: [N] labels in 0..num_classes−1; every class must occur.
        num_classes: C.

    Returns:
        [C, D] unit vectors.

    Example:
        >>> e = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, -1.0], [0.0, -3.0]])
        >>> class_mean_directions(e, torch.tensor([0, 0, 1, 1]), 2).tolist()
        [[0.7071067690849304, 0.7071067690849304], [0.0, -1.0]]
    """
    counts = torch.bincount(labels, minlength=num_classes)
    if counts.numel() > num_classes or bool((counts[:num_classes] == 0).any()):
        missing = (counts[:num_classes] == 0).nonzero().flatten().tolist()
        raise ValueError(f"labels must cover 0..{num_classes - 1} exactly; classes without images: {missing[:10]}")
    sums = torch.zeros(num_classes, embeds.shape[1], dtype=embeds.dtype, device=embeds.device)
    sums.index_add_(0, labels, embeds)
    return F.normalize(sums / counts.unsqueeze(1).to(embeds.dtype), dim=-1)


def subsample_classes(labels: Tensor, num_classes: int, fraction: float,
                      generator: torch.Generator | None = None,
                      host_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Keep every class of the batch plus a random ``fraction`` of the other classes.

    The negative-proxy subsampling of the reference (``--loss_proxyvmf_subsample_p``) for datasets
    with many classes. The number of kept negatives is round(fraction · #negatives), at least one
    when there are negatives.

    Args:
        labels: [B] batch labels.
        num_classes: C.
        fraction: in (0, 1]; 1 keeps every class.
        generator: random source on the CPU.
        host_labels: ``labels`` on the CPU when the caller has them (no device read-back then).

    Returns:
        (kept class ids [K] sorted, labels remapped to positions in the kept list [B]).

    Example:
        >>> keep, new = subsample_classes(torch.tensor([3, 1, 3]), 5, 1.0)
        >>> keep.tolist(), new.tolist()
        ([0, 1, 2, 3, 4], [3, 1, 3])
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"subsample fraction must be in (0, 1], got {fraction}")
    device = labels.device
    if fraction >= 1.0:
        return torch.arange(num_classes, device=device), labels
    # on the CPU (the generator is a CPU one); with host_labels nothing waits for the device
    lab = host_labels if host_labels is not None else labels.cpu()
    present = torch.zeros(num_classes, dtype=torch.bool)
    present[lab] = True
    negatives = (~present).nonzero().flatten()
    n_keep = min(len(negatives), max(1, round(fraction * len(negatives)))) if len(negatives) else 0
    perm = torch.randperm(len(negatives), generator=generator)[:n_keep]
    keep = torch.sort(torch.cat([present.nonzero().flatten(), negatives[perm]])).values
    position = torch.full((num_classes,), -1, dtype=torch.long)
    position[keep] = torch.arange(len(keep))
    return keep.to(device, non_blocking=True), position[lab].to(device, non_blocking=True)


@dataclass
class ELNivmfParts:
    """Named, detached parts of :func:`el_nivmf_loss` for logging."""

    el: Tensor
    pa: Tensor
    img_kappa_mean: Tensor
    img_kappa_min: Tensor
    img_kappa_max: Tensor
    proxy_r_mean: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.__dict__.items()}


def el_nivmf_loss(
    emb: Tensor,
    labels: Tensor,
    proxy_v: Tensor,
    kappa_raw: Tensor,
    temp: Tensor | float,
    log_cp_fn: LogCpFn,
    *,
    n_samples: int = 5,
    guidance_w: float = 0.0,
    noise: tuple[Tensor, Tensor] | None = None,
    generator: torch.Generator | None = None,
    stretch: bool = False,
    kappa_min: float = 0.1,
    alpha: float = 32.0,
    delta: float = 0.1,
    sampler_blend: bool = False,
    subsample: float = 1.0,
    subsample_generator: torch.Generator | None = None,
    host_labels: Tensor | None = None,
) -> tuple[Tensor, ELNivmfParts]:
    """The (PANC +) EL-nivMF objective: L = L_EL + guidance_w · L_PA (spec §1.4).

    The image is vMF(e/‖e‖, ‖e‖); S reparameterised samples per image (shared by all classes)
    give the MC-ELK logits of :func:`elk_logits` over :func:`nivmf_loglik`, and L_EL is their CE.
    L_PA is :func:`proxy_anchor_guidance` on the normalised embeddings and the same proxy
    directions (always computed, for logging; it only enters the total through ``guidance_w``).

    Args:
        emb: [B, D] raw embeddings (their norm is the image concentration).
        labels: [B] labels 0..C−1.
        proxy_v: [C, D] unnormalised proxy vectors.
        kappa_raw: [C, D] raw per-dimension proxy concentrations.
        temp: temperature T > 0.
        log_cp_fn: ``r -> log C_D(r)``.
        n_samples: S (ignored when ``noise`` is given).
        guidance_w: weight of the ProxyAnchor term.
        noise: recorded (e [B, S], v [B, S, D−1]) for :func:`vmf_rsample_from_noise`; None draws
            fresh noise with ``generator``.
        generator: random source of the sampler.
        stretch: form (B) of the log-likelihood.
        kappa_min: concentration floor.
        alpha, delta: ProxyAnchor scale and margin.
        sampler_blend: the reference code's (biased) blended Wood b.
        subsample: fraction of non-batch classes kept in the EL softmax (1 = all).
        subsample_generator: CPU random source for the subsampling.
        host_labels: ``labels`` on the CPU, if the caller has them (the subsampling runs there).

    Returns:
        (total loss, parts).
    """
    kappa_img = emb.norm(dim=-1)
    mu = emb / kappa_img.unsqueeze(-1)
    if noise is not None:
        z = vmf_rsample_from_noise(mu, kappa_img, noise[0], noise[1], sampler_blend)
    else:
        z = vmf_rsample(mu, kappa_img, n_samples, generator, sampler_blend)
    if subsample < 1.0:
        keep, el_labels = subsample_classes(labels, proxy_v.shape[0], subsample, subsample_generator, host_labels)
        pv, kr = proxy_v[keep], kappa_raw[keep]
    else:
        el_labels, pv, kr = labels, proxy_v, kappa_raw
    loglik = nivmf_loglik(z, pv, kr, log_cp_fn, stretch=stretch, kappa_min=kappa_min)
    el = proxy_nca_ce(elk_logits(loglik, temp), el_labels)
    pa = proxy_anchor_guidance(mu, F.normalize(proxy_v, dim=-1), labels, alpha, delta)
    total = el + guidance_w * pa if guidance_w > 0 else el
    with torch.no_grad():
        r = torch.clamp(kappa_raw, min=kappa_min).mul(F.normalize(proxy_v, dim=-1)).norm(dim=-1)
        parts = ELNivmfParts(
            el=el.detach(), pa=pa.detach(), img_kappa_mean=kappa_img.mean(), img_kappa_min=kappa_img.min(),
            img_kappa_max=kappa_img.max(), proxy_r_mean=r.mean(),
        )
    return total, parts
