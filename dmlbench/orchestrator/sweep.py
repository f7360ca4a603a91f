"""``dmlbench sweep``, top to bottom: validate and plan (:mod:`.planning`), check a resumed sweep's
spec (:mod:`.sweepdir`), connect to Ray (:mod:`.cluster`), run the cells (:mod:`.scheduler`), then
rebuild the leaderboard and print a per-cell summary (DESIGN §2, §5).

Ray is imported only once a sweep really starts (not for ``--dry-run`` or validation errors).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dmlbench.orchestrator import cluster
from dmlbench.orchestrator.planning import build_spec, format_plan, plan, validate
from dmlbench.orchestrator.spec import SweepSpec
from dmlbench.orchestrator.sweepdir import check_resume, sweep_dir, write_spec
from dmlbench.orchestrator.trainable import TrainFn
from dmlbench.results import schema, store

if TYPE_CHECKING:
    from dmlbench.orchestrator.experiment import CellOutcome

__all__ = ["Printer", "build_spec", "run", "summary_table"]

Printer = Callable[[str], None]

#: Tune settings for a sweep driver: the legacy reporter (honours verbose=0), and the experiment
#: state saved at least every second (default: every ~10 s or more), so a driver killed right after
#: a trial finished does not restore that trial as unfinished (it would re-enter from its last
#: checkpoint). ``TUNE_GLOBAL_CHECKPOINT_S`` set by the user wins.
_TUNE_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_GLOBAL_CHECKPOINT_S": "1", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


def run(
    spec: SweepSpec,
    *,
    resume: bool = False,
    force: bool = False,
    dry_run: bool = False,
    train_fn: TrainFn | None = None,
    echo: Printer = print,
    num_cpus: int | None = None,
) -> list[CellOutcome]:
    """Run (or with ``dry_run`` only print) a sweep; returns what each cell produced."""
    validate(spec)
    spec = check_resume(spec, resume, force)
    echo(format_plan(spec, plan(spec)))
    if dry_run:
        echo("dry run: nothing started.")
        return []
    import optuna

    # Tune's legacy reporter honours verbose=0 (the new one prints boxes per experiment); Optuna's
    # per-study INFO lines are noise here. Both are restored on the way out.
    old_env = {k: os.environ.get(k) for k in _TUNE_ENV}
    os.environ.update({k: v for k, v in _TUNE_ENV.items() if k not in os.environ or k == "RAY_AIR_NEW_OUTPUT"})
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = cluster.connect(spec, num_cpus=num_cpus)
    try:
        cluster.check_resources(spec, cluster.node_capacity())
        write_spec(spec)
        t0 = time.time()
        from dmlbench.orchestrator.scheduler import run_cells

        outcomes = run_cells(spec, train_fn, echo)
        lb = store.rebuild_leaderboard(Path(spec.output))
        echo(summary_table(outcomes, spec))
        echo(f"done in {time.time() - t0:.0f} s; rows in {sweep_dir(spec) / store.ROWS_DIR}, leaderboard {lb}")
        return outcomes
    finally:
        optuna.logging.set_verbosity(verbosity)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if started:
            import ray

            ray.shutdown()


def summary_table(outcomes: list[CellOutcome], spec: SweepSpec) -> str:
    """Plain text: per cell, trial statuses, best val metric, final test mean ± std over seeds."""
    import statistics

    head = f"{'cell':<36} {'complete':>8} {'pruned':>6} {'diverged':>8} {'failed':>6} {'val ' + spec.metric:>14} {'test ' + spec.metric:>18}"
    lines = [head, "-" * len(head)]
    for o in outcomes:
        search = [r for r in o.rows.values() if r[schema.PHASE] == "search"]
        counts = {s: sum(r[schema.STATUS] == s for r in search) for s in schema.STATUSES}
        finals = [r.get(spec.metric) for r in o.rows.values()
                  if r[schema.PHASE] == "final" and r[schema.STATUS] == "complete" and r.get(spec.metric) is not None]  # fmt: skip
        val = f"{o.best_score:.4f}" if o.best_score is not None else "-"
        if len(finals) >= 2:
            test = f"{statistics.mean(finals):.4f}±{statistics.stdev(finals):.4f}"
        elif finals:
            test = f"{finals[0]:.4f}"
        else:
            test = "-"
        lines.append(f"{o.cell.key:<36} {counts['complete']:>8} {counts['pruned']:>6} {counts['diverged']:>8} "
                     f"{counts['failed']:>6} {val:>14} {test:>18}")  # fmt: skip
    return "\n".join(lines)


