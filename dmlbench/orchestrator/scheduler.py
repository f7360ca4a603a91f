"""Scheduling of a sweep's cells on the connected Ray cluster: which cell's experiment runs when.

Each cell runs its search experiment, then (when it has a complete search trial) its final phase
(:mod:`dmlbench.orchestrator.experiment`). Today the cells run one after another, in
:meth:`SweepSpec.cells` order; a ``SweepInterrupted`` from any experiment stops the whole sweep.
"""

from __future__ import annotations

from collections.abc import Callable

from dmlbench.orchestrator.experiment import CellOutcome, run_final, run_search
from dmlbench.orchestrator.planning import cell_settings
from dmlbench.orchestrator.spec import SweepSpec
from dmlbench.orchestrator.trainable import TrainFn

Printer = Callable[[str], None]


def run_cells(spec: SweepSpec, train_fn: TrainFn | None, echo: Printer) -> list[CellOutcome]:
    """Search then final phase of every cell; returns what each cell produced."""
    cells = spec.cells()
    outcomes: list[CellOutcome] = []
    for i, cell in enumerate(cells, 1):
        out = CellOutcome(cell)
        if not cell_settings(spec, cell).searched:  # the paper protocol: the recipe, no search
            echo(f"[{i}/{len(cells)}] {cell.key}: recipe, {spec.final_seeds} seed(s)")
            run_final(spec, cell, {}, train_fn, out)
            outcomes.append(out)
            continue
        echo(f"[{i}/{len(cells)}] search {cell.key} ({spec.trials} trials)")
        run_search(spec, cell, train_fn, out)
        if spec.final_seeds:
            if out.best_params is None:
                echo(f"  no complete search trial in {cell.key}: final phase skipped")
            else:
                echo(f"  final {cell.key}: best val {spec.metric}={out.best_score:.4f}, {spec.final_seeds} seed(s)")
                run_final(spec, cell, out.best_params, train_fn, out)
        outcomes.append(out)
    return outcomes
