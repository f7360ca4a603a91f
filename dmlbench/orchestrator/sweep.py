"""``dmlbench sweep``, top to bottom: validate and plan (:mod:`.planning`), check a resumed sweep's
spec (:mod:`.sweepdir`), connect to Ray and decide the resources per trial (:mod:`.cluster`), run the
cells (:mod:`.scheduler`), then rebuild the leaderboard and print a per-cell summary (DESIGN §2, §5).

How a sweep ends: all cells have a complete trial → returns; some cell has none →
:class:`~dmlbench.errors.SweepIncomplete` naming the cells (exit 1); Ctrl-C → the whole sweep stops
(:mod:`.interrupts`), :class:`~dmlbench.errors.SweepInterrupted` (exit 130), and the same command
continues it; the cluster lost → one sentence from :func:`.cluster.watch` (exit 3), resumable too.

Ray is imported only once a sweep really starts (not for ``--dry-run`` or validation errors).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmlbench.errors import ConfigError, SweepIncomplete, SweepInterrupted
from dmlbench.orchestrator import cluster
from dmlbench.orchestrator.planning import build_spec, format_plan, plan, plan_json, validate
from dmlbench.orchestrator.spec import SweepSpec
from dmlbench.orchestrator.sweepdir import SWEEP_PROGRESS, check_resume, stamp_progress, sweep_dir, write_spec
from dmlbench.orchestrator.trainable import TrainFn
from dmlbench.results import schema, store

if TYPE_CHECKING:
    from dmlbench.orchestrator.experiment import CellOutcome

__all__ = ["Printer", "build_spec", "incomplete_cells", "run", "summary_table"]

Printer = Callable[[str], None]

#: Tune settings for a sweep driver: the legacy reporter (honours verbose=0), and the experiment
#: state saved at least every second (default: every ~10 s or more), so a driver killed right after
#: a trial finished does not restore that trial as unfinished (it would re-enter from its last
#: checkpoint). ``TUNE_GLOBAL_CHECKPOINT_S`` set by the user wins.
_TUNE_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_GLOBAL_CHECKPOINT_S": "1", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


@contextmanager
def _driver_settings() -> Iterator[None]:
    """Tune's legacy reporter (it honours verbose=0; the new one prints boxes per experiment) and
    Optuna's per-study INFO lines off; both restored on the way out."""
    import optuna

    old_env = {k: os.environ.get(k) for k in _TUNE_ENV}
    os.environ.update({k: v for k, v in _TUNE_ENV.items() if k not in os.environ or k == "RAY_AIR_NEW_OUTPUT"})
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(
    spec: SweepSpec,
    *,
    resume: bool = False,
    force: bool = False,
    dry_run: bool = False,
    plan_format: str = "text",
    train_fn: TrainFn | None = None,
    echo: Printer = print,
    num_cpus: int | None = None,
) -> list[CellOutcome]:
    """Run (or with ``dry_run`` only print) a sweep; returns what each cell produced.

    Raises :class:`SweepInterrupted` after Ctrl-C and :class:`SweepIncomplete` when some cell
    produced no complete trial (after the leaderboard and the summary are written). A dry run needs
    no dataset: it names the missing ones and prints the plan anyway, as text or
    (``plan_format="json"``) as one JSON object (:func:`planning.plan_json`).
    """
    if plan_format not in ("text", "json"):
        raise ConfigError(f"unknown plan format {plan_format!r}; use text or json.")
    cluster.join_address(spec)  # a ray:// or dashboard URL is refused before anything else
    missing = validate(spec, need_data=not dry_run)
    spec = check_resume(spec, resume, force)
    the_plan = plan(spec, missing)
    if dry_run and plan_format == "json":
        echo(json.dumps(plan_json(spec, the_plan), indent=2, sort_keys=False))
        return []
    echo(format_plan(spec, the_plan))
    if dry_run:
        echo("dry run: nothing started.")
        return []
    cluster.prepare_auth_for(spec)  # before Ray is imported
    from dmlbench.orchestrator import interrupts

    rows = sweep_dir(spec) / store.ROWS_DIR
    resume_hint = f"rerun the same command to continue (rows so far: {rows})."
    started = False
    with interrupts.handling(), _driver_settings():
        try:
            t_setup = time.time()
            started = cluster.connect(spec, num_cpus=num_cpus, echo=echo)
            nodes = cluster.node_capacity()
            spec = cluster.resolve_resources(spec, nodes)
            echo(f"{cluster.format_resources(spec)}; cluster: {cluster.cluster_summary(nodes)}")
            write_spec(spec)
            t0 = time.time()
            from dmlbench.orchestrator.scheduler import run_cells

            where = spec.address or os.environ.get("RAY_ADDRESS") or "the local Ray this sweep started"
            with cluster.watch(where, f"the sweep state is saved; {resume_hint}"):
                outcomes = run_cells(spec, train_fn, echo, setup_s=time.time() - t_setup)
            lb = store.rebuild_leaderboard(Path(spec.output))
            echo(summary_table(outcomes, spec))
            echo(f"done in {time.time() - t0:.0f} s; rows in {rows}, leaderboard {lb}")
        except (KeyboardInterrupt, SweepInterrupted) as err:
            n = len(list(rows.glob("*.parquet"))) if rows.is_dir() else 0
            why = "stopped by Ctrl-C" if interrupts.requested() or isinstance(err, KeyboardInterrupt) else str(err)
            raise SweepInterrupted(
                f"sweep {spec.sweep_id} {why.rstrip('.')}: {n} row(s) written, interrupted trials keep their last "
                f"checkpoint; {resume_hint}"
            ) from None
        finally:
            if started:
                import ray

                ray.shutdown()
            # when this run of the driver ended (dmlbench status then counts no more wrap-up), if it
            # got as far as starting its cells
            stamp_progress(sweep_dir(spec), SWEEP_PROGRESS, "ended", only_if="started")
    missing = incomplete_cells(outcomes, spec)
    if missing:
        raise SweepIncomplete(
            f"no complete trial in {len(missing)} of {len(outcomes)} cell(s): {'; '.join(missing)}; the rows' "
            f"error column says why (dmlbench leaderboard {spec.output} --format json, or dmlbench status {spec.output})."
        )
    return outcomes


def incomplete_cells(outcomes: list[CellOutcome], spec: SweepSpec) -> list[str]:
    """``cell (phase)`` for every cell whose search, or final phase, has no complete trial (a cell
    the protocol does not search, ``paper``, has only its final phase)."""
    from dmlbench.orchestrator.planning import cell_settings

    out = []
    for o in outcomes:
        done = {r[schema.PHASE] for r in o.rows.values() if r[schema.STATUS] == "complete"}
        searched = cell_settings(spec, o.cell).searched
        phases = (["search"] if searched else []) + (["final"] if spec.final_seeds or not searched else [])
        lacking = [ph for ph in phases if ph not in done]
        if lacking:
            out.append(f"{o.cell.key} ({' and '.join(lacking)})")
    return out


def summary_table(outcomes: list[CellOutcome], spec: SweepSpec) -> str:
    """Plain text: per cell, trial statuses, best val metric and the final test metric over seeds
    (each seed the mean of its fold models), in %, saying which spread it shows (95 % CI from 3
    seeds, else ± std with n; :func:`dmlbench.results.leaderboard.format_mean_spread`)."""
    import statistics

    from dmlbench.results.leaderboard import format_mean_spread

    head = (f"{'cell':<36} {'complete':>8} {'pruned':>6} {'diverged':>8} {'failed':>6} {'val ' + spec.metric + ' %':>16}"
            f"  {'test ' + spec.metric + ' %'}")  # fmt: skip
    lines = [head, "-" * (len(head) + 16)]
    for o in outcomes:
        search = [r for r in o.rows.values() if r[schema.PHASE] == "search"]
        counts = {s: sum(r[schema.STATUS] == s for r in search) for s in schema.STATUSES}
        # per seed, the mean of its fold models ("separate"; concatenated rows are another table)
        per_seed: dict[Any, list[float]] = {}
        for r in o.rows.values():
            if (r[schema.PHASE] == "final" and r[schema.STATUS] == "complete" and r.get(spec.metric) is not None
                    and "-concat" not in str(r[schema.PROTOCOL])):  # fmt: skip
                per_seed.setdefault(r[schema.SEED], []).append(float(r[spec.metric]))
        finals = [statistics.mean(v) for v in per_seed.values()]
        val = f"{100 * o.best_score:.2f}" if o.best_score is not None else "-"
        test = format_mean_spread(finals)
        lines.append(f"{o.cell.key:<36} {counts['complete']:>8} {counts['pruned']:>6} {counts['diverged']:>8} "
                     f"{counts['failed']:>6} {val:>16}  {test}")  # fmt: skip
    return "\n".join(lines)


