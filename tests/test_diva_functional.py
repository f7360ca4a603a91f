"""DiVA pure functions vs independent float64 loops (spec shared/specs/diva.md §6.1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmlbench.methods.diva import functional as Fd

f64 = torch.float64


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(n, d, generator=g, dtype=f64), dim=1)


def ell(d: float, dim: int) -> float:
    return (2 - dim) * math.log(d) - ((dim - 3) / 2) * math.log(max(1 - d * d / 4, 1e-8))


# ---- margin loss ------------------------------------------------------------------------------
def margin_loop(x, y, trip, beta, m):
    total, n = 0.0, 0
    for a, p, q in trip.tolist():
        dap = math.sqrt(sum((x[a, k].item() - x[p, k].item()) ** 2 for k in range(x.shape[1])) + 1e-8)
        dan = math.sqrt(sum((x[a, k].item() - x[q, k].item()) ** 2 for k in range(x.shape[1])) + 1e-8)
        b = beta[y[a]].item()
        hp, hn = max(0.0, dap - b + m), max(0.0, b - dan + m)
        total += hp + hn
        n += (hp > 0) or (hn > 0)
    return (total / n if n else 0.0), n


def test_margin_loss_matches_loop_with_nonuniform_beta_and_or_count() -> None:
    x = unit(6, 5, 0)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    beta = torch.tensor([0.4, 1.2, 1.9], dtype=f64, requires_grad=True)
    # includes degenerate triplets (a = p, a = n) and one where both hinges fire
    trip = torch.tensor([[0, 1, 2], [2, 3, 4], [4, 5, 0], [0, 0, 3], [3, 3, 3], [1, 0, 5]])
    loss, info = Fd.margin_loss(x, y, trip, beta, 0.2)
    ref, n = margin_loop(x, y, trip, beta.detach(), 0.2)
    assert loss.item() == pytest.approx(ref, rel=1e-10)
    assert info["n_active"] == n
    loss.backward()
    assert beta.grad is not None and torch.isfinite(beta.grad).all()


def test_margin_loss_counts_a_triplet_with_both_hinges_once() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.0], [3.0, 0.0]], dtype=f64)
    y = torch.tensor([0, 0, 1, 1])
    beta = torch.tensor([1.0, 1.0], dtype=f64)
    # (0,1,2): h+ = 1 - 1 + .2 = .2 and h- = 1 - .5 + .2 = .7 (both); (0,1,3): h+ = .2 only
    loss, info = Fd.margin_loss(x, y, torch.tensor([[0, 1, 2], [0, 1, 3]]), beta, 0.2)
    assert info["n_active"] == 2  # OR count; counting active hinges would give 3
    assert loss.item() == pytest.approx((0.2 + 0.7 + 0.2) / 2, abs=1e-7)


def test_margin_loss_degenerate_identical_points_uses_sqrt_eps() -> None:
    x = torch.zeros(2, 3, dtype=f64)
    loss, info = Fd.margin_loss(x, torch.tensor([0, 1]), torch.tensor([[0, 0, 1]]), torch.tensor([1.2, 1.2], dtype=f64), 0.2)
    # d_ap = d_an = 1e-4: h+ = 0, h- = 1.2 - 1e-4 + 0.2
    assert loss.item() == pytest.approx(1.4 - 1e-4)
    assert info["n_active"] == 1


def test_margin_loss_without_triplets_is_zero_and_backward_works() -> None:
    x = unit(3, 4, 1).requires_grad_(True)
    beta = torch.ones(3, dtype=f64, requires_grad=True)
    loss, info = Fd.margin_loss(x, torch.tensor([0, 1, 2]), torch.zeros(0, 3, dtype=torch.long), beta, 0.2)
    assert loss.item() == 0.0 and info["n_active"] == 0
    loss.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) == 0.0


# ---- distance-weighted miner ----------------------------------------------------------------------
def test_distance_weighted_probs_matches_spec_loop() -> None:
    x = unit(7, 6, 2)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    q = Fd.distance_weighted_probs(x, y)
    D = x.shape[1]
    for i in range(7):
        # spec: ℓ = 0 on same label (incl. anchor), max over the whole row, zero same label, normalise
        row = []
        for j in range(7):
            d = max(0.5, math.sqrt(sum((x[i, k].item() - x[j, k].item()) ** 2 for k in range(D))))
            row.append(0.0 if y[i] == y[j] else ell(d, D))
        mx = max(row)
        w = [0.0 if y[i] == y[j] else math.exp(row[j] - mx) for j in range(7)]
        s = sum(w)
        for j in range(7):
            assert q[i, j].item() == pytest.approx(w[j] / s, rel=1e-9, abs=1e-15)
    assert torch.allclose(q.sum(1), torch.ones(7, dtype=f64))
    assert (q[y[:, None] == y[None, :]] == 0).all()


def test_distance_weighted_probs_finite_at_antipodes_and_single_class_rows() -> None:
    x = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float32)
    q = Fd.distance_weighted_probs(x, torch.tensor([0, 1, 1]))
    assert torch.isfinite(q).all()
    assert q[0].sum().item() == pytest.approx(1.0)
    q2 = Fd.distance_weighted_probs(x, torch.tensor([5, 5, 5]))
    assert (q2 == 0).all()  # no negatives: all-zero rows, never NaN


def check_triplet_invariants(t: torch.Tensor, y: torch.Tensor) -> None:
    a, p, n = t.unbind(1)
    assert (a != p).all()
    assert (y[a] == y[p]).all()
    assert (y[a] != y[n]).all()


@pytest.mark.parametrize("seed", range(5))
def test_sample_distance_triplets_invariants(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (12,), generator=g)
    y[:2] = torch.tensor([9, 9])  # at least one repeated label
    x = unit(12, 8, seed)
    t = Fd.sample_distance_triplets(x, y, g)
    check_triplet_invariants(t, y)
    counts = {int(c): int((y == c).sum()) for c in y.unique()}
    expected = [i for i in range(12) if counts[int(y[i])] >= 2]
    assert t[:, 0].tolist() == expected
    assert len(set(map(tuple, t.tolist()))) == len(t)  # one triplet per anchor: all distinct


def test_sample_distance_triplets_negative_frequencies_follow_q() -> None:
    x = unit(6, 4, 3)
    y = torch.tensor([0, 0, 1, 2, 3, 4])
    q = Fd.distance_weighted_probs(x, y)[0]
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(6, dtype=f64)
    n_draws = 3000
    for _ in range(n_draws):
        t = Fd.sample_distance_triplets(x, y, g)
        counts[t[0, 2]] += 1
    freq = counts / n_draws
    assert (freq - q).abs().max().item() < 0.04


def test_shared_random_permutes_labels_with_the_generator() -> None:
    x = unit(8, 8, 4)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    g = torch.Generator().manual_seed(11)
    g_copy = torch.Generator().manual_seed(11)
    t = Fd.sample_shared_triplets(x, y, g, "random")
    y_perm = y[torch.randperm(8, generator=g_copy)]
    check_triplet_invariants(t, y_perm)
    # the same draw reproduces exactly (explicit generator, no global RNG)
    t2 = Fd.sample_distance_triplets(x, y_perm, g_copy)
    assert torch.equal(t, t2)


@pytest.mark.parametrize("mode", ["standard", "full"])
def test_shared_standard_and_full_use_three_classes(mode: str) -> None:
    g = torch.Generator().manual_seed(5)
    x = unit(10, 8, 5)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    for _ in range(20):
        t = Fd.sample_shared_triplets(x, y, g, mode)  # type: ignore[arg-type]
        assert len(t) == 10
        a, p, n = t.unbind(1)
        assert ((y[a] != y[p]) & (y[p] != y[n]) & (y[a] != y[n])).all()


def test_intra_triplets_within_one_class_with_replacement_and_uniform_classes() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])  # class 0 has 3x more rows
    n_class1, n_degenerate, total = 0, 0, 0
    for _ in range(400):
        t = Fd.sample_intra_triplets(y, g)
        assert t.shape == (8, 3)
        a, p, n = t.unbind(1)
        assert ((y[a] == y[p]) & (y[a] == y[n])).all()
        n_class1 += int((y[a] == 1).sum())
        n_degenerate += int(((a == p) | (a == n)).sum())
        total += 8
    assert abs(n_class1 / total - 0.5) < 0.05  # classes drawn uniformly, not by frequency
    assert n_degenerate > 0


# ---- DaNCE --------------------------------------------------------------------------------------------
def dance_weights_loop(q, M, variant, lower=0.5, upper=1.4):
    B, K, D = q.shape[0], M.shape[0], q.shape[1]
    d = [[max(lower, math.sqrt(max(0.0, 2 - 2 * float(q[i] @ M[j])))) for j in range(K)] for i in range(B)]
    L = [[ell(d[i][j], D) for j in range(K)] for i in range(B)]
    gmax = max(max(r) for r in L)
    w = [[0.0] * K for _ in range(B)]
    for i in range(B):
        mx = gmax if variant == "original" else max(L[i])
        for j in range(K):
            v = math.exp(L[i][j] - mx)
            if d[i][j] > upper:
                v = 0.0
            w[i][j] = max(v, 1e-45)
    if variant == "original":
        cols = [sum(w[i][j] for i in range(B)) for j in range(K)]
        return [[w[i][j] / cols[j] for j in range(K)] for i in range(B)]
    return [[w[i][j] / sum(w[i]) for j in range(K)] for i in range(B)]


@pytest.mark.parametrize("variant", ["original", "fixed"])
def test_dance_weights_match_loop(variant: str) -> None:
    q, M = unit(4, 5, 6), unit(9, 5, 7)
    M[0] = -q[0]  # one pair past the upper cutoff (d = 2)
    w = Fd.dance_weights(q, M, variant=variant)  # type: ignore[arg-type]
    ref = dance_weights_loop(q, M, variant)
    for i in range(4):
        for j in range(9):
            assert w[i, j].item() == pytest.approx(ref[i][j], rel=1e-9, abs=1e-300)
    axis = 0 if variant == "original" else 1
    assert torch.allclose(w.sum(axis), torch.ones(w.shape[1 - axis], dtype=f64))


@pytest.mark.parametrize("variant", ["original", "fixed"])
@pytest.mark.parametrize("weight_on", ["logit", "exp"])
def test_dance_loss_matches_loop_and_weights_are_constant(variant: str, weight_on: str) -> None:
    q = unit(4, 6, 8).requires_grad_(True)
    k, M = unit(4, 6, 9), unit(10, 6, 10)
    tau = 0.1
    loss, info = Fd.dance_loss(q, k, M, tau, variant, weight_on=weight_on)  # type: ignore[arg-type]
    w = torch.tensor(dance_weights_loop(q.detach(), M, variant), dtype=f64)  # constants
    total = torch.zeros((), dtype=f64)
    for i in range(4):
        sp = (q[i] * k[i]).sum()
        terms = [torch.exp(sp / tau)]
        for j in range(10):
            s = (q[i] * M[j]).sum()
            terms.append(torch.exp(w[i, j] * s / tau) if weight_on == "logit" else w[i, j] * torch.exp(s / tau))
        total = total + torch.log(torch.stack(terms).sum()) - sp / tau
    ref = total / 4
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    (g_loss,) = torch.autograd.grad(loss, q)
    (g_ref,) = torch.autograd.grad(ref, q)
    assert torch.allclose(g_loss, g_ref, rtol=1e-8, atol=1e-10)  # no gradient through w
    assert info["s_pos_mean"] == pytest.approx(float((q.detach() * k).sum(1).mean()))


# ---- GRL, decorrelation -------------------------------------------------------------------------
def test_grad_reverse_identity_forward_negated_backward() -> None:
    x = torch.randn(3, 2, dtype=f64, requires_grad=True)
    y = Fd.grad_reverse(x, 2.5)
    assert torch.equal(y, x)
    w = torch.randn(3, 2, dtype=f64)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -2.5 * w)


def test_decorrelation_is_mean_of_squared_products() -> None:
    zs, zt = unit(3, 4, 11), unit(3, 4, 12)
    mlp = nn.Linear(4, 4).double()
    r = nn.functional.normalize(mlp(zs), dim=1)
    ref = sum((zt[b, d] * r[b, d]).item() ** 2 for b in range(3) for d in range(4)) / 12
    assert Fd.decorrelation(zs, zt, mlp).item() == pytest.approx(ref, rel=1e-12)


def test_adversarial_loss_signs_mlp_ascends_heads_descend() -> None:
    torch.manual_seed(0)
    dirs = [("a", "d"), ("b", "d")]
    rho = [3.0, 0.5]
    mlps = {"a->d": Fd.make_decorrelation_mlp(4, 8).double(), "b->d": Fd.make_decorrelation_mlp(4, 8).double()}
    base = {h: torch.randn(5, 4, dtype=f64) for h in "abd"}
    heads = {h: v.clone().requires_grad_(True) for h, v in base.items()}
    loss, logs = Fd.adversarial_loss(heads, mlps, dirs, rho)
    params = [p for m in mlps.values() for p in m.parameters()]
    g = torch.autograd.grad(loss, params + list(heads.values()))
    # reference without GRL: L_ref = -Σ ρ c
    heads2 = {h: v.clone().requires_grad_(True) for h, v in base.items()}
    ref = torch.zeros((), dtype=f64)
    for (s, t), r in zip(dirs, rho):
        zs = nn.functional.normalize(heads2[s], dim=1)
        zt = nn.functional.normalize(heads2[t], dim=1)
        c = Fd.decorrelation(zs, zt, mlps[f"{s}->{t}"])
        assert logs[f"c/{s}->{t}"] == pytest.approx(c.item())
        ref = ref - r * c
    g_ref = torch.autograd.grad(ref, params + list(heads2.values()))
    assert loss.item() == pytest.approx(ref.item()) and loss.item() < 0
    n_p = len(params)
    for a, b in zip(g[:n_p], g_ref[:n_p]):
        assert torch.allclose(a, b)  # MLPs receive ∂L_adv
    for a, b in zip(g[n_p:], g_ref[n_p:]):
        assert torch.allclose(a, -b)  # heads receive −∂L_adv
        assert b.abs().sum() > 0


def test_adversarial_loss_rho_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="rho has 1 values but there are 2"):
        Fd.adversarial_loss({"a": torch.ones(1, 2), "b": torch.ones(1, 2)}, {}, [("a", "b"), ("b", "a")], [1.0])


# ---- EMA, queue, concat -----------------------------------------------------------------------------
def test_ema_update_closed_form_and_buffers_untouched() -> None:
    torch.manual_seed(0)
    online, target = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        for p in online.parameters():
            p.normal_()
        online.running_mean.fill_(5.0)
    t0 = [p.clone() for p in target.parameters()]
    Fd.ema_update_(target.parameters(), online.parameters(), 0.9)
    for t, a, o in zip(target.parameters(), t0, online.parameters()):
        assert torch.allclose(t, 0.9 * a + 0.1 * o)
    assert (target.running_mean == 0).all()


def test_fifo_queue_drops_oldest_rows_in_order() -> None:
    fq = Fd.FifoQueue(6, 1)
    assert not bool(fq.filled)
    fq.init(torch.arange(6.0)[:, None])
    fq.push(torch.tensor([[10.0], [11.0]]))
    fq.push(torch.tensor([[12.0], [13.0], [14.0]]))
    assert fq.keys.squeeze(1).tolist() == [5.0, 10.0, 11.0, 12.0, 13.0, 14.0]
    assert bool(fq.filled)
    assert "keys" in fq.state_dict() and "filled" in fq.state_dict()
    with pytest.raises(ValueError):
        fq.push(torch.zeros(7, 1))
    with pytest.raises(ValueError):
        fq.init(torch.zeros(5, 1))


def test_weighted_concat_equals_manual() -> None:
    heads = {"d": unit(3, 4, 13), "s": unit(3, 4, 14), "i": unit(3, 4, 15)}
    w = {"d": 0.5, "s": 1.0, "i": 2.0}
    out = Fd.weighted_concat(heads, w)
    for b in range(3):
        row = [w[h] * heads[h][b, k].item() for h in ("d", "s", "i") for k in range(4)]
        norm = math.sqrt(sum(v * v for v in row))
        assert out[b].tolist() == pytest.approx([v / norm for v in row], rel=1e-12)
    with pytest.raises(ValueError, match="no weight"):
        Fd.weighted_concat(heads, {"d": 1.0})
