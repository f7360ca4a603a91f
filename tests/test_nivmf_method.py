"""The registered nivmf method: config validation, build, param groups, warm start, loss, state."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from dmlbench.config import TrialConfig
from dmlbench.engine.backbones import build_backbone
from dmlbench.errors import ConfigError, Diverged
from dmlbench.methods import METHODS, Batch, TrainContext
from dmlbench.methods.base import check_param_groups
from dmlbench.methods.nivmf import Nivmf

SMALL = {"backbone": "tiny", "pretrained": False, "image_size": 16, "embedding_dim": 16, "bn_policy": "train",
         "lr": 1e-3}


def make_cfg(params: dict[str, Any] | None = None, **trial: Any) -> TrialConfig:
    return TrialConfig.from_dict({"method": "nivmf", "dataset": "digits", **SMALL, **trial,
                                  "params": {"n_samples": 3, "temp": 0.1, **(params or {})}})


def build(cfg: TrialConfig, num_classes: int = 4) -> Nivmf:
    torch.manual_seed(0)
    return METHODS.get("nivmf").build(cfg, build_backbone(cfg), num_classes)  # type: ignore[return-value]


def batch(num_classes: int = 4, per_class: int = 2, size: int = 16) -> Batch:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return Batch([torch.rand(len(labels), 3, size, size, generator=g)], labels, torch.arange(len(labels)))


@pytest.mark.parametrize(("params", "match"), [
    ({"concentration": 0.0}, "concentration"),
    ({"concentration": -1.0}, "concentration"),
    ({"temp": 0.0}, "temp"),
    ({"temp": -0.1}, "temp"),
    ({"n_samples": 0}, "n_samples"),
    ({"subsample_p": 0.0}, "subsample_p"),
    ({"subsample_p": 1.5}, "subsample_p"),
    ({"kappa_min": 0.0}, "kappa_min"),
    ({"proxy_lr_mult": 0.0}, "proxy_lr_mult"),
    ({"log_cp": "bessel"}, "log_cp"),
    ({"tmp": 0.1}, "did you mean temp"),
])
def test_bad_params_raise_config_error_at_config_time(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_cfg(params)


@pytest.mark.parametrize(("dim", "mode", "match"), [(64, "code_poly", "128 or 512"), (4, "exact", "D >= 8"),
                                                    (4, "auto", "D >= 8")])
def test_log_cp_mode_unsafe_for_dim_is_a_config_error(dim: int, mode: str, match: str) -> None:
    # the check runs when the TrialConfig is built, before any data or model exists
    with pytest.raises(ConfigError, match=match):
        make_cfg({"log_cp": mode}, embedding_dim=dim)


@pytest.mark.parametrize(("dim", "mode"), [(128, "code_poly"), (512, "code_poly"), (64, "exact")])
def test_auto_log_cp_mode(dim: int, mode: str) -> None:
    assert build(make_cfg(embedding_dim=dim)).log_cp_mode == mode


def test_build_scales_head_and_initialises_proxies() -> None:
    cfg = make_cfg({"init_norm_multiplier": 7.0, "concentration": 3.0})
    torch.manual_seed(0)
    plain = build_backbone(cfg)
    method = build(cfg)
    assert torch.allclose(method.backbone.head.weight, plain.head.weight * 7.0)
    assert torch.equal(method.backbone.head.bias, plain.head.bias)  # the bias is untouched (spec §1.1)
    assert torch.equal(method.kappa_raw, torch.full((4, 16), 3.0))
    assert float(method.temperature().detach()) == pytest.approx(0.1)
    assert tuple(method.proxy_v.shape) == (4, 16)


@pytest.mark.parametrize("temp_learnable", [True, False])
def test_param_groups_cover_every_parameter_once_with_multipliers(temp_learnable: bool) -> None:
    method = build(make_cfg({"proxy_lr_mult": 10.0, "kappa_lr_mult": 20.0, "temp_lr_mult": 3.0,
                             "temp_learnable": temp_learnable}))
    groups = method.param_groups(1e-3)
    check_param_groups(method, groups)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == 1e-3 and "weight_decay" not in by_name["backbone"]
    assert by_name["proxies"]["params"] == [method.proxy_v] and by_name["proxies"]["lr"] == pytest.approx(1e-2)
    assert by_name["kappa"]["params"] == [method.kappa_raw] and by_name["kappa"]["lr"] == pytest.approx(2e-2)
    for name in ("proxies", "kappa"):
        assert by_name[name]["weight_decay"] == 0.0
    if temp_learnable:
        assert by_name["temp"]["lr"] == pytest.approx(3e-3) and by_name["temp"]["weight_decay"] == 0.0
    else:
        assert "temp" not in by_name and not method.temp_raw.requires_grad
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == sum(1 for p in method.parameters() if p.requires_grad)


def fake_ctx(method: Nivmf, embeds: torch.Tensor, labels: torch.Tensor, step: int = 0) -> TrainContext:
    return TrainContext(cfg=method.cfg, device=torch.device("cpu"), optimizer=torch.optim.SGD([method.proxy_v], lr=0.1),
                        train_loader=[], embed_train_pool=lambda n: torch.empty(0),
                        embed_train_set=lambda: (embeds, labels), step=step)


def test_warm_start_sets_proxies_to_class_mean_directions_once() -> None:
    method = build(make_cfg({"concentration": 5.0}), num_classes=3)
    g = torch.Generator().manual_seed(2)
    embeds = torch.randn(9, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    method.on_train_start(fake_ctx(method, embeds, labels))
    for c in range(3):
        mean = embeds[labels == c].mean(0)
        assert torch.allclose(method.proxy_v[c], 5.0 * mean / mean.norm(), atol=1e-6)
    before = method.proxy_v.detach().clone()
    method.on_train_start(fake_ctx(method, embeds * -1, labels))  # already initialised: no-op
    assert torch.equal(method.proxy_v, before)
    assert bool(method.state_dict()["proxies_initialised"])


def test_no_warm_start_keeps_random_init() -> None:
    method = build(make_cfg({"warm_start": False}))
    before = method.proxy_v.detach().clone()
    method.on_train_start(fake_ctx(method, torch.zeros(4, 16), torch.arange(4)))
    assert torch.equal(method.proxy_v, before)


@pytest.mark.parametrize("temp_param", ["raw", "log"])
def test_loss_backward_finite_on_every_parameter(temp_param: str) -> None:
    method = build(make_cfg({"temp_param": temp_param, "guidance_w": 0.5}))
    out = method.loss(batch())
    assert torch.isfinite(out.total) and out.total.dtype == torch.float32
    out.total.backward()
    for name, p in method.named_trainable():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    logs = out.logs()
    for key in ("el", "pa", "img_kappa_mean", "temp", "proxy_kappa_mean"):
        assert key in logs
    assert logs["loss"] == pytest.approx(logs["el"] + 0.5 * logs["pa"], rel=1e-5)


def test_loss_is_float32_under_bf16_autocast() -> None:
    method = build(make_cfg())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method.loss(batch())
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)


def test_embed_is_unit_norm_direction() -> None:
    method = build(make_cfg())
    images = batch().images
    emb = method.embed(images)
    raw = method.backbone(images)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(images)), atol=1e-5)
    assert torch.allclose(emb, raw / raw.norm(dim=-1, keepdim=True), atol=1e-6)


def test_non_positive_raw_temperature_is_reported_as_divergence() -> None:
    method = build(make_cfg())
    with torch.no_grad():
        method.temp_raw.fill_(-0.01)
    with pytest.raises(Diverged, match="step 7") as info:
        method.on_step_end(fake_ctx(method, torch.zeros(1, 16), torch.zeros(1, dtype=torch.long), step=7))
    assert info.value.terms["temp"] == pytest.approx(-0.01)


def test_sampler_rng_state_round_trips_through_a_weights_only_checkpoint() -> None:
    cfg = make_cfg()
    a = build(cfg)
    a.loss(batch())  # advances the sampler's generator
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "extra": a.extra_state()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b = build(cfg)
    b.load_state_dict(ckpt["model"])
    b.load_extra_state(ckpt["extra"])
    assert torch.equal(a.loss(batch()).total, b.loss(batch()).total)
    # without the restored state the next draw differs
    c = build(cfg)
    c.load_state_dict(ckpt["model"])
    assert not torch.equal(a.loss(batch()).total, c.loss(batch()).total)
    with pytest.raises(ValueError, match="unknown extra state"):
        b.load_extra_state({"bogus": 1})


def test_subsample_runs_in_method() -> None:
    method = build(make_cfg({"subsample_p": 0.5}), num_classes=12)
    out = method.loss(batch(num_classes=4))
    assert torch.isfinite(out.total)


def test_recommended_settings_validate() -> None:
    for dataset, embedded in (("cub200", False), ("cars196", False), ("digits", True)):
        rec = Nivmf.recommended(dataset, embedded)
        data = {"method": "nivmf", "dataset": dataset, **rec}
        if embedded:
            data.update(SMALL)
        cfg = TrialConfig.from_dict(data)
        Nivmf.check_config(cfg)
    assert Nivmf.recommended("sop", False) == {}  # no released recipe


def test_search_space_samples_validate_and_cover_the_tuned_parameters() -> None:
    import optuna

    from dmlbench.search_spaces.loader import build_trial_config, load_space

    space = load_space("nivmf")
    tuned = {"temp", "concentration", "init_norm_multiplier", "guidance_w", "proxy_lr_mult", "kappa_lr_mult",
             "temp_lr_mult", "n_samples", "lr_milestone_frac", "lr_gamma"}
    assert tuned <= set(space.names())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        values = space.define_by_run()(trial)
        values = {**trial.params, **values}
        cfg = build_trial_config({"method": "nivmf", "dataset": "cub200"}, values)
        Nivmf.check_config(cfg)
        assert cfg.lr == 1e-5 and cfg.samples_per_class == 2
        assert 2.0 <= cfg.params["concentration"] <= 50.0
        study.tell(trial, 0.0)


def test_configure_scheduler_milestone_fraction() -> None:
    method = build(make_cfg({"lr_milestone_frac": 0.25, "lr_gamma": 0.5}))
    opt = torch.optim.SGD([method.proxy_v], lr=1.0)
    sched = method.configure_scheduler(opt, epochs=8)
    assert sched is not None
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0, 1.0, 0.5, 0.5]
    assert build(make_cfg()).configure_scheduler(opt, 8) is None


def test_eval_embeddings_are_normalised_cosine_and_raw_euclidean() -> None:
    m = build(make_cfg()).eval()
    images = batch().images
    with torch.no_grad():
        out = m.embed_for_eval(images)
        raw = m.backbone(images).float()
    assert set(out) == {"", "euclidean_raw"}
    torch.testing.assert_close(out[""], torch.nn.functional.normalize(raw, dim=-1))
    torch.testing.assert_close(out["euclidean_raw"], raw)
    assert float(raw.norm(dim=1).std()) > 0  # the raw norms differ: euclidean is a different ranking
    assert m.eval_distances == {"euclidean_raw": "euclidean"} and m.eval_distance == "cosine"
    off = build(make_cfg({"eval_euclidean_raw": False})).eval()
    with torch.no_grad():
        assert set(off.embed_for_eval(images)) == {""}
