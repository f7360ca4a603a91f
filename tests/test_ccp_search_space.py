"""The CCP search space matches spec §3.3 and every sampled point is a valid trial."""

from __future__ import annotations

import optuna
import pytest

from dmlbench.methods.ccp import CCPParams
from dmlbench.search_spaces.loader import build_trial_config, load_space


def test_space_has_the_spec_ranges() -> None:
    space = load_space("ccp")
    got = {p.name: (p.type, p.low, p.high, p.log) for p in space.params}
    assert got == {
        "lam": ("float", 1e-5, 1e-1, True),
        "proxies_per_class": ("int", 1, 16, False),
        "pool_ratio": ("float", 1.0, 2.0, False),
        "stage_patience": ("int", 2, 5, False),
        "batch_term_weight": ("float", 0.0, 0.3, False),
    }
    assert space.fixed == {"grad_clip_norm": 10.0, "grad_clip_value": 10.0, "adam_eps": 1e-7}


@pytest.mark.parametrize("dataset", ["cub200", "digits"])
def test_sampled_points_validate_and_pool_covers_proxies(dataset: str) -> None:
    space = load_space("ccp")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        fixed = space.suggest(trial)
        cfg = build_trial_config({"method": "ccp", "dataset": dataset}, {**trial.params, **fixed})
        hp = CCPParams.model_validate(cfg.params)
        p, b = hp.proxies_per_class, hp.effective_pool_size
        assert p <= b <= 2 * p  # b in [P, 2P]: never the "more proxies than candidates" error
        assert cfg.grad_clip_norm == 10.0 and cfg.adam_eps == 1e-7
        study.tell(trial, 0.0)
