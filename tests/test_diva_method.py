"""DiVA method wiring: one step on a tiny CPU backbone (spec shared/specs/diva.md §6.3)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from dmlbench.config import TrialConfig
from dmlbench.engine.backbones import build_backbone
from dmlbench.errors import ConfigError
from dmlbench.methods.base import Batch, TrainContext, check_param_groups
from dmlbench.methods.diva import DiVA, check_diva_config
from dmlbench.methods.diva.functional import dance_loss

PARAMS: dict[str, Any] = {
    "alpha": 0.3, "rho": [10, 10, 10], "dance_tau": 0.1, "n_key_batches": 2, "ema_momentum": 0.9,
    "decorr_hidden": 16, "lr_milestone_frac": 0.5, "lr_gamma": 0.3,
}


def make_cfg(**params: Any) -> TrialConfig:
    return TrialConfig.from_dict(
        {
            "method": "diva", "dataset": "synthetic", "backbone": "tiny", "pretrained": False,
            "embedding_dim": 32, "image_size": 16, "classes_per_batch": 4, "samples_per_class": 2,
            "epochs": 2, "lr": 1e-3, "seed": 0, "params": {**PARAMS, **params},
        }
    )


def make_batches(n: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.arange(4).repeat_interleave(2)
        views = [torch.rand(8, 3, 16, 16, generator=g) for _ in range(2)]
        out.append(Batch(views, labels, torch.arange(8)))
    return out


def build(**params: Any) -> DiVA:
    torch.manual_seed(0)
    cfg = make_cfg(**params)
    m = DiVA.build(cfg, build_backbone(cfg), num_classes=4)
    assert isinstance(m, DiVA)
    return m


def make_ctx(m: DiVA, loader: list[Batch]) -> TrainContext:
    opt = torch.optim.Adam(m.param_groups(m.cfg.lr))
    return TrainContext(
        cfg=m.cfg, device=torch.device("cpu"), optimizer=opt, train_loader=loader,
        embed_train_pool=lambda t: torch.zeros(0), embed_train_set=lambda: (torch.zeros(0), torch.zeros(0)),
    )


def one_step(m: DiVA, ctx: TrainContext, batch: Batch) -> dict[str, float]:
    ctx.optimizer.zero_grad()
    out = m.loss(batch)
    out.total.backward()
    ctx.optimizer.step()
    with torch.no_grad():
        m.on_step_end(ctx)
    return out.logs()


@pytest.mark.parametrize(
    "variant,shared", [("original", "random"), ("fixed", "standard"), ("original", "full")]
)
def test_one_step_grads_ema_queue(variant: str, shared: str) -> None:
    m = build(dance_variant=variant, shared_mode=shared)
    loader = make_batches(3)
    ctx = make_ctx(m, loader)
    check_param_groups(m, ctx.optimizer.param_groups)  # type: ignore[arg-type]
    key_ids = {id(p) for p in itertools.chain(m.key_backbone.parameters(), m.key_head.parameters())}
    assert not any(id(p) in key_ids for g in ctx.optimizer.param_groups for p in g["params"])
    with torch.no_grad():
        m.on_train_start(ctx)
    assert m.queue.keys.shape == (16, 8) and bool(m.queue.filled)
    assert torch.allclose(m.queue.keys.norm(dim=1), torch.ones(16), atol=1e-5)
    old_queue = m.queue.keys.clone()
    key0 = [p.clone() for p in itertools.chain(m.key_backbone.parameters(), m.key_head.parameters())]

    m.train()
    assert not m.key_backbone.training and not any(x.training for x in m.key_backbone.modules())
    assert not m.key_head.training
    batch = loader[0]
    with torch.no_grad():
        expected_keys = m.key_embed(batch.views[1])
    ctx.optimizer.zero_grad()
    out = m.loss(batch)
    assert torch.isfinite(out.total)
    for k in ("disc", "dance", "shared", "intra", "adv", "c/selfsimilarity->discriminative"):
        assert k in out.terms
    out.total.backward()
    for name, mod in [("backbone", m.backbone), *[(f"head {h}", m.heads[h]) for h in m.heads],
                      *[(f"mlp {d}", m.decorr[d]) for d in m.decorr]]:
        grads = [p.grad for p in mod.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    for h, beta in m.betas.items():
        assert beta.grad is not None and float(beta.grad.abs().sum()) > 0, h
    assert all(p.grad is None for p in itertools.chain(m.key_backbone.parameters(), m.key_head.parameters()))
    ctx.optimizer.step()
    with torch.no_grad():
        m.on_step_end(ctx)

    online = list(m.backbone.parameters()) + list(m.heads["selfsimilarity"].parameters())
    key = list(m.key_backbone.parameters()) + list(m.key_head.parameters())
    assert any(not torch.equal(k, o) for k, o in zip(key, online))
    for k, k0, o in zip(key, key0, online):
        assert torch.allclose(k, 0.9 * k0 + 0.1 * o, atol=1e-7)
    # FIFO: the 8 oldest rows dropped, this step's keys appended
    assert torch.equal(m.queue.keys[:8], old_queue[8:])
    assert torch.allclose(m.queue.keys[8:], expected_keys, atol=1e-6)


def test_loss_matches_manual_dance_term() -> None:
    m = build(alpha=0.0, features=["discriminative", "selfsimilarity"], rho=0.0, alpha_ssl=1.0)
    loader = make_batches(2)
    ctx = make_ctx(m, loader)
    with torch.no_grad():
        m.on_train_start(ctx)
    m.train()
    batch = loader[0]
    with torch.no_grad():
        heads = m.head_embeddings(batch.views[0])
        k = m.key_embed(batch.views[1])
        ref, _ = dance_loss(heads["selfsimilarity"], k, m.queue.keys, 0.1, "original")
    out = m.loss(batch)
    assert float(out.terms["dance"]) == pytest.approx(float(ref), rel=1e-5)  # type: ignore[arg-type]


def test_eval_embeddings_unit_norm_and_keys() -> None:
    m = build(paper_weights=True)
    m.eval()
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        e = m.embed(x)
        ev = m.embed_for_eval(x)
    assert e.shape == (5, 32)
    assert torch.allclose(e.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(ev[""], e)
    for h in ("discriminative", "selfsimilarity", "shared", "intra"):
        assert ev[f"head/{h}"].shape == (5, 8)
    for k in ("w0.5-1-1-1", "w0.75-1-1-1", "w1.5-1-1-1", "w0.5-2-2-2", "w0.75-1.25-1.25-1.25"):
        assert k in ev and torch.allclose(ev[k].norm(dim=1), torch.ones(5), atol=1e-5)
    # weighting by hand: 0.5·disc, others 1
    parts = [0.5 * ev["head/discriminative"]] + [ev[f"head/{h}"] for h in ("selfsimilarity", "shared", "intra")]
    manual = torch.cat(parts, 1)
    assert torch.allclose(ev["w0.5-1-1-1"], manual / manual.norm(dim=1, keepdim=True), atol=1e-6)


def test_param_groups_lrs_relative_to_base() -> None:
    m = build()
    groups = {g["name"]: g for g in m.param_groups(1e-5)}
    assert groups["backbone+heads"]["lr"] == 1e-5 and groups["backbone+heads"]["weight_decay"] == m.cfg.weight_decay
    for h in ("discriminative", "shared", "intra"):
        assert groups[f"beta/{h}"]["lr"] == pytest.approx(5e-4) and groups[f"beta/{h}"]["weight_decay"] == 0.0
    assert groups["decorrelation"]["lr"] == pytest.approx(1e-5) and groups["decorrelation"]["weight_decay"] == 0.0
    opt = torch.optim.Adam(m.param_groups(1.0))
    sched = m.configure_scheduler(opt, 10)
    assert sched is not None
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0] * 5 + [0.3])  # milestone 0.5 × 10 = epoch 5, gamma 0.3


def test_resume_reproduces_next_step_exactly(tmp_path: Any) -> None:
    loader = make_batches(4)
    m1 = build()
    ctx1 = make_ctx(m1, loader)
    with torch.no_grad():
        m1.on_train_start(ctx1)
    m1.train()
    one_step(m1, ctx1, loader[0])
    path = tmp_path / "ck.pt"
    torch.save({"model": m1.state_dict(), "opt": ctx1.optimizer.state_dict(), "extra": m1.extra_state()}, path)
    logs_a = one_step(m1, ctx1, loader[1])
    queue_a = m1.queue.keys.clone()

    m2 = build()
    ctx2 = make_ctx(m2, loader)
    ck = torch.load(path, weights_only=True)
    m2.load_state_dict(ck["model"])
    ctx2.optimizer.load_state_dict(ck["opt"])
    m2.load_extra_state(ck["extra"])
    with torch.no_grad():
        m2.on_train_start(ctx2)  # queue restored: must not be refilled
    m2.train()
    logs_b = one_step(m2, ctx2, loader[1])
    assert logs_a == pytest.approx(logs_b, rel=1e-6)
    assert torch.allclose(m2.queue.keys, queue_a)


def test_baseline_single_head_has_no_key_net() -> None:
    m = build(features=["discriminative"], rho=[])
    assert not m.use_dance and not m.directions
    out = m.loss(make_batches(1)[0])
    assert torch.isfinite(out.total) and set(out.terms) == {"disc", "disc_active"}
    assert m.embed_for_eval(torch.rand(2, 3, 16, 16)).keys() == {""}


def test_eval_variants_can_be_switched_off() -> None:
    m = build(eval_heads=False, eval_disc_weights=[])
    assert m.embed_for_eval(torch.rand(2, 3, 16, 16)).keys() == {""}
    m = build(eval_heads=False, eval_disc_weights=[0.5])
    assert m.embed_for_eval(torch.rand(2, 3, 16, 16)).keys() == {"", "w0.5-1-1-1"}


@pytest.mark.parametrize(
    "params,changes,match",
    [
        ({"rho": [1.0, 2.0]}, {}, "rho has 2 values but there are 3"),
        ({"rho": -1.0}, {}, "rho must be ≥ 0"),
        ({"dance_tau": 0.0}, {}, "dance_tau"),
        ({"features": ["selfsimilarity"]}, {}, "must include 'discriminative'"),
        ({"directions": ["intra->shared"], "rho": 1.0, "features": ["discriminative", "shared"]}, {}, "intra->shared"),
        ({}, {"samples_per_class": 1}, "at least 2 samples per class"),
        ({}, {"embedding_dim": 30}, "not a multiple of 4"),
        ({}, {"schedule": "multistep", "milestones": [3]}, "supplies its own MultiStepLR"),
    ],
)
def test_bad_config_raises_one_clear_config_error(params: dict[str, Any], changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        cfg = make_cfg(**params)
        if changes:
            cfg = cfg.replace(**changes)
        check_diva_config(cfg)
        DiVA.build(cfg, build_backbone(cfg), 4)


def test_queue_fill_reiterates_a_short_loader() -> None:
    m = build(n_key_batches=3)
    ctx = make_ctx(m, make_batches(2))  # 2 batches per pass, 3 needed
    with torch.no_grad():
        m.on_train_start(ctx)
    assert m.queue.keys.shape == (24, 8)
    assert torch.allclose(m.queue.keys[:8], m.queue.keys[16:])  # third batch = first again
