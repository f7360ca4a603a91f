"""CCP pure functions against independently computed values (float64, explicit loops)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dmlbench.methods.ccp import functional as F

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(
    seed: int, n: int = 6, d: int = 3, classes: int = 3, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    e = torch.randn(n, d, generator=g, dtype=DT) * scale
    y = torch.arange(n) % classes
    return e, y


def _proj(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / max(1.0, n) for x in v]


def _dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _pairs(
    y_rows: list[int], y_cols: list[int], same: bool
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pos, neg = [], []
    for i, yi in enumerate(y_rows):
        for j, yj in enumerate(y_cols):
            if same and i == j:
                continue
            (pos if yi == yj else neg).append((i, j))
    return pos, neg


# ---- reference losses (explicit loops, spec §1.3) --------------------------------------------
def ref_c2(rows: list[list[float]], cols: list[list[float]], pos, neg, mp: float, mn: float) -> float:
    ap = [_dist(rows[i], cols[j]) - mp for i, j in pos if _dist(rows[i], cols[j]) > mp]
    an = [mn - _dist(rows[i], cols[j]) for i, j in neg if _dist(rows[i], cols[j]) < mn]
    return sum(ap) / (len(ap) + 1e-16) + sum(an) / (len(an) + 1e-16)


def ref_c1(rows, cols, pos, neg, m: float) -> float:
    total = sum(max(0.0, 1 - _dot(rows[i], cols[j]) - 1e-5) for i, j in pos)
    total += sum(max(0.0, _dot(rows[i], cols[j]) - m) for i, j in neg)
    return total / len(rows)


def ref_ms(rows, cols, pos, neg, a: float, b: float, lam: float) -> float:
    out = 0.0
    for i in range(len(rows)):
        sp = sum(math.exp(-a * (_dot(rows[i], cols[j]) - lam)) for ii, j in pos if ii == i)
        sn = sum(math.exp(b * (_dot(rows[i], cols[j]) - lam)) for ii, j in neg if ii == i)
        out += math.log(1 + sp) / a + math.log(1 + sn) / b
    return out / len(rows)


def ref_triplet(rows, cols, pos, neg, m: float) -> tuple[float, int]:
    ts = []
    for i, p in pos:
        for ii, n in neg:
            if ii == i:
                t = _dist(rows[i], cols[p]) - _dist(rows[i], cols[n]) + m
                if t > 0:
                    ts.append(t)
    return sum(ts) / (len(ts) + 1e-16), len(ts)


# ---- geometry --------------------------------------------------------------------------------
def test_unit_ball_values_and_gradient_inside_and_outside() -> None:
    x = torch.tensor([[0.3, 0.4], [3.0, 4.0]], dtype=DT, requires_grad=True)
    out = F.unit_ball(x)
    assert torch.allclose(out, torch.tensor([[0.3, 0.4], [0.6, 0.8]], dtype=DT))
    # inside the ball: identity, Jacobian = I
    jac_in = torch.autograd.functional.jacobian(F.unit_ball, x[:1].detach())[0, :, 0, :]
    assert torch.allclose(jac_in, torch.eye(2, dtype=DT))
    # outside: v/|v| has Jacobian (I - u u^T)/|v|
    v = x[1:].detach()
    jac_out = torch.autograd.functional.jacobian(F.unit_ball, v)[0, :, 0, :]
    u = v[0] / v[0].norm()
    assert torch.allclose(jac_out, (torch.eye(2, dtype=DT) - torch.outer(u, u)) / 5.0)


def test_unit_ball_is_not_l2_normalisation() -> None:
    x = torch.tensor([[0.1, 0.0]], dtype=DT)
    assert torch.allclose(F.unit_ball(x), x)


def test_proxy_class_ids_and_masks() -> None:
    assert F.proxy_class_ids(4, 3).tolist() == [r % 4 for r in range(12)]
    y = torch.tensor([0, 1, 0, 2])
    pos, neg = F.pair_masks(y, y, exclude_diagonal=True)
    for i in range(4):
        for j in range(4):
            assert bool(pos[i, j]) == (i != j and y[i] == y[j])
            assert bool(neg[i, j]) == (y[i] != y[j])


def test_euclid_matches_loop_and_diagonal_has_finite_grad() -> None:
    e, _ = _batch(0)
    e = e.clone().requires_grad_(True)
    d = F.euclid(e, e, diag_safe=True)
    rows = e.detach().tolist()
    for i in range(len(rows)):
        for j in range(len(rows)):
            want = 0.0 if i == j else _dist(rows[i], rows[j])
            assert abs(float(d[i, j].detach()) - want) < 1e-9
    d.sum().backward()
    assert torch.isfinite(e.grad).all()
    # duplicate points off the diagonal (distance 0) still give finite gradients
    dup = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=DT, requires_grad=True)
    F.euclid(dup, dup.detach().clone()).sum().backward()
    assert torch.isfinite(dup.grad).all()


# ---- base losses vs loops --------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("same", [True, False])
def test_base_losses_match_loops(seed: int, same: bool) -> None:
    e, y = _batch(seed, scale=0.7)
    if same:
        cols_t, yc = e, y
    else:
        cols_t = torch.randn(6, 3, generator=_gen(seed + 10), dtype=DT) * 0.7
        yc = F.proxy_class_ids(3, 2)
    re, rc = F.unit_ball(e), F.unit_ball(cols_t)
    pos, neg = F.pair_masks(y, yc, exclude_diagonal=same)
    rows_l, cols_l = re.tolist(), rc.tolist()
    pl, nl = _pairs(y.tolist(), yc.tolist(), same)
    d = F.euclid(re, rc, diag_safe=same)
    s = re @ rc.T

    got, info = F.contrastive_c2(d, pos, neg, 0.2, 0.9)
    assert float(got) == pytest.approx(ref_c2(rows_l, cols_l, pl, nl, 0.2, 0.9), rel=1e-9)
    assert int(info["n_active_pos"]) == sum(_dist(rows_l[i], cols_l[j]) > 0.2 for i, j in pl)

    assert float(F.contrastive_c1(s, pos, neg, 0.3)) == pytest.approx(
        ref_c1(rows_l, cols_l, pl, nl, 0.3), rel=1e-9
    )
    got_ms = F.multi_similarity(s, pos, neg, 2.0, 40.0, 0.5)
    assert float(got_ms) == pytest.approx(ref_ms(rows_l, cols_l, pl, nl, 2.0, 40.0, 0.5), rel=1e-9)
    got_t, info_t = F.triplet_all(d, pos, neg, 0.3)
    want_t, n_t = ref_triplet(rows_l, cols_l, pl, nl, 0.3)
    assert float(got_t) == pytest.approx(want_t, rel=1e-9)
    assert int(info_t["n_active"]) == n_t


def test_triplet_gradients_match_dense_autograd() -> None:
    """The sorted/prefix-sum triplet has the gradient of the dense N×M×M formula."""
    e, y = _batch(3, n=8, classes=3, scale=0.5)
    q = torch.randn(6, 3, generator=_gen(4), dtype=DT) * 0.5
    yc = F.proxy_class_ids(3, 2)
    pos, neg = F.pair_masks(y, yc, False)
    e1, e2 = e.clone().requires_grad_(True), e.clone().requires_grad_(True)
    F.triplet_all(F.euclid(e1, q), pos, neg, 0.4)[0].backward()
    d = F.euclid(e2, q)
    t = d[:, :, None] - d[:, None, :] + 0.4
    valid = pos[:, :, None] & neg[:, None, :] & (t > 0)
    (torch.where(valid, t, 0.0).sum() / (valid.sum() + 1e-16)).backward()
    assert torch.allclose(e1.grad, e2.grad, atol=1e-12)


def test_degenerate_batches_give_zero_and_backward_works() -> None:
    e = torch.randn(3, 4, generator=_gen(5), dtype=DT, requires_grad=True)
    y = torch.tensor([0, 1, 2])  # one sample per class: no batch positives
    pos, neg = F.pair_masks(y, y, True)
    d = F.euclid(e, e, diag_safe=True)
    loss_t, info = F.triplet_all(d, pos, neg, 0.1)
    assert float(loss_t.detach()) == 0.0 and int(info["n_active"]) == 0
    # c2 with no active pairs is exactly 0 (margins that nothing violates)
    loss_c2, _ = F.contrastive_c2(d, pos, neg, 0.0, 0.0)
    assert float(loss_c2.detach()) == 0.0
    (loss_t + loss_c2).backward()
    assert torch.isfinite(e.grad).all()


def test_ms_row_without_positives_counts_only_negatives() -> None:
    s = torch.tensor([[0.2, 0.7]], dtype=DT)
    pos = torch.tensor([[False, False]])
    neg = torch.tensor([[True, True]])
    want = math.log(1 + math.exp(40 * (0.2 - 0.5)) + math.exp(40 * (0.7 - 0.5))) / 40
    assert float(F.multi_similarity(s, pos, neg, 2.0, 40.0, 0.5)) == pytest.approx(want, rel=1e-12)


def test_ms_large_beta_does_not_overflow_in_half_range() -> None:
    s = torch.tensor([[0.99, 0.98]], dtype=torch.float32, requires_grad=True)
    loss = F.multi_similarity(
        s, torch.tensor([[False, False]]), torch.tensor([[True, True]]), 2.0, 2000.0, -0.5
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("base", ["c1", "c2", "ms", "triplet"])
def test_ccp_loss_weights_terms_and_uses_projected_vectors(base: str) -> None:
    g = _gen(7)
    C, P, N, D = 3, 2, 6, 4
    e = torch.randn(N, D, generator=g, dtype=DT) * 2.0  # norms > 1: projection matters
    y = torch.arange(N) % C
    q = torch.randn(P * C, D, generator=g, dtype=DT) * 2.0
    kw = {
        "c1": {"margin": 0.5},
        "c2": {"pos_margin": 0.1, "neg_margin": 0.8},
        "ms": {"alpha": 2.0, "beta": 40.0, "base": 0.5},
        "triplet": {"margin": 0.2},
    }[base]
    out = F.ccp_loss(e, y, q, C, base, 0.1, 1.0, **kw)
    re, rq = [_proj(v) for v in e.tolist()], [_proj(v) for v in q.tolist()]
    yq = [r % C for r in range(P * C)]
    pb, nb = _pairs(y.tolist(), y.tolist(), True)
    pp, np_ = _pairs(y.tolist(), yq, False)
    ref = {
        "c1": lambda r, c, p, n: ref_c1(r, c, p, n, 0.5),
        "c2": lambda r, c, p, n: ref_c2(r, c, p, n, 0.1, 0.8),
        "ms": lambda r, c, p, n: ref_ms(r, c, p, n, 2.0, 40.0, 0.5),
        "triplet": lambda r, c, p, n: ref_triplet(r, c, p, n, 0.2)[0],
    }[base]
    want_pair, want_proxy = ref(re, re, pb, nb), ref(re, rq, pp, np_)
    assert float(out.terms["pair"]) == pytest.approx(want_pair, rel=1e-9, abs=1e-12)
    assert float(out.terms["proxy"]) == pytest.approx(want_proxy, rel=1e-9, abs=1e-12)
    assert float(out.total) == pytest.approx(0.1 * want_pair + 1.0 * want_proxy, rel=1e-9, abs=1e-12)


def test_ccp_loss_proxy_layout_row_k_times_c_plus_c() -> None:
    """A sample sitting exactly on proxy row k*C + c of its class is a zero-distance positive."""
    C, P = 3, 2
    q = torch.randn(P, C, 2, generator=_gen(8), dtype=DT) * 0.3
    flat = q.reshape(P * C, 2)
    e = q[1, 2:3].clone()  # proxy 1 of class 2 = row 1*3 + 2 = 5
    d = F.euclid(F.unit_ball(e), F.unit_ball(flat))
    pos, _ = F.pair_masks(torch.tensor([2]), F.proxy_class_ids(C, P), False)
    assert pos[0].nonzero().flatten().tolist() == [2, 5]
    assert float(d[0, 5]) < 1e-5


# ---- gradient transforms ---------------------------------------------------------------------
def test_proximal_grad_closed_form_and_zero_lambda() -> None:
    w = torch.randn(3, 2, generator=_gen(9), dtype=DT, requires_grad=True)
    a = torch.randn(3, 2, generator=_gen(10), dtype=DT)
    g0 = torch.randn(3, 2, generator=_gen(11), dtype=DT)
    w.grad = g0.clone()
    F.proximal_grad_([w], [a], 0.25)
    assert torch.allclose(w.grad, g0 + 0.25 * (w.detach() - a))
    w.grad = g0.clone()
    F.proximal_grad_([w], [a], 0.0)
    assert torch.equal(w.grad, g0)


def test_proximal_grad_is_the_gradient_of_the_penalty() -> None:
    w = torch.randn(4, generator=_gen(12), dtype=DT, requires_grad=True)
    a = torch.randn(4, generator=_gen(13), dtype=DT)
    (0.5 * 0.3 * (w - a).pow(2).sum()).backward()
    auto = w.grad.clone()
    w.grad = torch.zeros_like(w)
    F.proximal_grad_([w], [a], 0.3)
    assert torch.allclose(w.grad, auto)


def test_coupled_weight_decay_closed_form() -> None:
    w = torch.tensor([2.0, -4.0], dtype=DT, requires_grad=True)
    w.grad = torch.tensor([1.0, 1.0], dtype=DT)
    F.coupled_weight_decay_([w], 1e-1)
    assert torch.allclose(w.grad, torch.tensor([1.2, 0.6], dtype=DT))


# ---- greedy k-center -------------------------------------------------------------------------
def _covering_radius(pool: torch.Tensor, centres: torch.Tensor) -> float:
    return max(min(float(((x - c) ** 2).sum()) for c in centres) for x in pool)


@pytest.mark.parametrize("seed", range(5))
def test_kcenter_invariants(seed: int) -> None:
    g = _gen(seed)
    pool = torch.randn(15, 4, generator=g, dtype=DT)
    seeds = torch.randn(3, 4, generator=g, dtype=DT)
    picks = F.greedy_kcenter(pool, seeds, 6)
    assert len(set(picks.tolist())) == 6
    # covering radius (over the pool, centres = seeds ∪ picks so far) never grows
    radii = [_covering_radius(pool, seeds)]
    for k in range(1, 7):
        radii.append(_covering_radius(pool, torch.cat([seeds, pool[picks[:k]]])))
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(radii))
    # each pick is the farthest point from the current centres (explicit loop)
    centres = [s for s in seeds]
    for j in picks.tolist():
        dists = [min(float(((x - c) ** 2).sum()) for c in centres) for x in pool]
        assert dists[j] == pytest.approx(max(dists))
        centres.append(pool[j])


def test_kcenter_zero_seed_picks_largest_norm_first_and_ties_first_index() -> None:
    pool = torch.tensor([[1.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.5, 0.5]], dtype=DT)
    picks = F.greedy_kcenter(pool, torch.zeros(1, 2, dtype=DT), 2)
    assert picks[0] == 1  # norms 1, 3, 3, 0.7: tie between 1 and 2 -> first index
    assert picks[1] == 2  # farthest from (0, 3)
    # a picked point is never re-picked even when everything left is at distance 0
    dup = torch.ones(3, 2, dtype=DT)
    assert sorted(F.greedy_kcenter(dup, torch.ones(1, 2, dtype=DT), 3).tolist()) == [0, 1, 2]


def test_kcenter_seeds_are_kept_away_from() -> None:
    pool = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.1, 0.0]], dtype=DT)
    # the largest-norm point is a seed already: it is not picked first
    picks = F.greedy_kcenter(pool, torch.tensor([[5.0, 0.0]], dtype=DT), 1)
    assert picks.tolist() == [0]


def test_kcenter_normalized_option() -> None:
    pool = torch.tensor([[10.0, 0.0], [0.0, 1.0], [7.0, 0.5]], dtype=DT)
    # on the sphere (1,0) and (0.997, 0.07) are close: the second pick is (0,1)
    assert F.greedy_kcenter(pool, torch.zeros(1, 2, dtype=DT) + 1e-9, 2, normalized=True).tolist()[1] == 1


def test_kcenter_rejects_too_few_candidates() -> None:
    with pytest.raises(ValueError, match="at least k=3"):
        F.greedy_kcenter(torch.zeros(2, 2), torch.zeros(1, 2), 3)


# ---- pool layout / proxy assembly --------------------------------------------------------------
def test_pool_draws_rules() -> None:
    assert F.pool_draws(8, 12) == 12
    assert F.pool_draws(4, 4) == 4
    assert F.pool_draws(4, 2) == 8
    assert F.pool_draws(3, 1) == 3


def test_select_proxies_b1_takes_first_draws_and_layout() -> None:
    T, C, D, P = 3, 2, 2, 3
    draws = torch.arange(T * C * D, dtype=DT).view(T, C, D)
    got = F.select_proxies(draws, torch.zeros(1, C, D, dtype=DT), P, 1)
    assert torch.equal(got, draws[:P])
    flat = got.reshape(P * C, D)
    for k in range(P):
        for c in range(C):
            assert torch.equal(flat[k * C + c], draws[k, c])


def test_select_proxies_matches_per_class_kcenter() -> None:
    g = _gen(20)
    T, C, D, P = 6, 3, 4, 2
    draws = torch.randn(T, C, D, generator=g, dtype=DT)
    seeds = torch.randn(P, C, D, generator=g, dtype=DT)
    got = F.select_proxies(draws, seeds, P, T)
    for c in range(C):
        idx = F.greedy_kcenter(draws[:, c], seeds[:, c], P)
        assert torch.equal(got[:, c], draws[idx, c])


def test_assemble_proxies_layout() -> None:
    picks = [torch.full((2, 1), float(c)) + torch.tensor([[0.0], [0.5]]) for c in range(3)]
    flat = F.assemble_proxies(picks, C=3, P=2)
    for r in range(6):
        assert float(flat[r, 0]) == (r % 3) + 0.5 * (r // 3)


# ---- stage controller ------------------------------------------------------------------------
def _run(sc: F.StageController, values: list[float]) -> list[tuple[bool, bool]]:
    return [(e.snapshot, e.project) for e in (sc.step(v) for v in values)]


def test_stage_controller_small_improvement_is_not_improvement() -> None:
    sc = F.StageController(patience=2, min_delta=1e-5)
    ev = _run(sc, [0.5, 0.5 + 5e-6, 0.5 + 9e-6])
    assert ev == [(True, False), (False, False), (False, True)]
    assert sc.n_proj == 1 and sc.best == -math.inf and sc.ep_in_stage == 0


def test_stage_controller_projection_resets_so_next_round_snapshots() -> None:
    sc = F.StageController(patience=1)
    ev = _run(sc, [0.3, 0.2, 0.1, 0.05, 0.9])
    # stage 1: 0.3 snapshot, 0.2 -> project; stage 2: 0.1 snapshot (best reset), 0.05 -> project; 0.9 snapshot
    assert ev == [(True, False), (False, True), (True, False), (False, True), (True, False)]
    assert sc.n_proj == 2


def test_stage_controller_min_epochs() -> None:
    sc = F.StageController(patience=1, min_epochs=3)
    ev = _run(sc, [0.5, 0.4, 0.3, 0.2])
    assert [p for _, p in ev] == [False, False, True, False]


def test_stage_controller_lag_shifts_by_one_round() -> None:
    values = [0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3]
    fresh = _run(F.StageController(patience=2), values)
    lagged_sc = F.StageController(patience=2, lag=1)
    lagged = [lagged_sc.step(v) for v in values]
    assert [e.monitored for e in lagged] == [0.0] + values[:-1]
    # fresh projects at round 5 (index 4); lagged one round later
    assert [i for i, (_, p) in enumerate(fresh) if p] == [4]
    assert [i for i, e in enumerate(lagged) if e.project] == [5]
    # snapshots are one round late too (plus round 0, which sees v_{-1} = 0 at the start of stage 1)
    fresh_snaps = [i for i, (s, _) in enumerate(fresh) if s]
    assert fresh_snaps == [0, 1, 2, 5]
    assert [i for i, e in enumerate(lagged) if e.snapshot] == [0] + [i + 1 for i in fresh_snaps]


def test_stage_controller_state_roundtrip() -> None:
    a = F.StageController(patience=2, lag=1)
    _run(a, [0.1, 0.4, 0.2])
    b = F.StageController(patience=2, lag=1)
    b.load_state_dict(a.state_dict())
    rest = [0.2, 0.1, 0.3, 0.3, 0.3]
    assert _run(a, rest) == _run(b, rest)


def test_lam_schedule() -> None:
    assert F.lam_at(0, 2e-4, 1.0) == 0.0
    assert F.lam_at(1, 2e-4, 0.5) == 2e-4
    assert F.lam_at(3, 2e-4, 0.5) == pytest.approx(2e-4 * 0.25)
