"""Every registered method (OML/timm habit): builds on a tiny backbone, one forward/backward gives a
finite loss and finite gradients on every trainable parameter, param groups cover each parameter
once, it has a search space, and a sampled point of that space validates as a TrialConfig."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
import torch

from dmlbench.config import TrialConfig
from dmlbench.engine.backbones import build_backbone
from dmlbench.engine.resolve import layered_config
from dmlbench.methods import METHODS, Batch
from dmlbench.methods.base import check_param_groups
from dmlbench.search_spaces.loader import build_trial_config, load_space

ALL = METHODS.names()


def _batch(n_views: int, classes: int = 4, per_class: int = 4, size: int = 32) -> Batch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(classes).repeat_interleave(per_class)
    views = [torch.rand(len(labels), 3, size, size, generator=g) for _ in range(n_views)]
    return Batch(views, labels, torch.arange(len(labels)))


@pytest.mark.parametrize("name", ALL)
def test_builds_and_backprops(name: str) -> None:
    cfg = layered_config(name, "digits", {"classes_per_batch": 4, "samples_per_class": 4})
    torch.manual_seed(0)
    cls = METHODS.get(name)
    method = cls.build(cfg, build_backbone(cfg), num_classes=4)
    groups = method.param_groups(cfg.lr)
    check_param_groups(method, groups)
    method.train()
    batch = _batch(cls.n_views)
    out = method.loss(batch)
    assert out.total.ndim == 0 and torch.isfinite(out.total)
    out.total.backward()
    for g in groups:
        for p in g["params"]:
            assert p.grad is not None, f"{name}: a parameter of group {g.get('name')!r} got no gradient"
            assert torch.isfinite(p.grad).all()
    assert any(float(p.grad.abs().sum()) > 0 for p in method.backbone.parameters() if p.grad is not None)
    method.eval()
    with torch.no_grad():
        emb = method.embed(batch.images)
    assert emb.shape[0] == len(batch.labels) and torch.isfinite(emb).all()


@pytest.mark.parametrize("name", ALL)
def test_search_space_samples_validate(name: str) -> None:
    space = load_space(name)
    assert space.method == name and space.params
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    base: dict[str, Any] = {"method": name, "dataset": "digits"}
    for _ in range(3):
        trial = study.ask()
        fixed = space.suggest(trial)
        cfg = build_trial_config(base, {**trial.params, **fixed})
        assert isinstance(cfg, TrialConfig)
        study.tell(trial, 0.0)
