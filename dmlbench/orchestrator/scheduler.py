"""Scheduling of a sweep's cells on the connected Ray cluster: every cell at once.

Each cell runs in its own driver thread: its search experiment, then, when the search has a
complete trial, its final phase (:mod:`dmlbench.orchestrator.experiment`). So all cells' searches
share the cluster side by side, and a cell's final phase starts the moment its own search ends while
other cells still search; Ray's resource scheduling hands free slots to whichever experiment has a
trial waiting. Per cell nothing changes: its own Tune experiment, Optuna study (seeded per cell),
ASHA scheduler, ``--max-concurrent`` and rows, and a rerun restores each cell from its own
experiment state, whatever phase it was in. ``--sweep-max-concurrent`` caps the trials of all cells
together (:mod:`.limits`): the pool it counts against is open while :func:`run_cells` runs.

Why a thread per cell, not one Ray actor per cell or one Tune experiment for the whole sweep: the
per-cell experiments (and their restore paths) stay exactly what a sequential sweep ran, rows and
progress files are written by this process (an actor could land on a node without the results
folder), and no Tune searcher/scheduler has to be multiplexed across cells. The one thing Tune does
only in the main thread is catch Ctrl-C; :func:`run_cells` therefore takes a ``stop`` event (set by
the caller's signal handling, or here on ``KeyboardInterrupt``) that ends every running experiment
at its next step and starts no new one, then raises :class:`SweepInterrupted`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

from dmlbench.errors import SweepInterrupted
from dmlbench.orchestrator import limits
from dmlbench.orchestrator.experiment import CellOutcome, run_final, run_search
from dmlbench.orchestrator.interrupts import stop_on
from dmlbench.orchestrator.planning import cell_settings
from dmlbench.orchestrator.spec import Cell, SweepSpec
from dmlbench.orchestrator.sweepdir import SWEEP_PROGRESS, sweep_dir, write_progress
from dmlbench.orchestrator.trainable import TrainFn

Printer = Callable[[str], None]
log = logging.getLogger(__name__)

#: seconds between two refreshes of the live view
REFRESH_S = 1.0


def trial_slots(spec: SweepSpec) -> int | None:
    """How many trials the sweep runs at once: the connected cluster's room (GPUs or CPUs per trial),
    at most ``--sweep-max-concurrent``; None without Ray."""
    import ray

    if not ray.is_initialized():
        return None
    res = ray.cluster_resources()
    if spec.gpus_per_trial:
        slots = int(res.get("GPU", 0.0) // spec.gpus_per_trial)
    else:
        slots = int(res.get("CPU", 0.0) // (spec.cpus_per_trial or 1.0))
    if spec.sweep_max_concurrent:
        slots = min(slots, spec.sweep_max_concurrent)
    return slots or None


def run_cell(spec: SweepSpec, cell: Cell, train_fn: TrainFn | None, say: Printer, out: CellOutcome) -> None:
    """One cell: its search, then its final phase (if it has final seeds and a complete search trial);
    a cell without a search (the paper protocol: the recipe) runs only its final seeds."""
    if not cell_settings(spec, cell).searched:
        say(f"{cell.key}: recipe, {spec.final_seeds} seed(s)")
        run_final(spec, cell, {}, train_fn, out)
        say(f"done {cell.key}")
        return
    say(f"search {cell.key}: {spec.trials} trial(s)")
    run_search(spec, cell, train_fn, out)
    if not spec.final_seeds:
        say(f"done {cell.key}")
        return
    if out.best_params is None:
        say(f"no complete search trial in {cell.key}: final phase skipped")
        return
    say(f"final {cell.key}: best val {spec.metric}={out.best_score:.4f}, {spec.final_seeds} seed(s)")
    run_final(spec, cell, out.best_params, train_fn, out)
    say(f"done {cell.key}")


def run_cells(
    spec: SweepSpec,
    train_fn: TrainFn | None,
    echo: Printer,
    *,
    stop: threading.Event | None = None,
    interactive: bool | None = None,
    setup_s: float = 0.0,
) -> list[CellOutcome]:
    """Search then final phase of every cell, all cells at once; returns what each cell produced
    (in :meth:`SweepSpec.cells` order).

    Args:
        stop: set it (e.g. from a SIGINT handler) to stop the sweep: no new experiment starts,
            running ones end at their next step with their state saved, and this raises
            :class:`SweepInterrupted`. A ``KeyboardInterrupt`` in this thread sets it too.
        interactive: live view on a terminal (default: when stdout is one), else plain lines.
        setup_s: how long the driver took to start or join Ray (the ETA's stand-in for its
            wrap-up after the last trial; :mod:`dmlbench.orchestrator.status`).
    """
    from dmlbench.orchestrator.status import LiveView

    cells = spec.cells()
    stop = stop if stop is not None else threading.Event()
    outcomes = {cell: CellOutcome(cell) for cell in cells}
    folder = sweep_dir(spec)
    write_progress(folder, SWEEP_PROGRESS, {"slots": trial_slots(spec), "started": time.time(), "cells": len(cells),
                                            "setup_s": setup_s})  # fmt: skip
    view = LiveView(spec, folder, echo, interactive)
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            view.say(text)

    errors: list[BaseException] = []
    limits.open_pool(spec.sweep_id, spec.sweep_max_concurrent)
    try:
        with stop_on(spec.sweep_id, stop), ThreadPoolExecutor(len(cells), thread_name_prefix="cell") as pool:
            futures: set[Future[None]] = {pool.submit(run_cell, spec, c, train_fn, say, outcomes[c]) for c in cells}
            while futures:
                try:
                    done, futures = wait(futures, timeout=REFRESH_S, return_when=FIRST_EXCEPTION)
                    for f in done:
                        err = f.exception()
                        if err is not None:
                            errors.append(err)
                            stop.set()  # one cell failed outside its trials: stop the others, resumable
                    with lock:
                        view.update()
                except KeyboardInterrupt:
                    say("stopping: every running experiment saves its state")
                    stop.set()
    finally:
        limits.close_pool(spec.sweep_id)
        view.close()
    real = [e for e in errors if not isinstance(e, SweepInterrupted)]
    if real:
        raise real[0]
    if stop.is_set() or errors:
        raise SweepInterrupted(
            "sweep interrupted; rerun the same command (or add --resume) to continue where it stopped: "
            "finished trials are kept, unfinished ones continue from their checkpoints."
        )
    return [outcomes[c] for c in cells]
