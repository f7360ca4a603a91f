"""Per-method search spaces (``<method>.yaml``) and the loader that turns them into Optuna calls."""

from dmlbench.search_spaces.loader import (
    SearchSpace,
    build_trial_config,
    load_space,
    load_space_file,
    parse_space,
)

__all__ = ["SearchSpace", "build_trial_config", "load_space", "load_space_file", "parse_space"]
