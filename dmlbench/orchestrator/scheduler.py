"""Scheduling of a sweep's cells on the connected Ray cluster: every cell at once, as one Tune
experiment.

The sweep's experiment (:mod:`dmlbench.orchestrator.experiment`) runs in a driver thread while this
thread keeps the live view: all cells' searches share the cluster side by side, a cell's final
phase starts the moment its own search ends while other cells still search, and a trial process
that finished any cell's trial takes the next one of any cell. Per cell nothing changes: its own
Optuna study (seeded per cell), ASHA scheduler, ``--max-concurrent`` and rows
(:mod:`dmlbench.orchestrator.multiplex`); ``--sweep-max-concurrent`` caps the trials of all cells
together. A rerun restores the experiment, so every cell continues whatever phase it was in.

Tune catches Ctrl-C only in the main thread; :func:`run_cells` therefore takes a ``stop`` event (set
by the caller's signal handling, or here on ``KeyboardInterrupt``) that ends the experiment at its
next step, then raises :class:`SweepInterrupted`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from dmlbench.errors import SweepInterrupted
from dmlbench.orchestrator import multiplex
from dmlbench.orchestrator.experiment import CellOutcome, run_sweep
from dmlbench.orchestrator.interrupts import stop_on
from dmlbench.orchestrator.spec import SweepSpec
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


def run_cells(
    spec: SweepSpec,
    train_fn: TrainFn | None,
    echo: Printer,
    *,
    stop: threading.Event | None = None,
    interactive: bool | None = None,
    setup_s: float = 0.0,
) -> list[CellOutcome]:
    """Search then final phase of every cell, all cells at once in the sweep's experiment; returns
    what each cell produced (in :meth:`SweepSpec.cells` order).

    Args:
        stop: set it (e.g. from a SIGINT handler) to stop the sweep: the experiment ends at its
            next step with its state saved (or does not start), and this raises
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
    slots = trial_slots(spec)
    write_progress(folder, SWEEP_PROGRESS, {"slots": slots, "started": time.time(), "cells": len(cells),
                                            "setup_s": setup_s})  # fmt: skip
    view = LiveView(spec, folder, echo, interactive)
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            view.say(text)

    errors: list[BaseException] = []
    say(f"{len(cells)} cell(s) in one Tune experiment: {', '.join(c.key for c in cells)}")
    multiplex.open_news(spec.sweep_id)
    try:
        with stop_on(spec.sweep_id, stop), ThreadPoolExecutor(1, thread_name_prefix="sweep") as pool:
            future: Future[None] = pool.submit(run_sweep, spec, train_fn, outcomes, slots)
            while True:
                try:
                    wait([future], timeout=REFRESH_S)
                    for line in multiplex.news(spec.sweep_id):
                        say(line)
                    with lock:
                        view.update()
                    if future.done():
                        err = future.exception()
                        if err is not None:
                            errors.append(err)
                        break
                except KeyboardInterrupt:
                    say("stopping: the sweep's experiment saves its state")
                    stop.set()
    finally:
        for line in multiplex.news(spec.sweep_id):
            say(line)
        multiplex.close_news(spec.sweep_id)
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
