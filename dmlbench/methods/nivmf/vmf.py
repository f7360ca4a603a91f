"""von Mises-Fisher maths: the reparameterised sampler and the log normaliser log C_D(κ).

Pure functions with explicit tensor inputs (spec ``shared/specs/nivmf.md`` §1.5, §1.6).

* :func:`wood_b`, :func:`vmf_rsample_from_noise`, :func:`vmf_rsample`: Wood (1994) rejection
  sampling of the first coordinate plus a Householder reflection, as in the official code
  (``utilities/vmf_sampler.py``, adapted there from s-vae-pytorch). Gradients flow to the mean
  direction through the reflection and to κ through b(κ) with the accepted noise held fixed
  (no rejection-correction term, as in the reference).
* :func:`log_cp`: log C_D(κ) = (D/2 − 1) log κ − (D/2) log 2π − log I_{D/2−1}(κ), either the
  reference code's quadratic fit (``"code_poly"``, only fitted for D = 128 and D = 512) or the
  uniform asymptotic (Debye) expansion of the Bessel function (``"exact"``, D ≥ 8).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

LogCpMode = Literal["code_poly", "exact"]

#: smallest dimension for which the Debye expansion of log C_D is accurate to < 3e-4 nats
EXACT_MIN_DIM = 8
#: dimensions for which the reference code's polynomial was fitted
CODE_POLY_DIMS = (128, 512)
#: the rejection loop gives up after this many rounds (acceptance is > 50 % per round)
MAX_REJECTION_ROUNDS = 1000


def wood_b(kappa: Tensor, dim: int, blend: bool = False) -> Tensor:
    """The b parameter of Wood's proposal.

    b_true = (−2κ + √(4κ² + (D−1)²))/(D−1), computed as (D−1)/(2κ + √(4κ²+(D−1)²)) (the same
    number without cancellation, so it is accurate for every κ in float32 too).

    With ``blend=True`` this is the reference sampler's b (s-vae-pytorch): b_app = (D−1)/(4κ) and
    b = s·b_app + (1−s)·b_true with s = clamp(κ − 10, 0, 1), i.e. only the Taylor form above
    κ = 11. The rejection test's a and d are those of b_true, so with the blend the sampler is
    **biased** wherever b_app ≠ b_true, i.e. for 10 < κ ≲ a few × D (D = 128, κ = 12: mean
    resultant length −0.45 instead of A_D(κ) = 0.093; see tests/test_nivmf_vmf.py).

    Args:
        kappa: concentrations, any shape, > 0.
        dim: ambient dimension D (samples live on S^{D−1}), ≥ 2.
        blend: reproduce the reference code's b (biased) instead of the exact one.

    Returns:
        b with the shape of ``kappa``.

    Example:
        >>> round(float(wood_b(torch.tensor([1.0], dtype=torch.float64), 3)[0]), 6)  # (√8 − 2)/2
        0.414214
        >>> k = torch.tensor([20.0], dtype=torch.float64)  # D = 128: b_true 0.7335, b_app 1.5875
        >>> round(float(wood_b(k, 128)[0]), 4), round(float(wood_b(k, 128, blend=True)[0]), 4)
        (0.7335, 1.5875)
    """
    m1 = float(dim - 1)
    c = torch.sqrt(4.0 * kappa * kappa + m1 * m1)
    b_true = m1 / (2.0 * kappa + c)
    if not blend:
        return b_true
    # b_app only matters where s > 0 (κ > 10); clamping keeps it (and its gradient) finite at κ → 0.
    b_app = m1 / (4.0 * torch.clamp(kappa, min=10.0))
    s = torch.clamp(kappa - 10.0, 0.0, 1.0)
    return b_app * s + b_true * (1.0 - s)


def _wood_a_d(kappa: Tensor, b: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    m1 = float(dim - 1)
    c = torch.sqrt(4.0 * kappa * kappa + m1 * m1)
    a = (m1 + 2.0 * kappa + c) / 4.0
    d = 4.0 * a * b / (1.0 + b) - m1 * math.log(m1)
    return a, d


def vmf_rsample_from_noise(mu: Tensor, kappa: Tensor, e: Tensor, v: Tensor, blend: bool = False) -> Tensor:
    """vMF samples from recorded noise, differentiable in ``mu`` and ``kappa``.

    x = [w, √max(1 − w², 1e−7) · v] with w = (1 − (1+b)e)/(1 − (1−b)e), b = :func:`wood_b`,
    then the Householder reflection that maps e₁ to μ: u = (e₁ − μ)/max(‖e₁ − μ‖, 1e−7),
    z = x − 2⟨x, u⟩u.

    Args:
        mu: [B, D] unit mean directions.
        kappa: [B] concentrations (> 0).
        e: [B, S] accepted Beta((D−1)/2, (D−1)/2) draws of the rejection loop.
        v: [B, S, D−1] unit tangent directions.
        blend: use the reference code's blended b (see :func:`wood_b`); must match the noise.

    Returns:
        z: [B, S, D] unit vectors.

    Example:
        With e = ½ the first coordinate is w = (1 − b)/(1 + b), and the reflection puts it on μ
        (D = 3, κ = 1: b = √2 − 1, so ⟨z, μ⟩ = √2 − 1):

        >>> mu = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
        >>> z = vmf_rsample_from_noise(mu, torch.tensor([1.0], dtype=torch.float64),
        ...                            torch.tensor([[0.5]], dtype=torch.float64),
        ...                            torch.tensor([[[1.0, 0.0]]], dtype=torch.float64))
        >>> round(float(z[0, 0] @ mu[0]), 6), round(float(z[0, 0].norm()), 6)
        (0.414214, 1.0)
    """
    dim = mu.shape[-1]
    b = wood_b(kappa, dim, blend).unsqueeze(-1).to(e.dtype)  # [B,1]
    w = (1.0 - (1.0 + b) * e) / (1.0 - (1.0 - b) * e)  # [B,S]
    w = w.to(mu.dtype)
    radial = torch.sqrt(torch.clamp(1.0 - w * w, min=1e-7)).unsqueeze(-1)  # [B,S,1]
    x = torch.cat([w.unsqueeze(-1), radial * v.to(mu.dtype)], dim=-1)  # [B,S,D]
    e1 = torch.zeros_like(mu)
    e1[:, 0] = 1.0
    diff = e1 - mu
    u = diff / torch.clamp(diff.norm(dim=-1, keepdim=True), min=1e-7)  # [B,D]
    u = u.unsqueeze(1)  # [B,1,D]
    return x - 2.0 * (x * u).sum(-1, keepdim=True) * u


def _beta_symmetric(half_df: int, shape: tuple[int, ...], generator: torch.Generator | None,
                    device: torch.device) -> Tensor:
    """Beta((k)/2, (k)/2) draws in float64 as χ²_k/(χ²_k + χ²_k'), k = ``half_df``.

    Uses only ``torch.randn`` so that an explicit generator drives it (``torch.distributions.Beta``
    cannot take one). Exact: χ²_k/2 ~ Gamma(k/2, 1) and G₁/(G₁+G₂) ~ Beta.
    """
    g = torch.randn((2, *shape, half_df), generator=generator, device=device, dtype=torch.float64)
    chi = (g * g).sum(-1)
    return chi[0] / (chi[0] + chi[1])


@torch.no_grad()
def vmf_draw_noise(kappa: Tensor, dim: int, n_samples: int, generator: torch.Generator | None = None,
                   blend: bool = False) -> tuple[Tensor, Tensor]:
    """Run Wood's rejection loop: the noise (e, v) that :func:`vmf_rsample_from_noise` consumes.

    One candidate per (row, sample) per round; a candidate (e, u) is accepted when
    (D−1)·log t − t + d > log u with t = 2ab/(1 − (1−b)e). ``kappa`` is used without gradient.

    Args:
        kappa: [B] concentrations (> 0).
        dim: D.
        n_samples: S.
        generator: the random source (on ``kappa``'s device); None uses the global one.
        blend: the reference code's blended b (biased, see :func:`wood_b`).

    Returns:
        e: [B, S] float64, v: [B, S, D−1] unit vectors (float64).
    """
    if dim < 2:
        raise ValueError(f"the vMF sampler needs dim >= 2, got {dim}")
    device = kappa.device
    k = kappa.detach().to(torch.float64).reshape(-1, 1).expand(-1, n_samples)  # [B,S]
    b = wood_b(k, dim, blend)
    a, d = _wood_a_d(k, b, dim)
    m1 = float(dim - 1)
    e = torch.zeros_like(k)
    todo = torch.ones_like(k, dtype=torch.bool)
    rows, cols = k.shape
    # round 1 draws for every (row, sample), in nonzero's order, known without asking the device
    idx: tuple[Tensor, ...] = (torch.arange(rows, device=device).repeat_interleave(cols),
                               torch.arange(cols, device=device).repeat(rows))
    n_todo = rows * cols
    for round_ in range(MAX_REJECTION_ROUNDS):
        if round_:
            # The one host read-back of a later round (a device sync on CUDA): which candidates
            # were rejected, so how many to draw again (the last round finds none). It is
            # inherent: the number of draws shapes the random stream, so drawing a fixed number
            # would change every seeded sample. The rest of the round works on these indices
            # (gathers, writes; no boolean-mask indexing, which reads sizes back again).
            idx = todo.nonzero(as_tuple=True)
            n_todo = idx[0].numel()
        if n_todo == 0:
            break
        cand = _beta_symmetric(dim - 1, (n_todo,), generator, device)
        u = torch.rand((n_todo,), generator=generator, device=device, dtype=torch.float64)
        u = torch.clamp(u, 1e-20, 1.0 - 1e-20)
        bt, at, dt = b[idx], a[idx], d[idx]
        t = 2.0 * at * bt / (1.0 - (1.0 - bt) * cand)
        accept = (m1 * torch.log(t) - t + dt) > torch.log(u)
        e[idx] = torch.where(accept, cand, e[idx])
        todo[idx] = ~accept
    else:
        raise RuntimeError(f"vMF rejection sampling did not finish in {MAX_REJECTION_ROUNDS} rounds")
    n = torch.randn((*k.shape, dim), generator=generator, device=device, dtype=torch.float64)
    v = torch.nn.functional.normalize(n[..., 1:], dim=-1)
    return e, v


def vmf_rsample(mu: Tensor, kappa: Tensor, n_samples: int, generator: torch.Generator | None = None,
                blend: bool = False) -> Tensor:
    """Reparameterised vMF samples: :func:`vmf_draw_noise` then :func:`vmf_rsample_from_noise`.

    Args:
        mu: [B, D] unit mean directions.
        kappa: [B] concentrations (> 0).
        n_samples: S samples per row (shared by all classes downstream, spec P5).
        generator: explicit random source on ``mu``'s device (None: global RNG).
        blend: the reference code's blended b (biased for 10 < κ ≲ a few × D, see :func:`wood_b`).

    Returns:
        z: [B, S, D] unit vectors, differentiable in ``mu`` and ``kappa``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> mu = torch.nn.functional.normalize(torch.ones(2, 16), dim=-1)
        >>> z = vmf_rsample(mu, torch.tensor([1e4, 1e4]), 3, g)
        >>> z.shape, bool(((z @ mu[0]) > 0.99).all())
        (torch.Size([2, 3, 16]), True)
    """
    e, v = vmf_draw_noise(kappa, mu.shape[-1], n_samples, generator, blend)
    return vmf_rsample_from_noise(mu, kappa, e, v, blend)


# ---- log normaliser ---------------------------------------------------------------------------


def check_log_cp_dim(dim: int, mode: str) -> None:
    """Raise ValueError when ``mode`` is not safe for embedding dimension ``dim``."""
    if mode == "code_poly":
        if dim not in CODE_POLY_DIMS:
            raise ValueError(
                f"log_cp mode 'code_poly' is the reference code's fit for D = 128 or 512 only (off by "
                f"hundreds of nats elsewhere), got D = {dim}; use log_cp 'exact'"
            )
    elif mode == "exact":
        if dim < EXACT_MIN_DIM:
            raise ValueError(
                f"log_cp mode 'exact' uses a Debye expansion that needs D >= {EXACT_MIN_DIM}, got D = {dim}; "
                f"use an embedding_dim of at least {EXACT_MIN_DIM}"
            )
    else:
        raise ValueError(f"unknown log_cp mode {mode!r}; valid modes: code_poly, exact")


def log_cp_code_poly(kappa: Tensor, dim: int) -> Tensor:
    """The reference code's quadratic fit of log C_D(κ) (``approx_log_cp``, mode 'new').

    D = 128: 127 − 0.01909κ − 0.003355κ²; D = 512: 868 − 0.0002662κ − 0.0009685κ². Accurate to
    0.5 nats for κ ≲ 62 (D = 128) and κ ≲ 140 (D = 512) only.

    Example:
        >>> float(log_cp_code_poly(torch.tensor(10.0, dtype=torch.float64), 128))
        126.4736
    """
    check_log_cp_dim(dim, "code_poly")
    if dim == 128:
        return 127.0 - 0.01909 * kappa - 0.003355 * kappa * kappa
    return 868.0 - 0.0002662 * kappa - 0.0009685 * kappa * kappa


def log_cp_exact(kappa: Tensor, dim: int) -> Tensor:
    """log C_D(κ) through the uniform asymptotic (Debye) expansion of log I_ν(κ), ν = D/2 − 1.

    With z = κ/ν, q = √(1+z²), t = 1/q:
    log I_ν(κ) ≈ −½ log(2πν) + ν(q + log z − log(1+q)) − ½ log q + log(1 + u₁/ν + u₂/ν² + u₃/ν³).
    The ν log κ of log C_D cancels ν log z analytically, leaving
    log C_D(κ) = ν log ν − (D/2) log 2π + ½ log(2πν) − ν(q − log(1+q)) + ½ log q − log(1 + Σ uₖ/νᵏ),
    which is finite and smooth down to κ = 0 (where it is −log |S^{D−1}|) and needs no Bessel
    evaluation, so it neither underflows (scipy's ``ive(255, 0.1)`` is 0) nor overflows. Its
    autograd derivative is −I_{D/2}/I_{D/2−1}(κ). Max error against scipy's Bessel functions over
    κ ∈ [1e−3, 5000] (tests/test_nivmf_vmf.py): 2.3e−4 nats at D = 8, 8e−6 at D = 16, 4e−7 at
    D = 32, 1.3e−9 at D = 128, 5e−12 at D = 512 (the derivative is as accurate).

    Args:
        kappa: concentrations ≥ 0, any shape and float dtype.
        dim: D ≥ 8.

    Example:
        >>> round(float(log_cp_exact(torch.tensor(0.0, dtype=torch.float64), 128)), 3)
        127.053
    """
    check_log_cp_dim(dim, "exact")
    nu = dim / 2.0 - 1.0
    z = kappa / nu
    q = torch.sqrt(1.0 + z * z)
    t = 1.0 / q
    t2 = t * t
    u1 = t * (3.0 - 5.0 * t2) / 24.0
    u2 = t2 * (81.0 - 462.0 * t2 + 385.0 * t2 * t2) / 1152.0
    u3 = t * t2 * (30375.0 - 369603.0 * t2 + 765765.0 * t2 * t2 - 425425.0 * t2 * t2 * t2) / 414720.0
    series = torch.log1p(u1 / nu + u2 / nu**2 + u3 / nu**3)
    const = nu * math.log(nu) - (dim / 2.0) * math.log(2.0 * math.pi) + 0.5 * math.log(2.0 * math.pi * nu)
    return const - nu * (q - torch.log1p(q)) + 0.5 * torch.log(q) - series


def log_cp(kappa: Tensor, dim: int, mode: LogCpMode = "exact") -> Tensor:
    """log C_D(κ) of the vMF on S^{D−1}; ``mode`` is ``"code_poly"`` or ``"exact"``.

    Raises ValueError for a mode that is unsafe at ``dim`` (see :func:`check_log_cp_dim`).

    Example:
        >>> k = torch.tensor([0.0], dtype=torch.float64)
        >>> round(float(log_cp(k, 512, "exact")[0]), 3), float(log_cp(k, 512, "code_poly")[0])
        (867.968, 868.0)
    """
    if mode == "code_poly":
        return log_cp_code_poly(kappa, dim)
    if mode == "exact":
        return log_cp_exact(kappa, dim)
    raise ValueError(f"unknown log_cp mode {mode!r}; valid modes: code_poly, exact")
