"""EL-nivMF loss pieces against explicit float64 loops (spec §1.2–§1.4)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from scipy.special import ive

from dmlbench.methods.nivmf.functional import (
    class_mean_directions,
    el_nivmf_loss,
    elk_logits,
    nivmf_loglik,
    proxy_anchor_guidance,
    proxy_nca_ce,
    subsample_classes,
)
from dmlbench.methods.nivmf.vmf import log_cp, vmf_draw_noise, vmf_rsample_from_noise

D = 8


def scipy_log_cp(r: float, dim: int) -> float:
    nu = dim / 2 - 1
    return nu * math.log(r) - dim / 2 * math.log(2 * math.pi) - (math.log(float(ive(nu, r))) + r)


def loop_loglik(z: torch.Tensor, proxy_v: torch.Tensor, kappa_raw: torch.Tensor, stretch: bool,
                kappa_min: float = 0.1) -> list[list[list[float]]]:
    """ℓ_c(z) one (b, s, c) at a time in plain Python floats."""
    bsz, n_s, dim = z.shape
    out = []
    for b in range(bsz):
        rows = []
        for s in range(n_s):
            zz = z[b, s].tolist()
            zn = math.sqrt(sum(x * x for x in zz))
            zz = [x / zn for x in zz]
            vals = []
            for c in range(proxy_v.shape[0]):
                v = proxy_v[c].tolist()
                vn = math.sqrt(sum(x * x for x in v))
                mu = [x / vn for x in v]
                kap = [max(k, kappa_min) for k in kappa_raw[c].tolist()]
                m = [k * u for k, u in zip(kap, mu)]
                r = math.sqrt(sum(x * x for x in m))
                x = [k * q for k, q in zip(kap, zz)] if stretch else zz
                xn = math.sqrt(sum(q * q for q in x))
                cos = sum(a * bb for a, bb in zip(x, m)) / (xn * r)
                det = sum(math.log(k) for k in kap) - math.log(r)
                vals.append(scipy_log_cp(r, dim) + r * cos + det)
            rows.append(vals)
        out.append(rows)
    return out


def _data(seed: int = 0, bsz: int = 3, n_s: int = 4, n_c: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(bsz, n_s, D, generator=g, dtype=torch.float64), dim=-1)
    proxy_v = torch.randn(n_c, D, generator=g, dtype=torch.float64) * 3
    kappa_raw = torch.rand(n_c, D, generator=g, dtype=torch.float64) * 5
    kappa_raw[0, :3] = torch.tensor([0.05, -1.0, 0.0999], dtype=torch.float64)  # below the floor
    return z, proxy_v, kappa_raw


@pytest.mark.parametrize("stretch", [False, True])
def test_loglik_forms_a_and_b_match_explicit_loop(stretch: bool) -> None:
    z, proxy_v, kappa_raw = _data()
    got = nivmf_loglik(z, proxy_v, kappa_raw, partial(log_cp, dim=D, mode="exact"), stretch=stretch)
    expected = torch.tensor(loop_loglik(z, proxy_v, kappa_raw, stretch), dtype=torch.float64)
    assert got.shape == (3, 4, 5)
    # the Debye log C_D is within 3e-4 nats of scipy at D = 8
    assert torch.allclose(got, expected, atol=3e-4, rtol=0)


def test_loglik_forms_differ_unless_isotropic() -> None:
    z, proxy_v, kappa_raw = _data(1)
    fn = partial(log_cp, dim=D, mode="exact")
    a = nivmf_loglik(z, proxy_v, kappa_raw, fn, stretch=False)
    b = nivmf_loglik(z, proxy_v, kappa_raw, fn, stretch=True)
    assert (a - b).abs().max() > 1e-2
    iso = torch.full_like(kappa_raw, 2.5)
    assert torch.allclose(nivmf_loglik(z, proxy_v, iso, fn), nivmf_loglik(z, proxy_v, iso, fn, stretch=True),
                          atol=1e-12)


def test_concentrations_below_the_floor_get_zero_gradient() -> None:
    z, proxy_v, kappa_raw = _data(2)
    kappa_raw.requires_grad_(True)
    ll = nivmf_loglik(z, proxy_v, kappa_raw, partial(log_cp, dim=D, mode="exact"), stretch=True)
    (g,) = torch.autograd.grad(ll.sum(), kappa_raw)
    assert torch.equal(g[0, :3], torch.zeros(3, dtype=torch.float64))
    assert bool((g[0, 3:] != 0).all())


def test_elk_logits_match_loop() -> None:
    g = torch.Generator().manual_seed(3)
    ll = torch.randn(2, 4, 3, generator=g, dtype=torch.float64) * 2
    for temp in (0.5, 1.0, 3.0):
        got = elk_logits(ll, torch.tensor(temp, dtype=torch.float64))
        for b in range(2):
            for c in range(3):
                mean = sum(math.exp(float(ll[b, s, c]) / temp) for s in range(4)) / 4
                assert float(got[b, c]) == pytest.approx(math.log(mean), rel=1e-12)


def test_elk_logits_tiny_temperature_no_overflow() -> None:
    ll = torch.tensor([[[900.0, 0.0], [1000.0, 1.0]]], dtype=torch.float32)
    out = elk_logits(ll, 1e-3)
    assert torch.isfinite(out).all()
    assert float(out[0, 0]) == pytest.approx(1000.0 / 1e-3 - math.log(2), rel=1e-6)


def test_proxy_nca_ce_matches_loop() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 6, generator=g, dtype=torch.float64) * 5
    labels = torch.tensor([0, 5, 2, 2])
    expected = 0.0
    for i in range(4):
        expected += -float(logits[i, labels[i]]) + math.log(sum(math.exp(float(x)) for x in logits[i]))
    assert float(proxy_nca_ce(logits, labels)) == pytest.approx(expected / 4, rel=1e-12)


def loop_pa(x: torch.Tensor, p: torch.Tensor, labels: list[int], alpha: float, delta: float) -> float:
    """The reference ``oproxy`` one column at a time (spec §1.4)."""
    bsz, n_c = x.shape[0], p.shape[0]
    dot = [[float(x[i] @ p[c]) for c in range(n_c)] for i in range(bsz)]
    pos = 0.0
    for j in range(bsz):
        s = sum(math.exp(-alpha * (dot[i][labels[j]] - delta)) for i in range(bsz) if labels[i] == labels[j])
        pos += math.log(1 + s)
    neg = 0.0
    for c in range(n_c):
        s = sum(math.exp(alpha * (dot[i][c] + delta)) for i in range(bsz) if labels[i] != c)
        neg += math.log(1 + s)
    return pos / bsz + neg / n_c


@pytest.mark.parametrize("alpha", [2.0, 32.0])
def test_proxy_anchor_guidance_matches_loop_with_a_class_drawn_twice(alpha: float) -> None:
    g = torch.Generator().manual_seed(5)
    x = F.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=-1)
    labels = [0, 0, 1, 1, 0, 0]  # class 0 drawn twice (4 images), classes 2..4 absent (empty pos)
    got = float(proxy_anchor_guidance(x, p, torch.tensor(labels), alpha=alpha, delta=0.1))
    assert got == pytest.approx(loop_pa(x, p, labels, alpha, 0.1), rel=1e-10)
    # column averaging differs from canonical PA (mean over classes with positives) here
    canon_pos = 0.0
    for c in (0, 1):
        s = sum(math.exp(-alpha * (float(x[i] @ p[c]) - 0.1)) for i in range(6) if labels[i] == c)
        canon_pos += math.log(1 + s) / 2
    neg = loop_pa(x, p, labels, alpha, 0.1) - sum(
        math.log(1 + sum(math.exp(-alpha * (float(x[i] @ p[labels[j]]) - 0.1)) for i in range(6)
                         if labels[i] == labels[j])) for j in range(6)) / 6
    assert abs(got - (canon_pos + neg)) > 1e-3


def test_proxy_anchor_guidance_gradient_is_finite_and_flows() -> None:
    g = torch.Generator().manual_seed(6)
    x = F.normalize(torch.randn(4, 8, generator=g), dim=-1).requires_grad_(True)
    p = F.normalize(torch.randn(3, 8, generator=g), dim=-1).requires_grad_(True)
    out = proxy_anchor_guidance(x, p, torch.tensor([0, 0, 1, 1]))
    gx, gp = torch.autograd.grad(out, (x, p))
    assert torch.isfinite(gx).all() and torch.isfinite(gp).all() and float(gp[2].abs().sum()) > 0


def test_class_mean_directions_match_loop_and_reject_missing_classes() -> None:
    g = torch.Generator().manual_seed(7)
    e = torch.randn(9, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0])
    got = class_mean_directions(e, labels, 3)
    for c in range(3):
        rows = [e[i] for i in range(9) if int(labels[i]) == c]
        mean = sum(rows) / len(rows)
        assert torch.allclose(got[c], mean / mean.norm(), atol=1e-12)
    with pytest.raises(ValueError, match="classes without images: \\[3\\]"):
        class_mean_directions(e, labels, 4)


def test_subsample_keeps_batch_classes_and_remaps_labels() -> None:
    labels = torch.tensor([7, 2, 7, 9])
    keep, new = subsample_classes(labels, 20, 0.25, torch.Generator().manual_seed(0))
    assert {2, 7, 9} <= set(keep.tolist())
    assert len(keep) == 3 + round(0.25 * 17)
    assert keep[new].tolist() == labels.tolist()
    with pytest.raises(ValueError, match="\\(0, 1\\]"):
        subsample_classes(labels, 20, 0.0)


def loop_total(emb: torch.Tensor, labels: list[int], proxy_v: torch.Tensor, kappa_raw: torch.Tensor,
               temp: float, noise: tuple[torch.Tensor, torch.Tensor], guidance_w: float, stretch: bool) -> float:
    kappa = emb.norm(dim=-1)
    z = vmf_rsample_from_noise(emb / kappa.unsqueeze(-1), kappa, *noise)
    ll = loop_loglik(z, proxy_v, kappa_raw, stretch)
    el = 0.0
    n_c = proxy_v.shape[0]
    for b, y in enumerate(labels):
        logits = []
        for c in range(n_c):
            vals = [ll[b][s][c] / temp for s in range(len(ll[b]))]
            mx = max(vals)
            logits.append(mx + math.log(sum(math.exp(v - mx) for v in vals) / len(vals)))
        mx = max(logits)
        el += -logits[y] + mx + math.log(sum(math.exp(v - mx) for v in logits))
    el /= len(labels)
    pa = loop_pa(F.normalize(emb, dim=-1), F.normalize(proxy_v, dim=-1), labels, 32.0, 0.1)
    return el + guidance_w * pa


@pytest.mark.parametrize("stretch", [False, True])
def test_el_nivmf_loss_matches_loop_with_recorded_noise(stretch: bool) -> None:
    g = torch.Generator().manual_seed(8)
    emb = torch.randn(4, D, generator=g, dtype=torch.float64) * 4
    _, proxy_v, kappa_raw = _data(9, n_c=3)
    labels = [0, 0, 2, 2]
    noise = vmf_draw_noise(emb.norm(dim=-1), D, 3, torch.Generator().manual_seed(1))
    total, parts = el_nivmf_loss(emb, torch.tensor(labels), proxy_v, kappa_raw, 0.7,
                                 partial(log_cp, dim=D, mode="exact"), guidance_w=0.5, noise=noise,
                                 stretch=stretch)
    expected = loop_total(emb, labels, proxy_v, kappa_raw, 0.7, noise, 0.5, stretch)
    assert float(total) == pytest.approx(expected, abs=1e-3)  # Debye vs scipy log C at D = 8
    assert float(parts.el + 0.5 * parts.pa) == pytest.approx(float(total), rel=1e-12)
    assert float(parts.img_kappa_mean) == pytest.approx(float(emb.norm(dim=-1).mean()), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("dim", "mode"), [(32, "exact"), (128, "code_poly"), (128, "exact"), (512, "exact")])
@pytest.mark.parametrize("img_kappa", [0.1, 1e4])
@pytest.mark.parametrize("proxy_kappa", [0.1, 1e4])
@pytest.mark.parametrize("temp", [1e-4, 1e3])
@pytest.mark.parametrize("stretch", [False, True])
def test_whole_loss_and_gradients_finite_at_extremes(dtype: torch.dtype, dim: int, mode: str, img_kappa: float,
                                                      proxy_kappa: float, temp: float, stretch: bool) -> None:
    g = torch.Generator().manual_seed(10)
    emb = (F.normalize(torch.randn(6, dim, generator=g, dtype=dtype), dim=-1) * img_kappa).requires_grad_(True)
    proxy_v = torch.randn(4, dim, generator=g, dtype=dtype).requires_grad_(True)
    kappa_raw = torch.full((4, dim), proxy_kappa, dtype=dtype).requires_grad_(True)
    t = torch.tensor(temp, dtype=dtype, requires_grad=True)
    total, _ = el_nivmf_loss(emb, torch.tensor([0, 0, 1, 1, 3, 3]), proxy_v, kappa_raw, t,
                             partial(log_cp, dim=dim, mode=mode), n_samples=3, guidance_w=1.0,
                             generator=torch.Generator().manual_seed(0), stretch=stretch)
    grads = torch.autograd.grad(total, (emb, proxy_v, kappa_raw, t))
    assert torch.isfinite(total)
    for gr in grads:
        assert torch.isfinite(gr).all()
