"""The sweep-wide cap's bookkeeping (``orchestrator.limits``), without Ray: limiters of several
experiments share one pool; Tune's save/restore of a limiter (its ``get_state``/``set_state``) counts
the restored trials in flight; the final phase's seeds as a searcher, saved and restored."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from dmlbench.orchestrator import limits
from dmlbench.orchestrator.limits import CellLimiter, SeedConfigs


class Counting(Searcher):
    """Suggests {"i": n} for the n-th call; records what it was told."""

    def __init__(self) -> None:
        super().__init__(metric="m", mode="max")
        self.n = 0
        self.completed: list[str] = []

    def suggest(self, trial_id: str) -> dict[str, Any]:
        self.n += 1
        return {"i": self.n}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self.completed.append(trial_id)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_limiters_of_two_experiments_share_the_sweep_cap() -> None:
    clock = Clock()
    limits.open_pool("sw", 3, clock)
    try:
        a = CellLimiter(Counting(), 2, "sw", "exp-a", 10)  # per cell: 2
        b = CellLimiter(Counting(), 5, "sw", "exp-b", 10)
        assert a.suggest("a1") == {"i": 1} and a.suggest("a2") == {"i": 2}
        assert a.suggest("a3") is None  # the cell's own limit
        assert b.suggest("b1") == {"i": 1}
        assert b.suggest("b2") is None  # the sweep's: 3 in flight
        assert limits.in_flight("sw") == 3
        a.on_trial_complete("a1", {"m": 1.0})
        assert a.searcher.completed == ["a1"] and limits.in_flight("sw") == 2
        assert b.suggest("b2") is None  # the place a1 left is held for a's next trial (its cached process)
        clock.t += limits.HOLD_S + 0.1
        assert b.suggest("b2") == {"i": 2}  # a did not take it in time: anyone may
        assert a.suggest("a4") is None
        b.on_trial_complete("b1", error=True)  # an errored trial frees its place too
        assert a.suggest("a4") is None  # held for b
        assert b.suggest("b3") == {"i": 3}  # b takes its own held place
        assert limits.in_flight("sw") == 3
    finally:
        limits.close_pool("sw")
    assert limits.in_flight("sw") is None


def test_a_held_place_goes_back_when_its_cell_cannot_use_it() -> None:
    clock = Clock()
    limits.open_pool("swh", 2, clock)
    try:
        a = CellLimiter(Counting(), 1, "swh", "exp-a", 10)  # a cell limited to 1 at a time
        b = CellLimiter(Counting(), 5, "swh", "exp-b", 10)
        last = CellLimiter(Counting(), 5, "swh", "exp-last", 1)  # one trial planned in all
        assert a.suggest("a1") and last.suggest("l1") and b.suggest("b1") is None
        last.on_trial_complete("l1")  # its experiment has nothing more to run: nothing is held
        assert b.suggest("b1") == {"i": 1}
        a.on_trial_complete("a1")
        assert b.suggest("b2") is None  # held for a
        a.max_concurrent = 0  # a's own limit now refuses: its suggestion is None, the hold goes back
        assert a.suggest("a2") is None
        assert b.suggest("b2") == {"i": 2} and limits.in_flight("swh") == 2
    finally:
        limits.close_pool("swh")


def test_without_an_open_pool_a_limiter_is_tunes_concurrency_limiter() -> None:
    lim = CellLimiter(Counting(), 2, "no-pool", "exp", 10)
    assert lim.suggest("t1") and lim.suggest("t2") and lim.suggest("t3") is None
    lim.on_trial_complete("t1")
    assert lim.suggest("t3") == {"i": 3}


def test_a_restored_experiment_counts_its_trials_in_flight_before_it_suggests() -> None:
    """Tune saves ``get_state()`` with the experiment and calls ``set_state`` on the limiter it
    unpickles when the experiment is restored (a new driver: a new pool)."""
    limits.open_pool("sw2", 2)
    try:
        a = CellLimiter(Counting(), 4, "sw2", "exp-a", 2)  # both its trials suggested: it holds no place
        a.suggest("a1"), a.suggest("a2")
        saved = a.get_state()
        pickled = pickle.dumps(a)
    finally:
        limits.close_pool("sw2")
    limits.open_pool("sw2", 2)  # the resumed sweep
    try:
        other = CellLimiter(Counting(), 4, "sw2", "exp-b", 10)
        restored = pickle.loads(pickled)
        restored.set_state(saved)
        assert limits.in_flight("sw2") == 2
        assert other.suggest("b1") is None  # the restored trials hold both places
        assert restored.suggested == 2  # restored too
        restored.on_trial_complete("a1")
        assert other.suggest("b1") == {"i": 1}
    finally:
        limits.close_pool("sw2")


def test_two_threads_never_exceed_the_cap() -> None:
    limits.open_pool("sw3", 5)
    lims = [CellLimiter(Counting(), 100, "sw3", f"exp-{i}", 10_000) for i in range(4)]
    peak = [0]
    lock = threading.Lock()

    def work(lim: CellLimiter, name: str) -> None:
        for n in range(200):
            tid = f"{name}-{n}"
            if lim.suggest(tid) is not None:
                with lock:
                    peak[0] = max(peak[0], limits.in_flight("sw3") or 0)
                lim.on_trial_complete(tid)

    try:
        threads = [threading.Thread(target=work, args=(lim, f"t{i}")) for i, lim in enumerate(lims)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 1 <= peak[0] <= 5 and limits.in_flight("sw3") == 0
    finally:
        limits.close_pool("sw3")


def test_seed_configs_are_suggested_once_each_across_a_restore(tmp_path: Path) -> None:
    s = SeedConfigs([{"lr": 0.1, "seed": 1000}, {"lr": 0.1, "seed": 1001}], "map_at_r", "max")
    assert s.suggest("t1") == {"lr": 0.1, "seed": 1000}
    s.save(str(tmp_path / "state.json"))
    again = SeedConfigs([], "map_at_r", "max")
    again.restore(str(tmp_path / "state.json"))
    assert again.suggest("t2") == {"lr": 0.1, "seed": 1001}
    assert again.suggest("t3") == Searcher.FINISHED
