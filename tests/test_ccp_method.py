"""CCP method wiring: hooks, gradient pipeline, projection, checkpoint state (spec §6.2–6.3).

These tests drive the method through the trainer contract by hand (a few steps on random class-
dependent images, a scripted validation monitor), so they do not depend on the engine's loop.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from dmlbench.config import TrialConfig
from dmlbench.engine.backbones import build_backbone
from dmlbench.errors import ConfigError
from dmlbench.methods import METHODS, Batch, TrainContext
from dmlbench.methods.base import check_param_groups
from dmlbench.methods.ccp import CCP, CCPParams
from dmlbench.methods.ccp.functional import greedy_kcenter

C, D, SIZE = 4, 8, 16


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny tensors: one intra-op thread is faster than oversubscribing a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_cfg(**params: Any) -> TrialConfig:
    base = {"proxies_per_class": 2, "pool_size": 3, "lam": 1e-2, "stage_patience": 1, "iters_per_epoch": 3}
    base.update(params)
    return TrialConfig.from_dict(
        {
            "method": "ccp",
            "dataset": "synthetic",
            "backbone": "tiny",
            "pretrained": False,
            "embedding_dim": D,
            "image_size": SIZE,
            "bn_policy": "frozen_all",
            "weight_decay": 1e-4,
            "lr": 1e-3,
            "device": "cpu",
            "params": base,
        }
    )


def make_method(cfg: TrialConfig, seed: int = 0) -> CCP:
    torch.manual_seed(seed)
    m = METHODS.get("ccp").build(cfg, build_backbone(cfg), C)
    assert isinstance(m, CCP)
    return m


def images(labels: Tensor, gen: torch.Generator) -> Tensor:
    """Class-dependent colour plus noise (a fresh 'augmentation' on every call)."""
    colours = torch.linspace(0.1, 0.9, C)
    x = torch.rand(len(labels), 3, SIZE, SIZE, generator=gen) * 0.3
    return x + colours[labels].view(-1, 1, 1, 1)


def pool_fn(method: CCP, seed: int) -> Callable[[int], Tensor]:
    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def embed_train_pool(draws: int) -> Tensor:
        was = method.training
        method.eval()
        out = torch.stack([method.pool_embed(images(torch.arange(C), gen)) for _ in range(draws)])
        method.train(was)
        return out

    return embed_train_pool


def make_ctx(method: CCP, opt: torch.optim.Optimizer, seed: int = 1) -> TrainContext:
    def no_set() -> tuple[Tensor, Tensor]:
        raise AssertionError("ccp must not call embed_train_set")

    return TrainContext(method.cfg, torch.device("cpu"), opt, [], pool_fn(method, seed), no_set)


def make_opt(method: CCP) -> torch.optim.Optimizer:
    groups = method.param_groups(method.cfg.lr)
    check_param_groups(method, groups)
    return torch.optim.Adam(groups, lr=method.cfg.lr, eps=1e-7)


def train_step(method: CCP, opt: torch.optim.Optimizer, ctx: TrainContext, gen: torch.Generator) -> float:
    """One step in the trainer's order: loss, backward, hook, clip-norm 10, clip-value 10, step."""
    labels = torch.arange(3).repeat_interleave(2)
    batch = Batch([images(labels, gen)], labels, torch.arange(6))
    method.train()
    opt.zero_grad()
    out = method.loss(batch)
    out.total.backward()
    method.on_after_backward(ctx)
    nn.utils.clip_grad_norm_(method.parameters(), 10.0)
    nn.utils.clip_grad_value_(method.parameters(), 10.0)
    opt.step()
    method.on_step_end(ctx)
    ctx.step += 1
    return float(out.total.detach())


def run_epochs(
    method: CCP, opt: torch.optim.Optimizer, ctx: TrainContext, values: list[float], seed: int = 2
) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(seed)
    logs = []
    for v in values:
        for _ in range(method.iters_per_epoch() or 1):
            assert math.isfinite(train_step(method, opt, ctx, gen))
        ctx.epoch += 1
        ctx.val_metrics = {"map_at_r": v}
        with torch.no_grad():
            logs.append(method.on_epoch_end(ctx))
    return logs


# ---- construction ------------------------------------------------------------------------------
def test_head_is_bias_free_and_param_groups() -> None:
    m = make_method(make_cfg())
    assert m.backbone.head.bias is None and m.backbone.head.weight.shape == (D, m.backbone.feat_dim)
    assert m.proxies.shape == (2, C, D)
    groups = m.param_groups(1e-5)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and groups[0]["lr"] == 1e-5
    assert any(p is m.proxies for p in groups[0]["params"])
    assert groups[0]["betas"] == (0.9, 0.999)
    assert m.iters_per_epoch() == 3
    assert METHODS.get("ccp").eval_distance == "euclidean"
    # frozen_all: BN parameters are not trainable, so in no group and not decayed
    bn = [p for mod in m.modules() if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters()]
    assert bn and not any(p.requires_grad for p in bn)


def test_embed_is_unit_ball_projection() -> None:
    m = make_method(make_cfg())
    with torch.no_grad():
        m.backbone.head.weight.mul_(100.0)  # push raw norms above 1
        x = images(torch.arange(C), torch.Generator().manual_seed(0))
        raw = m.backbone(x)
        emb = m.embed(x)
    assert (raw.norm(dim=1) > 1).all()
    assert torch.allclose(emb.norm(dim=1), torch.ones(C), atol=1e-5)
    with torch.no_grad():
        m.backbone.head.weight.mul_(1e-4)  # now inside the ball: identity, not normalisation
        assert torch.allclose(m.embed(x), m.backbone(x))
        assert (m.embed(x).norm(dim=1) < 1).all()


def test_base_params_per_dataset_and_code_default() -> None:
    assert CCPParams(base_loss="ms").resolved_base_params("cars196")[0] == {
        "alpha": 14.35,
        "beta": 75.83,
        "base": 0.66,
    }
    assert CCPParams(base_loss="triplet").resolved_base_params("sop")[0] == {"margin": 0.0451}
    code = CCPParams(base_loss="ms", base_params="code_default").resolved_base_params("cars196")
    assert code == ({"alpha": 2.0, "beta": 50.0, "base": 0.5}, "code_default")
    assert CCPParams(base_loss="c2").resolved_base_params("digits") == (
        {"pos_margin": 0.0, "neg_margin": 0.5},
        "code_default",
    )
    m = make_method(make_cfg(base_loss="c1"))
    assert m.base_kwargs == {"margin": 0.5} and m.base_source == "code_default"


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"proxies_per_class": 5, "pool_size": 3}, "more proxies per class"),
        ({"lam": -1e-3}, "lam"),
        ({"base_loss": "npair"}, "'c1', 'c2', 'ms' or 'triplet'"),
        ({"pool_size": 0}, "pool_size"),
        ({"proxies_per_class": 0}, "proxies_per_class"),
        ({"stage_patience": 0}, "stage_patience"),
        ({"pool_size": 4, "pool_ratio": 1.5}, "either pool_size or pool_ratio"),
        ({"proxy_weight": 1.0}, "unknown key 'proxy_weight'"),
    ],
)
def test_bad_params_are_config_errors(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_cfg(**params)


def test_small_pool_expand_and_pool_ratio() -> None:
    p = CCPParams(proxies_per_class=4, pool_size=2, small_pool="expand")
    assert p.effective_pool_size == 2
    assert CCPParams(proxies_per_class=8, pool_ratio=1.5).effective_pool_size == 12
    assert CCPParams(proxies_per_class=4, pool_ratio=1.7).effective_pool_size == 7
    assert CCPParams().effective_pool_size == 12
    assert CCPParams(proxies_per_class=4, pool_size=1).effective_pool_size == 1  # b = 1 path is allowed


# ---- gradient pipeline -------------------------------------------------------------------------
def _fill_grads(m: CCP, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = {}
    for n, p in m.named_parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g)
            grads[n] = p.grad.clone()
    return grads


def test_stage_one_has_decay_but_no_proximal_term() -> None:
    m = make_method(make_cfg())
    opt = make_opt(m)
    ctx = make_ctx(m, opt)
    m.on_train_start(ctx)
    g0 = _fill_grads(m, 3)
    m.on_after_backward(ctx)
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, g0[n] + 1e-4 * p.detach()), n


def test_proximal_term_on_network_only_after_projection() -> None:
    m = make_method(make_cfg())
    opt = make_opt(m)
    ctx = make_ctx(m, opt)
    m.on_train_start(ctx)
    logs = run_epochs(m, opt, ctx, [0.5, 0.5])  # patience 1: project on round 2
    assert logs[1]["ccp/projected"] == 1.0 and m.lam == pytest.approx(1e-2)
    assert m.anchors is not None
    g0 = _fill_grads(m, 4)
    m.on_after_backward(ctx)
    net = dict(m.network_named())
    for (n, p), a in zip(m.network_named(), m.anchors):
        want = g0[f"backbone.{n}"] + 1e-2 * (p.detach() - a) + 1e-4 * p.detach()
        assert torch.allclose(p.grad, want, atol=1e-7), n
    assert any((p.detach() - a).abs().max() > 0 for p, a in zip(net.values(), m.anchors))
    assert torch.allclose(m.proxies.grad, g0["proxies"] + 1e-4 * m.proxies.detach())


def test_decay_is_applied_before_clipping() -> None:
    """A huge gradient on one tensor: clipping by norm then scales the decay term too."""
    m = make_method(make_cfg())
    opt = make_opt(m)
    ctx = make_ctx(m, opt)
    for p in m.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    m.proxies.grad.fill_(1e6)
    w = m.backbone.head.weight
    m.on_after_backward(ctx)
    total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in m.parameters() if p.grad is not None))
    nn.utils.clip_grad_norm_(m.parameters(), 10.0)
    nn.utils.clip_grad_value_(m.parameters(), 10.0)
    # decay before clipping: head grad = 1e-4 * w * 10 / total (1e-4 * w if decay came after)
    assert torch.allclose(w.grad.double(), 1e-4 * w.detach().double() * 10.0 / (total + 1e-6), rtol=1e-4)
    assert float(w.grad.abs().max()) < 1e-4 * float(w.detach().abs().max()) * 1e-3


def test_bn_parameters_are_not_decayed_when_trainable() -> None:
    cfg = make_cfg().replace(bn_policy="train")
    m = make_method(cfg)
    bn = [p for mod in m.modules() if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters()]
    assert all(p.requires_grad for p in bn)
    decayed = {id(p) for p in m.decay_params()}
    assert not any(id(p) in decayed for p in bn)
    assert id(m.proxies) in decayed and id(m.backbone.head.weight) in decayed


# ---- proxy init and stages ---------------------------------------------------------------------
def test_on_train_start_kcenter_with_zero_seed() -> None:
    m = make_method(make_cfg())
    opt = make_opt(m)
    ctx = make_ctx(m, opt, seed=5)
    m.on_train_start(ctx)
    draws = pool_fn(m, 5)(3)  # the same draws again (same generator seed, weights unchanged)
    for c in range(C):
        idx = greedy_kcenter(draws[:, c], torch.zeros(1, D), 2)
        assert torch.allclose(m.proxies[:, c], draws[idx, c])
        # first proxy of each class = largest raw norm in its pool
        assert torch.allclose(m.proxies[0, c], draws[draws[:, c].norm(dim=1).argmax(), c])
    assert m.lam == 0.0


def test_random_init_keeps_random_proxies() -> None:
    m = make_method(make_cfg(random_init=True))
    before = m.proxies.detach().clone()
    opt = make_opt(m)
    m.on_train_start(make_ctx(m, opt))
    assert torch.equal(before, m.proxies.detach())


@pytest.mark.parametrize("base_loss", ["c1", "c2", "ms", "triplet"])
@pytest.mark.parametrize("lag", [0, 1])
def test_smoke_projection_with_scripted_monitor(base_loss: str, lag: int) -> None:
    m = make_method(make_cfg(base_loss=base_loss, monitor_lag=lag))
    opt = make_opt(m)
    ctx = make_ctx(m, opt)
    m.on_train_start(ctx)
    # finite loss and gradients on backbone, head and proxies
    gen = torch.Generator().manual_seed(9)
    labels = torch.arange(3).repeat_interleave(2)
    out = m.loss(Batch([images(labels, gen)], labels, torch.arange(6)))
    out.total.backward()
    for n, p in [
        ("trunk", next(m.backbone.trunk.parameters())),
        ("head", m.backbone.head.weight),
        ("Q", m.proxies),
    ]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    opt.zero_grad()

    logs = run_epochs(m, opt, ctx, [0.4])
    assert m.lam == 0.0 and logs[0]["ccp/lambda"] == 0.0 and m.anchors is None
    snap_net = [t.clone() for t in m.best_net]
    q_before = m.proxies.detach().clone()
    state_before = opt.state[m.proxies]["exp_avg"].clone()
    net_before = [p.detach().clone() for _, p in m.network_named()]
    # constant monitor: with lag=0, round 2 does not improve -> projection (patience 1); with lag=1
    # round 2 sees round 1's 0.4 > 0 and snapshots, round 3 sees 0.4 again -> projection
    for _ in range(1 + lag):
        ctx.epoch += 1
        ctx.val_metrics = {"map_at_r": 0.4}
        logs.append(m.on_epoch_end(ctx))
        if lag and not logs[-1]["ccp/projected"]:
            snap_net = [t.clone() for t in m.best_net]
            net_before = [p.detach().clone() for _, p in m.network_named()]
    assert logs[-1]["ccp/projected"] == 1.0 and logs[-1]["ccp/n_projections"] == 1.0
    assert m.lam == pytest.approx(1e-2) and logs[-1]["ccp/lambda"] == pytest.approx(1e-2)
    assert all(torch.equal(a, s) for a, s in zip(m.anchors, snap_net))  # anchor == snapshot
    assert not torch.equal(m.proxies.detach(), q_before)  # proxies re-initialised
    assert all(torch.equal(p.detach(), b) for (_, p), b in zip(m.network_named(), net_before))  # not rewound
    assert torch.equal(opt.state[m.proxies]["exp_avg"], state_before)  # Adam state kept
    assert opt.param_groups[0]["params"][-1] is m.proxies  # same parameter object
    # seeds were the stage-best proxies
    assert m.best_q is not None
    with torch.no_grad():
        x = images(torch.arange(C), gen)
        assert (m.embed(x).norm(dim=1) <= 1 + 1e-6).all()
    run_epochs(m, opt, ctx, [0.5])  # training continues with the proximal term
    assert math.isfinite(float(m.proxies.detach().abs().sum()))


def test_projection_seeds_are_stage_best_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    m = make_method(make_cfg())
    opt = make_opt(m)
    ctx = make_ctx(m, opt, seed=11)
    m.on_train_start(ctx)
    run_epochs(m, opt, ctx, [0.6])  # snapshot at round 1
    best_q = m.best_q.clone()
    seen: list[Tensor] = []
    current: list[Tensor] = []
    original = m.reinit_proxies

    def spy(ctx_: TrainContext, seeds: Tensor) -> None:
        seen.append(seeds.clone())
        current.append(m.proxies.detach().clone())
        original(ctx_, seeds)

    monkeypatch.setattr(m, "reinit_proxies", spy)
    run_epochs(m, opt, ctx, [0.1], seed=3)  # no improvement: projection (patience 1)
    assert m.controller.n_proj == 1 and len(seen) == 1
    assert torch.equal(seen[0], best_q)
    assert not torch.equal(seen[0], current[0])  # the proxies moved since the snapshot


def test_reinit_proxies_is_kcenter_on_fresh_pool_with_given_seeds() -> None:
    m = make_method(make_cfg())
    ctx = make_ctx(m, make_opt(m), seed=13)
    seeds = torch.randn(2, C, D, generator=torch.Generator().manual_seed(0))
    m.reinit_proxies(ctx, seeds)
    draws = pool_fn(m, 13)(3)  # replay: same generator seed, same weights
    for c in range(C):
        idx = greedy_kcenter(draws[:, c], seeds[:, c], 2)
        assert torch.allclose(m.proxies[:, c], draws[idx, c])


def test_eval_at_start_round_is_not_a_stage_round() -> None:
    m = make_method(make_cfg())
    ctx = make_ctx(m, make_opt(m))
    ctx.epoch = 0
    ctx.val_metrics = {"map_at_r": 0.1}
    logs = m.on_epoch_end(ctx)
    assert logs["ccp/stage_epoch"] == 0.0 and m.best_net is None


def test_missing_monitor_is_a_clear_error() -> None:
    m = make_method(make_cfg())
    ctx = make_ctx(m, make_opt(m))
    ctx.epoch = 1
    ctx.val_metrics = {"r_precision": 0.1}
    with pytest.raises(ConfigError, match="stage monitor 'map_at_r'.*r_precision"):
        m.on_epoch_end(ctx)


# ---- checkpoint / resume -----------------------------------------------------------------------
def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_checkpoint_resume_continues_exactly() -> None:
    cfg = make_cfg(stage_patience=2)
    a = make_method(cfg)
    opt_a = make_opt(a)
    ctx_a = make_ctx(a, opt_a, seed=21)
    a.on_train_start(ctx_a)
    run_epochs(a, opt_a, ctx_a, [0.3, 0.2, 0.2, 0.4], seed=5)  # one projection at round 3
    assert a.controller.n_proj == 1

    ckpt = _roundtrip({"model": a.state_dict(), "opt": opt_a.state_dict(), "extra": a.extra_state()})
    b = make_method(cfg, seed=99)
    b.load_state_dict(ckpt["model"])
    opt_b = make_opt(b)
    opt_b.load_state_dict(ckpt["opt"])
    b.load_extra_state(ckpt["extra"])
    ctx_b = make_ctx(b, opt_b, seed=77)
    ctx_b.epoch, ctx_b.step = ctx_a.epoch, ctx_a.step
    b.on_train_start(ctx_b)  # restored: must not re-initialise the proxies
    assert torch.equal(b.proxies, a.proxies)
    assert b.controller.state_dict() == a.controller.state_dict() and b.lam == a.lam
    assert all(torch.equal(x, y) for x, y in zip(b.anchors, a.anchors))

    # continue both with identical data and pools: identical logs and weights
    a_pool = pool_fn(a, 31)
    ctx_a.embed_train_pool, ctx_b.embed_train_pool = a_pool, pool_fn(b, 31)
    la = run_epochs(a, opt_a, ctx_a, [0.25, 0.2, 0.1, 0.5], seed=6)
    lb = run_epochs(b, opt_b, ctx_b, [0.25, 0.2, 0.1, 0.5], seed=6)
    assert la == lb and a.controller.n_proj == 2
    assert torch.allclose(a.proxies, b.proxies)
    for (_, p), (_, q) in zip(a.network_named(), b.network_named()):
        assert torch.allclose(p, q)


def test_extra_state_is_plain() -> None:
    m = make_method(make_cfg())
    ctx = make_ctx(m, make_opt(m))
    m.on_train_start(ctx)
    st = m.extra_state()
    assert set(st) == {"initialised", "lam", "controller"}
    back = _roundtrip(st)
    assert back["controller"]["best"] == -math.inf


def test_pool_larger_than_a_class_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    m = make_method(make_cfg())
    ctx = make_ctx(m, make_opt(m))
    ctx.train_class_counts = [2, 10, 1, 10]  # type: ignore[attr-defined]  # b = 3 draws per class
    with caplog.at_level("WARNING", logger="dmlbench.methods.ccp.method"):
        m.on_train_start(ctx)
        m._warn_if_pool_reuses_images(ctx)
    msgs = [r.getMessage() for r in caplog.records if "reuse images" in r.getMessage()]
    assert (
        len(msgs) == 1 and "3 draws per class but 2 training classes" in msgs[0] and "smallest: 1" in msgs[0]
    )


def test_no_validation_fold_is_a_clear_error() -> None:
    cfg = make_cfg().replace(phase="final", fold=None)
    with pytest.raises(ConfigError, match="fold=None trains without a validation fold"):
        make_method(cfg)
