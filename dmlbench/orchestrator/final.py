"""Final phase: the best params of a cell retrained with ``--final-seeds`` seeds and evaluated once
on the test split (``phase=final``).

Seed ``i`` trains on the training classes minus validation fold ``i mod folds`` and selects its
checkpoint (early stopping, CCP stages) on that fold, so nothing is ever selected on test data; with
as many seeds as folds this is the fold ensemble of the CCP protocol (one model per held-out fold).
"""

from __future__ import annotations

from typing import Any

from dmlbench.orchestrator.spec import Cell, SweepSpec, experiment_name
from dmlbench.orchestrator.trainable import TrainFn


def run_cell_final(
    spec: SweepSpec, cell: Cell, best_params: dict[str, Any], train_fn: TrainFn | None, out: Any
) -> None:
    """One Tune experiment per cell: a grid over the final seeds, no searcher, no pruning."""
    from ray import tune

    from dmlbench.orchestrator import sweep

    base = sweep.cell_base(spec, cell, "final")
    name = experiment_name(spec, cell, phase="final")
    writer = sweep._RowWriter(spec, cell, "final", base, out)
    trainable = sweep._trainable(spec, base, train_fn)
    seeds = sweep.final_seeds(spec)
    fold_of = {s: i % spec.folds for i, s in enumerate(seeds)}
    param_space = {
        **best_params,
        "seed": tune.grid_search(seeds),
        "fold": tune.sample_from(lambda config: fold_of[config["seed"]]),
    }

    def make() -> Any:
        return tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=spec.max_concurrent, reuse_actors=True),
            run_config=sweep._run_config(spec, name, [sweep._row_callback(writer)]),
        )

    sweep._fit(spec, name, make, trainable, writer)
