"""The DiVA search space loads, samples valid TrialConfigs, and covers the spec's ranges (§3.2)."""

from __future__ import annotations

import optuna

from dmlbench.methods.diva import check_diva_config
from dmlbench.search_spaces.loader import build_trial_config, load_space


def test_space_matches_spec_ranges() -> None:
    space = load_space("diva")
    by_name = {p.name: p for p in space.params}
    assert set(by_name) == {"alpha_ssl", "alpha_shared", "alpha_intra", "rho", "dance_tau", "n_key_batches",
                            "lr_milestone_frac", "lr_gamma", "lr", "margin", "disc_weight"}
    for task in ("ssl", "shared", "intra"):  # one weight per auxiliary task (issue 5)
        p = by_name[f"alpha_{task}"]
        assert (p.low, p.high, p.log) == (0.05, 0.5, True)
    assert (by_name["lr"].low, by_name["lr"].high, by_name["lr"].log) == (5e-6, 5e-5, True)
    assert (by_name["margin"].low, by_name["margin"].high) == (0.1, 0.3)
    assert (by_name["rho"].low, by_name["rho"].high, by_name["rho"].log) == (50.0, 3000.0, True)
    assert tuple(by_name["dance_tau"].choices or ()) == (0.01, 0.03, 0.1)
    assert (by_name["n_key_batches"].low, by_name["n_key_batches"].high) == (10, 80)
    assert (by_name["lr_milestone_frac"].low, by_name["lr_milestone_frac"].high) == (0.15, 0.5)
    assert tuple(by_name["lr_gamma"].choices or ()) == (0.2, 0.3)
    # head weighting chosen on validation (issue 17); the embedding size is the sweep's, not the space's
    assert tuple(by_name["disc_weight"].choices or ()) == (0.5, 0.75, 1.0, 1.5)
    assert "embedding_dim" not in space.fixed and "lr" not in space.fixed


def test_sampled_points_are_valid_trial_configs() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space("diva")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        fixed = space.suggest(trial)
        cfg = build_trial_config({"method": "diva", "dataset": "digits"}, {**trial.params, **fixed})
        check_diva_config(cfg)
        hp = cfg.method_params()
        for task in ("ssl", "shared", "intra"):
            assert 0.05 <= getattr(hp, f"alpha_{task}") <= 0.5
        assert 50 <= hp.rho <= 3000 and 5e-6 <= cfg.lr <= 5e-5  # type: ignore[attr-defined, operator]
        assert cfg.classes_per_batch * cfg.samples_per_class == 112 and hp.disc_weight in (0.5, 0.75, 1.0, 1.5)
        study.tell(trial, 0.0)
