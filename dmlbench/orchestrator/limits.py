"""How many trials run at once: per cell (``--max-concurrent``) and for the whole sweep
(``--sweep-max-concurrent``).

Tune limits concurrency per experiment, with a :class:`~ray.tune.search.ConcurrencyLimiter` around
the searcher; a sweep runs one experiment per cell at once, each in its own driver thread
(:mod:`.scheduler`), so a cap on the whole sweep has to be shared by experiments in different
threads. A trial only exists once its experiment's searcher suggested it (Tune starts every trial
that exists as soon as Ray has room; its trial scheduler cannot hold one back), so the cap sits in
the searcher:

* :class:`CellLimiter` is Tune's ``ConcurrencyLimiter`` (the per-cell limit) that, while the sweep
  has a :class:`SweepPool` open, suggests nothing more once the pool's trials in flight reach the cap;
* the pool counts, over the limiters of every experiment of the sweep, the trials they suggested and
  have not yet seen end (``ConcurrencyLimiter.live_trials``, which Tune saves with the experiment and
  restores on resume), so a restored experiment counts its resumed trials and no count can drift;
* a place freed by a cell's ending trial is held for that cell for a moment (:data:`HOLD_S`), unless
  it has no trial left to suggest: its next trial then takes over the process the ended one leaves
  (Tune keeps it cached for the cell), instead of another cell starting a new process while the
  cached one idles on its slot;
* :class:`SeedConfigs` hands out the final phase's trials (the best params with each final seed) as
  a searcher, so the final phase goes through the same limiter as the search.

A cell's own decisions do not depend on the cap beyond timing (when its next trial may start), which
ASHA and TPE's constant liar already see with parallel trials.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from ray.tune.search import ConcurrencyLimiter, Searcher

#: open pools by sweep id (one per running sweep in this driver)
_POOLS: dict[str, SweepPool] = {}
_POOLS_LOCK = threading.Lock()
#: seconds a place freed by a cell's ended trial stays that cell's (its Tune loop asks for the next
#: trial within one step, ~0.1 s, on a busy driver within a second)
HOLD_S = 2.0


class SweepPool:
    """The trials in flight of one sweep, over all its experiments, against its cap, and the places
    held for the experiment whose trial just ended."""

    def __init__(self, cap: int, clock: Any = time.monotonic):
        self.cap = cap
        self.lock = threading.Lock()
        self.limiters: dict[str, CellLimiter] = {}  # by experiment name: the one Tune calls now
        self.held: dict[str, list[float]] = {}  # experiment name -> until when each held place stays its
        self.clock = clock

    def in_flight(self) -> int:
        return sum(len(lim.live_trials) for lim in self.limiters.values())

    def free_for(self, experiment: str) -> int:
        """Places ``experiment`` may take now: the cap less the trials in flight and the places held
        for the other experiments (expired holds are dropped)."""
        now = self.clock()
        self.held = {e: kept for e, until in self.held.items() if (kept := [u for u in until if u > now])}
        others = sum(len(until) for e, until in self.held.items() if e != experiment)
        return self.cap - self.in_flight() - others

    def hold(self, experiment: str) -> None:
        self.held.setdefault(experiment, []).append(self.clock() + HOLD_S)

    def take_held(self, experiment: str) -> None:
        until = self.held.get(experiment)
        if until:
            until.pop(0)

    def drop_held(self, experiment: str) -> None:
        self.held.pop(experiment, None)


def open_pool(sweep_id: str, cap: int | None, clock: Any = time.monotonic) -> None:
    """Start counting the sweep's trials against ``cap`` (None: no sweep-wide cap). A pool left by an
    earlier run of the same sweep in this process (stopped, then resumed) is replaced: the restored
    experiments register their limiters again with what they restored."""
    with _POOLS_LOCK:
        _POOLS.pop(sweep_id, None)
        if cap is not None:
            _POOLS[sweep_id] = SweepPool(cap, clock)


def close_pool(sweep_id: str) -> None:
    with _POOLS_LOCK:
        _POOLS.pop(sweep_id, None)


def in_flight(sweep_id: str) -> int | None:
    """Trials of the sweep suggested and not yet ended, over all its experiments (None: no cap)."""
    pool = _POOLS.get(sweep_id)
    if pool is None:
        return None
    with pool.lock:
        return pool.in_flight()


class CellLimiter(ConcurrencyLimiter):
    """Tune's per-experiment ``ConcurrencyLimiter`` that also respects the sweep's pool (if open).

    Holds only plain data besides the searcher (the sweep id, the experiment name, its planned and
    suggested trial counts): Tune pickles it with the experiment and saves its ``live_trials`` and
    counts as search state; the pool is looked up by sweep id at each call.
    """

    def __init__(self, searcher: Searcher, max_concurrent: int, sweep_id: str, experiment: str, planned: int):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.sweep_id = sweep_id
        self.experiment = experiment
        self.planned = planned  # the experiment's trials (Tune's num_samples)
        self.suggested = 0  # saved and restored with the live trials (get_state/set_state)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        pool = _POOLS.get(self.sweep_id)
        if pool is None:
            return self._suggest(trial_id)
        with pool.lock:  # the check and the suggestion at once: two cells cannot both take the last place
            pool.limiters[self.experiment] = self
            if pool.free_for(self.experiment) <= 0:
                return None
            suggestion = self._suggest(trial_id)
            if suggestion in (None, Searcher.FINISHED):
                pool.drop_held(self.experiment)  # nothing to start now: the held places go back
            else:
                pool.take_held(self.experiment)
            return suggestion

    def _suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        suggestion = super().suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.suggested += 1
        return suggestion

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        pool = _POOLS.get(self.sweep_id)
        if pool is None:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        with pool.lock:
            ended = trial_id in self.live_trials
            super().on_trial_complete(trial_id, result=result, error=error)
            if ended and self.suggested < self.planned:
                pool.hold(self.experiment)

    def set_state(self, state: dict[str, Any]) -> None:
        """Tune restores the experiment's trials in flight: count them in the pool at once, before
        this experiment's first suggestion, so other cells do not take their places meanwhile."""
        super().set_state(state)
        pool = _POOLS.get(self.sweep_id)
        if pool is not None:
            with pool.lock:
                pool.limiters[self.experiment] = self


class SeedConfigs(Searcher):
    """The final phase's trials as a searcher: ``configs`` (the best params with each final seed), in
    order, then finished. Its position is saved with the experiment (JSON), so a restored final phase
    suggests no seed twice."""

    def __init__(self, configs: list[dict[str, Any]], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.configs = [dict(c) for c in configs]
        self.given = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.given >= len(self.configs):
            return Searcher.FINISHED
        self.given += 1
        return dict(self.configs[self.given - 1])

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        pass  # nothing to learn: the configs are fixed

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"configs": self.configs, "given": self.given}))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.configs, self.given = state["configs"], int(state["given"])
