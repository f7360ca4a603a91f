"""Every cell's trials in one Tune experiment: which trial the sweep starts next, and which trials ASHA
stops, decided per cell.

A sweep is one Tune experiment (:mod:`.experiment`), because Tune hands a trial's process to the
next trial only inside one experiment (``reuse_actors``): with one experiment per cell and phase,
each cell phase started processes of its own (imports, CUDA set-up), and a cell's processes ended
with its experiment. Here a process that finished any cell's trial takes the next trial of any cell.

What stays per cell, exactly as when each cell was an experiment of its own:

* :class:`SweepSearcher` keeps one searcher per cell (Optuna TPE, seeded per cell, its own study),
  asks it only for that cell's trials and tells it only their results; the cell's final phase (the
  best complete search trial's params with each final seed) starts when the last of its search
  trials ended, and is skipped when none completed; ``--max-concurrent`` caps each cell phase's
  trials in flight, ``--sweep-max-concurrent`` those of all cells together (the values the driver
  runs with now, :func:`set_limits`: a resumed sweep applies changed ones);
* :class:`CellSchedulers` gives each cell's search trials to that cell's ASHA (rungs, cut-offs);
  final trials are never stopped.

Every trial's config carries its cell and phase (:data:`~.trainable.ROUTE_KEYS`), which is how the
scheduler, the trainable (:func:`~.trainable.run_routed_trial`) and the rows find its cell. Cells
with a final trial to start go first (the final phase ends a cell's chain); otherwise cells take
turns (round robin). The searcher's state, with every cell's study and counts, is saved by Tune with
the experiment and restored on resume.
"""

from __future__ import annotations

import base64
import json
import queue
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from dmlbench.orchestrator.rows import search_score
from dmlbench.orchestrator.trainable import CELL_KEY, PHASE_KEY, route_of

SEARCH, FINAL = "search", "final"

#: by sweep id: what the sweep's searcher has to say (a cell's search ended, its final phase
#: started or was skipped, the cell is done), read by the driver's live view (:func:`news`)
_NEWS: dict[str, queue.SimpleQueue[str]] = {}


def open_news(sweep_id: str) -> None:
    _NEWS[sweep_id] = queue.SimpleQueue()


def close_news(sweep_id: str) -> None:
    _NEWS.pop(sweep_id, None)


def news(sweep_id: str) -> list[str]:
    """The lines said since the last call (none when the sweep's news are not open)."""
    q, out = _NEWS.get(sweep_id), []
    while q is not None and not q.empty():
        out.append(q.get_nowait())
    return out


def _say(sweep_id: str, text: str) -> None:
    q = _NEWS.get(sweep_id)
    if q is not None:
        q.put(text)


@dataclass(frozen=True)
class Limits:
    """Trials in flight at most: of all cells (``cap``), of a cell's search, of a cell's final phase
    (None: no limit; a cell phase never has more in flight than it has trials)."""

    cap: int | None = None
    search: int | None = None
    final: int | None = None


#: by sweep id: the limits of the driver's current run (the spec it was started with), which win
#: over those a restored searcher was built with, so a changed ``--max-concurrent`` or
#: ``--sweep-max-concurrent`` applies to a resumed sweep
_LIMITS: dict[str, Limits] = {}


def set_limits(sweep_id: str, limits: Limits | None) -> None:
    if limits is None:
        _LIMITS.pop(sweep_id, None)
    else:
        _LIMITS[sweep_id] = limits


@dataclass
class CellTrials:
    """One cell's trials and where they stand (plain data and the cell's searcher).

    Args:
        key: the cell's key (what the news name).
        slug: the cell's slug (what its trials' configs carry).
        search: the cell's searcher; None for a cell that is not searched (the paper protocol trains
            its recipe: its final phase starts at once, with no params).
        trials: search trials planned.
        seeds: the final phase's seeds (empty: no final phase).
    """

    key: str
    slug: str
    search: Searcher | None
    trials: int
    seeds: list[int]
    suggested: dict[str, int] = field(default_factory=lambda: {SEARCH: 0, FINAL: 0})
    ended: dict[str, int] = field(default_factory=lambda: {SEARCH: 0, FINAL: 0})
    #: the best complete search trial so far: its score and params
    best_score: float | None = None
    best_params: dict[str, Any] | None = None

    def search_over(self) -> bool:
        return self.search is None or self.ended[SEARCH] >= self.trials

    def final_params(self) -> dict[str, Any] | None:
        """The params of the final phase once the search is over (None: none completed, or no search over yet)."""
        if not self.search_over():
            return None
        return {} if self.search is None else self.best_params

    def done(self) -> bool:
        """Nothing left to suggest or to wait for."""
        if not self.search_over():
            return False
        if not self.seeds or self.final_params() is None:
            return True
        return self.ended[FINAL] >= len(self.seeds)

    def in_flight(self, phase: str) -> int:
        return self.suggested[phase] - self.ended[phase]

    def next_trial(self, trial_id: str, limits: Limits) -> tuple[str, dict[str, Any]] | None:
        """The cell's next trial (phase, config), or None when it has none to start now."""
        if self.search is not None and self.suggested[SEARCH] < self.trials:
            if limits.search is not None and self.in_flight(SEARCH) >= limits.search:
                return None
            config = self.search.suggest(trial_id)
            if not isinstance(config, dict):
                return None
            self.suggested[SEARCH] += 1
            return SEARCH, config
        params = self.final_params()  # waits for the cell's last search trial to end
        if params is None or self.suggested[FINAL] >= len(self.seeds):
            return None
        if limits.final is not None and self.in_flight(FINAL) >= limits.final:
            return None
        seed = self.seeds[self.suggested[FINAL]]
        self.suggested[FINAL] += 1
        return FINAL, {**params, "seed": seed}


class SweepSearcher(Searcher):
    """Tune searcher of a whole sweep: each cell's trials from that cell's own searcher, then its final
    seeds (see the module doc); finished when every cell is done.

    Args:
        cells: the cells' trials, in the sweep's cell order.
        metric, mode: the validation metric the cells' searchers read (Tune checks reports for it).
        limits: trials in flight at most; those set for the sweep's id by :func:`set_limits` win.
        sweep_id: the sweep (its news, :func:`news`, and its limits).
    """

    def __init__(self, cells: list[CellTrials], metric: str, mode: str, limits: Limits = Limits(), sweep_id: str = ""):
        super().__init__(metric=metric, mode=mode)
        self.sweep_id = sweep_id
        self.cells = {c.slug: c for c in cells}
        self.order = [c.slug for c in cells]
        self.limits = limits
        self.routes: dict[str, tuple[str, str]] = {}  # trial id -> (cell slug, phase)
        self.live: set[str] = set()  # suggested, not yet ended
        self.configs: dict[str, dict[str, Any]] = {}  # search trials in flight: the params they got
        self.turn = 0  # the cell asked first next time

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any) -> bool:
        return True  # every cell's searcher was built with the sweep's metric and mode

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]  # Searcher.FINISHED is a str
        limits = _LIMITS.get(self.sweep_id, self.limits)
        if limits.cap is not None and len(self.live) >= limits.cap:
            return None
        n = len(self.order)
        # final trials first (a cell's final phase is the end of its chain), then cells take turns
        turns = [self.order[(self.turn + i) % n] for i in range(n)]
        for slug in [c for c in turns if self.cells[c].search_over()] + turns:
            got = self.cells[slug].next_trial(trial_id, limits)
            if got is None:
                continue
            phase, config = got
            if phase == SEARCH:
                self.turn = (self.order.index(slug) + 1) % n
            self.routes[trial_id] = (slug, phase)
            self.live.add(trial_id)
            if phase == SEARCH:
                self.configs[trial_id] = dict(config)
            return {**config, CELL_KEY: slug, PHASE_KEY: phase}
        return Searcher.FINISHED if all(c.done() for c in self.cells.values()) else None

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        slug, phase = self.routes.get(trial_id, ("", ""))
        cell = self.cells.get(slug)
        if cell is not None and phase == SEARCH and cell.search is not None:
            cell.search.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id not in self.live:
            return  # told twice, or not ours
        self.live.discard(trial_id)
        slug, phase = self.routes[trial_id]
        cell = self.cells[slug]
        cell.ended[phase] += 1
        if phase == SEARCH and cell.search is not None:
            cell.search.on_trial_complete(trial_id, result=result, error=error)
            params = self.configs.pop(trial_id, {})
            score = None if error or not result else search_score(result, str(self.metric))
            sign = 1.0 if self.mode == "max" else -1.0
            if score is not None and (cell.best_score is None or sign * score > sign * cell.best_score):
                cell.best_score, cell.best_params = score, params
            if cell.search_over() and cell.seeds:
                if cell.best_params is None:
                    _say(self.sweep_id, f"no complete search trial in {cell.key}: final phase skipped")
                else:
                    _say(self.sweep_id, f"final {cell.key}: best val {self.metric}={cell.best_score:.4f}, "
                                        f"{len(cell.seeds)} seed(s)")  # fmt: skip
        if cell.done():
            _say(self.sweep_id, f"done {cell.key}")

    def save(self, checkpoint_path: str) -> None:
        """JSON: the counts, routes and bests, and each cell's searcher in its own saved form (base64)."""
        state = {
            "routes": self.routes, "live": sorted(self.live), "configs": self.configs, "turn": self.turn,
            "cells": {slug: {"suggested": c.suggested, "ended": c.ended, "best_score": c.best_score,
                             "best_params": c.best_params,
                             "search": _saved(c.search) if c.search is not None else None}
                      for slug, c in self.cells.items()},
        }  # fmt: skip
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.routes = {t: (str(r[0]), str(r[1])) for t, r in state["routes"].items()}
        self.live, self.configs, self.turn = set(state["live"]), state["configs"], int(state["turn"])
        for slug, saved in state["cells"].items():
            cell = self.cells[slug]
            cell.suggested, cell.ended = saved["suggested"], saved["ended"]
            cell.best_score, cell.best_params = saved["best_score"], saved["best_params"]
            if cell.search is not None and saved["search"] is not None:
                _restore(cell.search, saved["search"])


def _saved(searcher: Searcher) -> str:
    """A searcher's own save (Optuna's: a pickle of its study, written by Ray's OptunaSearch), as text."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "searcher"
        searcher.save(str(path))
        return base64.b64encode(path.read_bytes()).decode("ascii")


def _restore(searcher: Searcher, saved: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "searcher"
        path.write_bytes(base64.b64decode(saved))
        searcher.restore(str(path))


class CellSchedulers(FIFOScheduler):
    """Tune trial scheduler of a whole sweep: each cell's search trials go to that cell's own ASHA
    (``schedulers``, by cell slug); final trials, and cells without one, run to their end. Trials
    start first come, first served (FIFO, as ASHA's)."""

    def __init__(self, schedulers: Mapping[str, TrialScheduler]):
        super().__init__()
        self.schedulers = dict(schedulers)

    def _of(self, trial: Any) -> TrialScheduler | None:
        config = trial.config or {}
        if config.get(PHASE_KEY) != SEARCH:
            return None
        return self.schedulers.get(str(config.get(CELL_KEY)))

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # every cell's ASHA was built with the sweep's metric and mode

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if (s := self._of(trial)) is not None:
            s.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        if (s := self._of(trial)) is not None:
            s.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if (s := self._of(trial)) is not None:
            return s.on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        if (s := self._of(trial)) is not None:
            s.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        if (s := self._of(trial)) is not None:
            s.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"Using one ASHA per searched cell ({len(self.schedulers)}), FIFO otherwise."


def route(trial: Any) -> str | None:
    """A Tune trial's part key (cell slug/phase), from its config."""
    return route_of(dict(trial.config or {}))
