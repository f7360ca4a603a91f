"""nivMF vMF maths: log C_D(κ) against scipy Bessel / power series / closed forms, and the sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import ive

from dmlbench.methods.nivmf.vmf import (
    log_cp,
    log_cp_code_poly,
    vmf_draw_noise,
    vmf_rsample,
    vmf_rsample_from_noise,
    wood_b,
)

KAPPAS = [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 1e4]


def ref_log_cp_scipy(kappa: float, dim: int) -> float | None:
    """log C_D(κ) from scipy's exponentially scaled Bessel function (None where it under/overflows)."""
    nu = dim / 2 - 1
    i_scaled = float(ive(nu, kappa))
    if not (i_scaled > 1e-290 and math.isfinite(i_scaled)):
        return None
    return nu * math.log(kappa) - dim / 2 * math.log(2 * math.pi) - (math.log(i_scaled) + kappa)


def ref_log_cp_series(kappa: float, dim: int, terms: int = 200) -> float:
    """log C_D(κ) from the power series I_ν(κ) = Σ_k (κ/2)^{2k+ν} / (k! Γ(k+ν+1)) (small κ)."""
    nu = dim / 2 - 1
    total, term = 0.0, 1.0  # series of I_ν(κ) (κ/2)^{-ν} Γ(ν+1)
    for k in range(terms):
        total += term
        term *= (kappa * kappa / 4) / ((k + 1) * (k + 1 + nu))
    # log C = ν log κ − D/2 log 2π − [ν log(κ/2) − lgamma(ν+1) + log Σ]
    return nu * math.log(2) + math.lgamma(nu + 1) - dim / 2 * math.log(2 * math.pi) - math.log(total)


def exact64(kappa: float, dim: int) -> float:
    return float(log_cp(torch.tensor(kappa, dtype=torch.float64), dim, "exact"))


# ---- log C_D exact ---------------------------------------------------------------------------


# max |error| of the Debye expansion measured on 400 log-spaced κ in [1e-3, 5000]: 2.3e-4 (D = 8),
# 8.2e-6 (16), 4.0e-7 (32), 1.3e-9 (128), 5e-12 (512); tolerances sit just above.
@pytest.mark.parametrize(("dim", "tol"), [(8, 3e-4), (16, 1e-5), (32, 5e-7), (128, 2e-9), (512, 1e-10),
                                          (1024, 1e-10), (2048, 1e-10)])
def test_log_cp_exact_matches_scipy_bessel_where_finite(dim: int, tol: float) -> None:
    compared = 0
    for kappa in KAPPAS:
        ref = ref_log_cp_scipy(kappa, dim)
        if ref is None:
            continue
        compared += 1
        assert exact64(kappa, dim) == pytest.approx(ref, abs=tol, rel=1e-12), (dim, kappa)
    assert compared >= 3  # scipy underflows for κ ≲ D/4 at large D


@pytest.mark.parametrize("dim", [8, 32, 128, 512, 2048])
@pytest.mark.parametrize("kappa", [0.1, 1.0, 5.0])
def test_log_cp_exact_matches_power_series_at_small_kappa(dim: int, kappa: float) -> None:
    # covers the small-κ / large-D corner where scipy's ive underflows to 0 (e.g. ive(255, 0.1))
    tol = 3e-4 if dim == 8 else 1e-6
    assert exact64(kappa, dim) == pytest.approx(ref_log_cp_series(kappa, dim), abs=tol)


@pytest.mark.parametrize(("dim", "expected"), [(128, 127.053), (512, 867.968)])
def test_log_cp_exact_at_zero_is_minus_log_sphere_area(dim: int, expected: float) -> None:
    closed = math.lgamma(dim / 2) - math.log(2) - dim / 2 * math.log(math.pi)
    assert closed == pytest.approx(expected, abs=5e-4)  # spec §1.1 values
    assert exact64(0.0, dim) == pytest.approx(closed, abs=1e-9)
    assert exact64(1e-8, dim) == pytest.approx(closed, abs=1e-9)


@pytest.mark.parametrize(("dim", "tol"), [(8, 4e-4), (16, 1e-5), (128, 1e-9), (512, 1e-11), (2048, 1e-11)])
def test_log_cp_exact_derivative_is_minus_bessel_ratio(dim: int, tol: float) -> None:
    nu = dim / 2 - 1
    k = torch.tensor(KAPPAS, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_cp(k, dim, "exact").sum(), k)
    compared = 0
    for kappa, g in zip(KAPPAS, grad.tolist()):
        den = float(ive(nu, kappa))
        if den < 1e-290:
            continue
        compared += 1
        ratio = float(ive(nu + 1, kappa)) / den
        assert g == pytest.approx(-ratio, abs=tol), (dim, kappa)
    assert compared >= 3


@pytest.mark.parametrize("dim", [8, 32, 128, 512, 2048])
def test_log_cp_exact_float32_finite_and_close_to_float64(dim: int) -> None:
    k32 = torch.tensor(KAPPAS, dtype=torch.float32, requires_grad=True)
    v32 = log_cp(k32, dim, "exact")
    (g32,) = torch.autograd.grad(v32.sum(), k32)
    assert torch.isfinite(v32).all() and torch.isfinite(g32).all()
    v64 = log_cp(torch.tensor(KAPPAS, dtype=torch.float64), dim, "exact")
    # float32 carries ~7 significant digits of values up to ~1e4 in magnitude
    assert torch.allclose(v32.double(), v64, rtol=1e-5, atol=2e-3)


# ---- log C_D code polynomial -------------------------------------------------------------------


def test_log_cp_code_poly_values() -> None:
    ks = [0.0, 6.0, 10.0, 22.0, 60.0, 100.0]
    got128 = log_cp_code_poly(torch.tensor(ks, dtype=torch.float64), 128).tolist()
    got512 = log_cp_code_poly(torch.tensor(ks, dtype=torch.float64), 512).tolist()
    for k, a, b in zip(ks, got128, got512):
        assert a == pytest.approx(127 - 0.01909 * k - 0.003355 * k * k, abs=1e-12)
        assert b == pytest.approx(868 - 0.0002662 * k - 0.0009685 * k * k, abs=1e-12)


@pytest.mark.parametrize(("dim", "errors"), [(128, {6: -0.15, 22: -0.23, 60: -0.42, 100: -3.5}),
                                             (512, {6: 0.03, 22: 0.03, 60: 0.02, 100: -0.09})])
def test_log_cp_code_poly_error_table_of_the_spec(dim: int, errors: dict[int, float]) -> None:
    # spec §1.6: error of the reference's fit against the exact value (mpmath), rounded there
    for k, err in errors.items():
        poly = float(log_cp(torch.tensor(float(k), dtype=torch.float64), dim, "code_poly"))
        assert poly - exact64(float(k), dim) == pytest.approx(err, abs=0.03 if abs(err) < 1 else 0.06)


def test_log_cp_refuses_unsafe_dims() -> None:
    with pytest.raises(ValueError, match="128 or 512"):
        log_cp(torch.tensor(1.0), 64, "code_poly")
    with pytest.raises(ValueError, match="D >= 8"):
        log_cp(torch.tensor(1.0), 4, "exact")
    with pytest.raises(ValueError, match="valid modes"):
        log_cp(torch.tensor(1.0), 128, "bessel")  # type: ignore[arg-type]


# ---- sampler ------------------------------------------------------------------------------------


def test_wood_b_matches_textbook_formula() -> None:
    for dim in (3, 16, 128):
        for kappa in (0.1, 1.0, 9.0, 50.0):
            c = math.sqrt(4 * kappa**2 + (dim - 1) ** 2)
            expected = (-2 * kappa + c) / (dim - 1)
            got = float(wood_b(torch.tensor(kappa, dtype=torch.float64), dim))
            assert got == pytest.approx(expected, rel=1e-12)
    # the reference blend: Taylor form only above κ = 11, linear mix in between
    k = torch.tensor([5.0, 10.5, 12.0], dtype=torch.float64)
    blend = wood_b(k, 64, blend=True).tolist()
    exact = wood_b(k, 64).tolist()
    assert blend[0] == pytest.approx(exact[0], rel=1e-12)
    assert blend[1] == pytest.approx(0.5 * exact[1] + 0.5 * 63 / 42.0, rel=1e-12)
    assert blend[2] == pytest.approx(63 / 48.0, rel=1e-12)


def _unit(rows: int, dim: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=g, dtype=dtype), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_samples_are_unit_vectors_and_seeded(dtype: torch.dtype) -> None:
    mu = _unit(4, 32, 0, dtype)
    kappa = torch.tensor([0.1, 5.0, 200.0, 1e4], dtype=dtype)
    z1 = vmf_rsample(mu, kappa, 7, torch.Generator().manual_seed(3))
    z2 = vmf_rsample(mu, kappa, 7, torch.Generator().manual_seed(3))
    assert z1.shape == (4, 7, 32) and z1.dtype == dtype
    assert torch.allclose(z1.norm(dim=-1), torch.ones(4, 7, dtype=dtype), atol=1e-5 if dtype == torch.float32 else 1e-12)
    assert torch.equal(z1, z2)
    # κ = 1e4 in D = 32: cos(z, μ) ≈ A_D(κ) ≈ 1 − 15.5/1e4
    assert float((z1[3] @ mu[3]).min()) > 0.99


def test_from_noise_reproduces_rsample_with_recorded_noise() -> None:
    mu = _unit(3, 16, 1)
    kappa = torch.tensor([0.5, 20.0, 700.0], dtype=torch.float64)
    for blend in (False, True):
        e, v = vmf_draw_noise(kappa, 16, 5, torch.Generator().manual_seed(11), blend=blend)
        z_noise = vmf_rsample_from_noise(mu, kappa, e, v, blend=blend)
        z = vmf_rsample(mu, kappa, 5, torch.Generator().manual_seed(11), blend=blend)
        assert torch.allclose(z, z_noise, atol=0, rtol=0)
        # the first coordinate before the reflection is w(e): ⟨z, μ⟩ = (1 − (1+b)e)/(1 − (1−b)e)
        b = wood_b(kappa, 16, blend).unsqueeze(-1)
        w = (1 - (1 + b) * e) / (1 - (1 - b) * e)
        assert torch.allclose(torch.einsum("bsd,bd->bs", z, mu), w, atol=1e-12)


def _mean_resultant(dim: int, kappa: float) -> float:
    nu = dim / 2 - 1
    return float(ive(nu + 1, kappa) / ive(nu, kappa))


@pytest.mark.parametrize(("dim", "kappa"), [(16, 1.0), (16, 12.0), (16, 50.0), (128, 12.0), (128, 60.0),
                                            (128, 2000.0)])
def test_mean_resultant_length_matches_bessel_ratio(dim: int, kappa: float) -> None:
    n = 20000
    mu = _unit(1, dim, 2)
    z = vmf_rsample(mu, torch.tensor([kappa], dtype=torch.float64), n, torch.Generator().manual_seed(5))
    cos = z[0] @ mu[0]
    se = float(cos.std()) / math.sqrt(n)
    assert abs(float(cos.mean()) - _mean_resultant(dim, kappa)) < 5 * se


def test_reference_blended_sampler_is_biased_between_kappa_10_and_dim() -> None:
    # documents why sampler="exact" is the default: the reference's blended b with a, d of b_true
    n = 20000
    mu = _unit(1, 128, 2)
    z = vmf_rsample(mu, torch.tensor([12.0], dtype=torch.float64), n, torch.Generator().manual_seed(5), blend=True)
    cos = z[0] @ mu[0]
    se = float(cos.std()) / math.sqrt(n)
    assert abs(float(cos.mean()) - _mean_resultant(128, 12.0)) > 50 * se


def test_sampler_gradients_reach_mu_and_kappa_at_extremes() -> None:
    for dtype in (torch.float32, torch.float64):
        emb = (_unit(3, 128, 4, dtype) * torch.tensor([[0.1], [30.0], [1e4]], dtype=dtype)).requires_grad_(True)
        kappa = emb.norm(dim=-1)
        z = vmf_rsample(emb / kappa.unsqueeze(-1), kappa, 4, torch.Generator().manual_seed(0))
        target = torch.from_numpy(np.linspace(-1, 1, 128)).to(dtype)
        (grad,) = torch.autograd.grad((z @ target).sum(), emb)
        assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
