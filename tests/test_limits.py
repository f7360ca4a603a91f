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


def test_limiters_of_two_experiments_share_the_sweep_cap() -> None:
    limits.open_pool("sw", 3)
    try:
        a = CellLimiter(Counting(), 2, "sw", "exp-a")  # per cell: 2
        b = CellLimiter(Counting(), 5, "sw", "exp-b")
        assert a.suggest("a1") == {"i": 1} and a.suggest("a2") == {"i": 2}
        assert a.suggest("a3") is None  # the cell's own limit
        assert b.suggest("b1") == {"i": 1}
        assert b.suggest("b2") is None  # the sweep's: 3 in flight
        assert limits.in_flight("sw") == 3
        a.on_trial_complete("a1", {"m": 1.0})
        assert a.searcher.completed == ["a1"] and limits.in_flight("sw") == 2
        assert b.suggest("b2") == {"i": 2}  # the place a1 left
        assert a.suggest("a4") is None
        b.on_trial_complete("b1", error=True)  # an errored trial frees its place too
        assert a.suggest("a4") == {"i": 3}
        assert limits.in_flight("sw") == 3
    finally:
        limits.close_pool("sw")
    assert limits.in_flight("sw") is None


def test_without_an_open_pool_a_limiter_is_tunes_concurrency_limiter() -> None:
    lim = CellLimiter(Counting(), 2, "no-pool", "exp")
    assert lim.suggest("t1") and lim.suggest("t2") and lim.suggest("t3") is None
    lim.on_trial_complete("t1")
    assert lim.suggest("t3") == {"i": 3}


def test_a_restored_experiment_counts_its_trials_in_flight_before_it_suggests() -> None:
    """Tune saves ``get_state()`` with the experiment and calls ``set_state`` on the limiter it
    unpickles when the experiment is restored (a new driver: a new pool)."""
    limits.open_pool("sw2", 2)
    try:
        a = CellLimiter(Counting(), 4, "sw2", "exp-a")
        a.suggest("a1"), a.suggest("a2")
        saved = a.get_state()
        pickled = pickle.dumps(a)
    finally:
        limits.close_pool("sw2")
    limits.open_pool("sw2", 2)  # the resumed sweep
    try:
        other = CellLimiter(Counting(), 4, "sw2", "exp-b")
        restored = pickle.loads(pickled)
        restored.set_state(saved)
        assert limits.in_flight("sw2") == 2
        assert other.suggest("b1") is None  # the restored trials hold both places
        restored.on_trial_complete("a1")
        assert other.suggest("b1") == {"i": 1}
    finally:
        limits.close_pool("sw2")


def test_two_threads_never_exceed_the_cap() -> None:
    limits.open_pool("sw3", 5)
    lims = [CellLimiter(Counting(), 100, "sw3", f"exp-{i}") for i in range(4)]
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
