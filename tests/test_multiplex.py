"""Every cell's trials as one Tune searcher and one trial scheduler (``orchestrator.multiplex``),
without Ray: each cell's searcher sees only its own trials, a cell's final phase starts after its own
search with its best complete trial's params, the per-cell and sweep-wide caps, the state saved and
restored mid-sweep, and each cell's search trials going to that cell's ASHA only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from dmlbench.orchestrator import multiplex
from dmlbench.orchestrator.multiplex import CellSchedulers, CellTrials, Limits, SweepSearcher
from dmlbench.orchestrator.trainable import CELL_KEY, PHASE_KEY, STATUS_KEY, SUMMARY_KEY


class Counting(Searcher):
    """Suggests {"i": n} for its n-th suggestion; records the trials it was told about."""

    def __init__(self) -> None:
        super().__init__(metric="m", mode="max")
        self.n = 0
        self.results: list[str] = []
        self.completed: list[str] = []

    def suggest(self, trial_id: str) -> dict[str, Any]:
        self.n += 1
        return {"i": self.n}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.results.append(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self.completed.append(trial_id)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps([self.n, self.results, self.completed]))

    def restore(self, checkpoint_path: str) -> None:
        self.n, self.results, self.completed = json.loads(Path(checkpoint_path).read_text())


def complete(score: float) -> dict[str, Any]:
    """The last report of a search trial that ran to its end (what the trainable reports)."""
    return {"m": score, STATUS_KEY: "complete", SUMMARY_KEY: json.dumps({"metrics": {"m": score}})}


def cell(key: str, trials: int = 2, seeds: tuple[int, ...] = (7, 8), searched: bool = True) -> CellTrials:
    return CellTrials(key, key, Counting() if searched else None, trials if searched else 0, list(seeds))


def take(s: SweepSearcher, trial_id: str) -> tuple[str, str, dict[str, Any]] | None | str:
    """(cell, phase, params) of the next suggestion; None or FINISHED as the searcher said."""
    got = s.suggest(trial_id)
    if not isinstance(got, dict):
        return got
    params = {k: v for k, v in got.items() if k not in (CELL_KEY, PHASE_KEY)}
    return got[CELL_KEY], got[PHASE_KEY], params


def test_each_cell_searches_on_its_own_and_its_final_phase_follows_its_own_search() -> None:
    s = SweepSearcher([cell("a"), cell("b"), cell("c", trials=4)], "m", "max", Limits(search=2))
    # cells take turns
    got = [take(s, f"t{i}") for i in range(1, 7)]
    assert got == [("a", "search", {"i": 1}), ("b", "search", {"i": 1}), ("c", "search", {"i": 1}),
                   ("a", "search", {"i": 2}), ("b", "search", {"i": 2}), ("c", "search", {"i": 2})]  # fmt: skip
    assert take(s, "t7") is None  # a and b gave all their search trials, c has 2 in flight
    s.on_trial_result("t1", {"m": 0.1})
    s.on_trial_complete("t1", complete(0.3))
    assert take(s, "t7") is None  # no final phase before a's search ended: t4 runs
    s.on_trial_complete("t3", complete(0.5))
    assert take(s, "t7") == ("c", "search", {"i": 3})
    s.on_trial_complete("t4", complete(0.6))
    s.on_trial_complete("t6", complete(0.5))
    # each cell's searcher heard of its own trials only
    a, b, c = (s.cells[k].search for k in "abc")
    assert a.results == ["t1"] and a.completed == ["t1", "t4"] and b.completed == [] and c.completed == ["t3", "t6"]
    # a's final phase (its best complete trial's params with each seed) goes before c's next search trial
    assert take(s, "t8") == ("a", "final", {"i": 2, "seed": 7})
    assert take(s, "t9") == ("a", "final", {"i": 2, "seed": 8})
    assert take(s, "t10") == ("c", "search", {"i": 4})
    assert take(s, "t11") is None and s.cells["a"].best_score == 0.6
    for t, score in (("t2", 0.5), ("t5", 0.4)):
        s.on_trial_complete(t, complete(score))
    assert take(s, "t11") == ("b", "final", {"i": 1, "seed": 7})
    assert take(s, "t12") == ("b", "final", {"i": 1, "seed": 8})
    for t in ("t7", "t10"):
        s.on_trial_complete(t, complete(0.1))
    assert [take(s, t) for t in ("t13", "t14", "t15")] == [("c", "final", {"i": 1, "seed": 7}),
                                                           ("c", "final", {"i": 1, "seed": 8}), None]  # fmt: skip
    for t in ("t8", "t9", "t11", "t12", "t13"):
        s.on_trial_complete(t, {"m": 0.5})
    assert take(s, "t15") is None  # t14 still runs
    s.on_trial_complete("t14", {"m": 0.5})
    s.on_trial_complete("t14", {"m": 0.5})  # told twice: counted once
    assert take(s, "t15") == Searcher.FINISHED


@pytest.mark.parametrize("mode", ["max", "min"])
def test_best_is_the_best_complete_trial_pruned_and_errored_ones_never(mode: str) -> None:
    s = SweepSearcher([cell("a", trials=4)], "m", mode)
    for t in ("t1", "t2", "t3", "t4"):
        take(s, t)
    s.on_trial_complete("t1", complete(0.5))  # {"i": 1}
    s.on_trial_complete("t2", {"m": 0.9 if mode == "max" else 0.1})  # pruned by ASHA: no final report
    s.on_trial_complete("t3", error=True)
    s.on_trial_complete("t4", complete(0.4))  # {"i": 4}
    assert take(s, "t5") == ("a", "final", {"i": 1 if mode == "max" else 4, "seed": 7})


def test_a_cell_without_a_complete_search_trial_skips_its_final_phase(tmp_path: Path) -> None:
    multiplex.open_news("sw")
    try:
        s = SweepSearcher([cell("a"), cell("b", trials=1)], "m", "max", sweep_id="sw")
        assert [take(s, t)[:2] for t in ("t1", "t2", "t3")] == [("a", "search"), ("b", "search"), ("a", "search")]
        s.on_trial_complete("t1", error=True)
        s.on_trial_complete("t3", {"m": 0.2})  # pruned
        s.on_trial_complete("t2", complete(0.1))
        assert take(s, "t4") == ("b", "final", {"i": 1, "seed": 7})
        assert take(s, "t5") == ("b", "final", {"i": 1, "seed": 8})
        assert take(s, "t6") is None
        s.on_trial_complete("t4", {})
        s.on_trial_complete("t5", {})
        assert take(s, "t6") == Searcher.FINISHED
        assert multiplex.news("sw") == [
            "no complete search trial in a: final phase skipped", "done a",
            "final b: best val m=0.1000, 2 seed(s)", "done b",
        ]  # fmt: skip
        assert multiplex.news("sw") == []
    finally:
        multiplex.close_news("sw")


def test_per_cell_limits() -> None:
    s = SweepSearcher([cell("a", trials=1), cell("b", trials=3)], "m", "max", Limits(search=2, final=1))
    assert [take(s, t)[:2] for t in ("t1", "t2", "t3")] == [("a", "search"), ("b", "search"), ("b", "search")]
    assert take(s, "t4") is None  # b has 2 search trials in flight; a's search waits for t1
    s.on_trial_complete("t2", complete(0.1))
    assert take(s, "t4") == ("b", "search", {"i": 3})
    s.on_trial_complete("t1", complete(0.2))
    assert take(s, "t5") == ("a", "final", {"i": 1, "seed": 7})
    assert take(s, "t6") is None  # a's final phase: 1 at a time; b still searches
    for t in ("t3", "t4"):
        s.on_trial_complete(t, complete(0.3))
    assert take(s, "t6") == ("b", "final", {"i": 2, "seed": 7})
    assert take(s, "t7") is None
    s.on_trial_complete("t5", {})
    assert take(s, "t7") == ("a", "final", {"i": 1, "seed": 8})


def test_the_sweep_wide_cap_and_the_driver_s_current_limits_win() -> None:
    s = SweepSearcher([cell("a", trials=3), cell("b", trials=3)], "m", "max", Limits(cap=2), sweep_id="sw")
    assert [take(s, t)[:2] for t in ("t1", "t2")] == [("a", "search"), ("b", "search")]
    assert take(s, "t3") is None  # 2 in flight over all cells
    multiplex.set_limits("sw", Limits(cap=3))  # a resumed driver with --sweep-max-concurrent 3
    try:
        assert take(s, "t3") == ("a", "search", {"i": 2})
        assert take(s, "t4") is None
    finally:
        multiplex.set_limits("sw", None)
    s.on_trial_complete("t1", complete(0.1))
    s.on_trial_complete("t2", complete(0.1))
    assert take(s, "t4") == ("b", "search", {"i": 2})
    assert take(s, "t5") is None  # back to the searcher's own cap: t3, t4


def test_a_cell_the_protocol_does_not_search_starts_its_final_phase_at_once() -> None:
    s = SweepSearcher([cell("recipe", searched=False), cell("b", trials=1, seeds=())], "m", "max")
    assert take(s, "t1") == ("recipe", "final", {"seed": 7})
    assert take(s, "t2") == ("recipe", "final", {"seed": 8})  # final trials go first
    assert take(s, "t3") == ("b", "search", {"i": 1})
    for t in ("t1", "t2", "t3"):
        s.on_trial_complete(t, complete(0.5))
    assert take(s, "t4") == Searcher.FINISHED  # b has no final seeds


def test_saved_state_continues_the_sweep_exactly(tmp_path: Path) -> None:
    def fresh() -> SweepSearcher:
        return SweepSearcher([cell("a", trials=3), cell("b", trials=2)], "m", "max", Limits(cap=4))

    def drive(s: SweepSearcher, start: int, stop: int) -> list[Any]:
        out = []
        for i in range(start, stop):
            got = take(s, f"t{i}")
            out.append(got)
            if isinstance(got, tuple) and i % 2:
                s.on_trial_complete(f"t{i}", complete(i / 100))
            if i % 3 == 0:  # some trials end later, in a fixed order
                for t in sorted(s.live)[:1]:
                    s.on_trial_complete(t, complete(int(t[1:]) / 100))
        return out

    whole = fresh()
    expected = drive(whole, 1, 20)
    first = fresh()
    head = drive(first, 1, 7)
    first.save(str(tmp_path / "state.pkl"))
    restored = fresh()
    restored.restore(str(tmp_path / "state.pkl"))
    assert head + drive(restored, 7, 20) == expected
    assert expected[-1] == Searcher.FINISHED and restored.cells["a"].search.n == 3


class Recording(TrialScheduler):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.calls.append(("add", trial.trial_id))

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        self.calls.append(("result", trial.trial_id))
        return TrialScheduler.STOP

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        self.calls.append(("complete", trial.trial_id))

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.calls.append(("remove", trial.trial_id))

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.calls.append(("error", trial.trial_id))


def test_each_cells_search_trials_go_to_its_own_scheduler_and_final_trials_run_to_their_end() -> None:
    a, b = Recording(), Recording()
    sched = CellSchedulers({"a": a, "b": b})
    trials = {t: SimpleNamespace(trial_id=t, config={CELL_KEY: c, PHASE_KEY: ph, "x": 1})
              for t, c, ph in (("a1", "a", "search"), ("b1", "b", "search"), ("a2", "a", "final"))}  # fmt: skip
    for t in trials.values():
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, trials["a1"], {}) == TrialScheduler.STOP
    assert sched.on_trial_result(None, trials["a2"], {}) == TrialScheduler.CONTINUE  # final: never stopped
    sched.on_trial_complete(None, trials["b1"], {})
    sched.on_trial_error(None, trials["a1"])
    sched.on_trial_remove(None, trials["a2"])
    assert a.calls == [("add", "a1"), ("result", "a1"), ("error", "a1")]
    assert b.calls == [("add", "b1"), ("complete", "b1")]


def test_tune_keeps_as_many_pending_trials_as_the_sweep_has_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune's default for a searcher of its own is one pending trial (one trial started at a time);
    the sweep's experiment gets its slots, and a value the user set wins."""
    from dmlbench.orchestrator.experiment import _pending_trials

    monkeypatch.delenv("TUNE_MAX_PENDING_TRIALS_PG", raising=False)
    with _pending_trials(8):
        assert os.environ["TUNE_MAX_PENDING_TRIALS_PG"] == "8"
    assert "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ
    with _pending_trials(None):
        assert os.environ["TUNE_MAX_PENDING_TRIALS_PG"] == "1"
    monkeypatch.setenv("TUNE_MAX_PENDING_TRIALS_PG", "200")
    with _pending_trials(8):
        assert os.environ["TUNE_MAX_PENDING_TRIALS_PG"] == "200"
    assert os.environ["TUNE_MAX_PENDING_TRIALS_PG"] == "200"


def test_a_cells_real_optuna_suggestions_do_not_depend_on_the_cells_beside_it(tmp_path: Path) -> None:
    """The sweep's real searcher (:func:`experiment.searcher`: Optuna TPE per cell, seeded per cell,
    past its start-up trials): a cell suggests the same params in a sweep of its own as beside two
    other cells whose trials come in between, when its own trials end with the same scores in the
    same order. What another cell's trials scored never reaches it."""
    import hashlib

    from dmlbench.orchestrator.experiment import searcher, sweep_parts
    from dmlbench.orchestrator.spec import SweepSpec

    def score(params: dict[str, Any]) -> float:  # a fixed function of the params
        return int(hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6], 16) / 16**6

    def drive(methods: tuple[str, ...], datasets: tuple[str, ...]) -> list[dict[str, Any]]:
        spec = SweepSpec(methods=methods, datasets=datasets, backbones=("tiny",), trials=8, folds=3, final_seeds=1,
                         max_concurrent=1, output=str(tmp_path / "-".join(methods + datasets)))  # fmt: skip
        s = searcher(spec, sweep_parts(spec))
        mine: list[dict[str, Any]] = []
        for i in range(200):
            got = take(s, f"t{i}")
            if got == Searcher.FINISHED:
                return mine
            if got is None:
                continue
            slug, phase, params = got
            if slug == "nivmf-digits-tiny" and phase == "search":
                mine.append(params)
            # every cell's trial ends before the next suggestion; other cells score differently
            s.on_trial_complete(f"t{i}", complete(score(params) if slug == "nivmf-digits-tiny" else 1 - score(params)))
        raise AssertionError("the sweep did not finish")

    alone = drive(("nivmf",), ("digits",))
    beside = drive(("nivmf", "ccp"), ("digits", "synthetic"))
    assert len(alone) == 8 and alone == beside
    assert len({json.dumps(p, sort_keys=True) for p in alone}) == 8  # TPE explored, it did not repeat
