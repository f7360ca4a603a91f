"""Named presets: defaults for a whole sweep that explicit CLI options override.

``smoke`` is sized so that ``make sweep`` (nivmf, ccp, diva, proxyanchor × synthetic, digits:
8 cells) finishes in under 10 minutes on a 2-core CPU while still exercising the search (3 trials
per cell of one hold-out model each: ``search_folds 1``, rows labelled ``holdout``), ASHA pruning
(grace 1 epoch or what a method needs, 2 epochs, reduction 2) and the final phase (2 seeds x 3
fold models, plus their concatenated embedding).
"""

from __future__ import annotations

from typing import Any

from dmlbench.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "backbones": ("tiny",),
        "trials": 3,
        "epochs": 2,
        "grace_period": 1,
        "reduction_factor": 2,
        "final_seeds": 2,
        "folds": 3,
        "search_folds": 1,  # one model per search trial keeps the CPU smoke run short
        "recipe_wins": True,  # digits has 6 training classes: 3 folds of 2 classes
        "cpus_per_trial": 1.0,
        "gpus_per_trial": 0.0,
        "trial_base": {
            "pretrained": False,
            "image_size": 32,
            "embedding_dim": 32,
            "classes_per_batch": 4,
            "samples_per_class": 4,
            "iters_per_epoch": 4,
            "eval_batch_size": 128,
            "bn_policy": "train",
            "device": "cpu",
            "progress": False,
        },
    },
}


def preset_defaults(name: str | None) -> dict[str, Any]:
    """Spec defaults of a preset (a copy); ``None`` → ``{}``."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}.")
    out = dict(PRESETS[name])
    out["trial_base"] = dict(out.get("trial_base", {}))
    return out
