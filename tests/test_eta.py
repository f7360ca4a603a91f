"""The ETA model of ``dmlbench status`` and the live view (:mod:`dmlbench.orchestrator.status`),
on hand-made progress states whose answer is worked out by hand in each test."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmlbench.orchestrator.status import CellStatus, RunningTrial, eta_seconds


def cell(phase: str, planned: int, durations: list[float], running: list[float] = (), key: str = "m/d/b",
         models: int = 1, **kw: object) -> CellStatus:  # fmt: skip
    """A cell phase with ended trials of ``durations`` and trials running since the given times."""
    trials = [RunningTrial(key, phase, f"t{i}", started, 1, 2, None) for i, started in enumerate(running)]
    return CellStatus("s", key, phase, planned, len(durations), len(trials), {}, None, list(durations), trials,
                      models=models, **kw)  # fmt: skip


def test_nothing_left_is_zero_and_nothing_measured_is_unknown() -> None:
    assert eta_seconds([cell("search", 2, [3.0, 4.0])], slots=1, now=100.0) == 0.0
    assert eta_seconds([cell("search", 2, [], running=[99.0])], slots=1, now=100.0) is None


def test_pending_work_over_slots_plus_the_running_rest() -> None:
    # expected 10 s; one trial ran 4 s (6 s left) + 3 pending x 10 s = 36 s of work on 2 slots = 18 s
    c = cell("search", 5, [10.0], running=[96.0])
    assert eta_seconds([c], slots=2, now=100.0) == pytest.approx(18.0)


def test_busy_fraction_stretches_the_work() -> None:
    # started 100 s ago on 2 slots, trials kept them busy 100 of 200 slot-s: half the capacity
    c = cell("search", 4, [50.0, 50.0])
    assert eta_seconds([c], slots=2, started=0.0, now=100.0) == pytest.approx(2 * 50.0 / (2 * 0.5))


def test_final_phase_is_on_the_chain_with_its_models() -> None:
    # search: 1 pending trial of 10 s, then the final phase (no final measured yet): the longest
    # search trial (12 s) of 1 model scaled to a final seed's 3 fold models = 36 s; chain 10 + 36
    search = cell("search", 3, [8.0, 12.0], models=1)
    final = cell("final", 2, [], models=3)
    assert eta_seconds([search, final], slots=8, now=100.0) == pytest.approx(10.0 + 36.0)


def test_a_measured_final_phase_of_another_cell_comes_first() -> None:
    search = cell("search", 3, [8.0, 12.0], models=1)
    final = cell("final", 2, [], models=3)
    other = cell("final", 2, [20.0, 20.0], key="o/d/b", models=3)
    assert eta_seconds([search, final, other], slots=8, now=100.0) == pytest.approx(10.0 + 20.0)


def test_a_trial_past_its_expected_time_expects_what_longer_trials_took() -> None:
    # measured 10, 10, 40 (mean 20); a trial running for 30 s: of the trials that ran longer than 30 s
    # one took 40, so 10 s are left (not the 5 % floor of the old rule)
    c = cell("search", 4, [10.0, 10.0, 40.0], running=[70.0])
    assert eta_seconds([c], slots=1, now=100.0) == pytest.approx(10.0)
    # past every measured trial: a twentieth of the expected time
    c = cell("search", 4, [10.0, 10.0, 40.0], running=[50.0])
    assert eta_seconds([c], slots=1, now=100.0) == pytest.approx(1.0)


def test_experiment_wrap_up_and_driver_wrap_up_are_counted() -> None:
    # the experiment closed 2 s after its last trial in an earlier run of the driver; now a trial has
    # 5 s left: chain 5 + 2; the driver's wrap-up (its measured set-up, 4 s) after that
    closed = cell("search", 1, [10.0], key="a/d/b", closed=52.0, last_end=50.0)
    running = cell("search", 2, [10.0], running=[95.0], key="b/d/b")
    assert eta_seconds([closed, running], slots=8, now=100.0) == pytest.approx(7.0)
    assert eta_seconds([closed, running], slots=8, now=100.0, wrapup=4.0) == pytest.approx(11.0)


def test_after_the_last_trial_only_the_driver_wrap_up_is_left() -> None:
    ended = cell("search", 1, [10.0], closed=99.5, last_end=99.0)
    assert eta_seconds([ended], slots=1, now=100.0, wrapup=4.0) == pytest.approx(4.0)
    assert eta_seconds([ended], slots=1, now=100.0) == 0.0


def test_status_of_a_finished_sweep_counts_no_wrap_up(tmp_path: Path) -> None:
    from dmlbench.orchestrator.spec import SweepSpec
    from dmlbench.orchestrator.status import sweep_progress
    from dmlbench.orchestrator.sweepdir import SWEEP_PROGRESS, sweep_dir, write_progress

    spec = SweepSpec(methods=("ccp",), datasets=("digits",), trials=1, final_seeds=0, output=str(tmp_path))
    folder = sweep_dir(spec)
    write_progress(folder, SWEEP_PROGRESS, {"slots": 1, "started": 10.0, "setup_s": 4.0})
    assert sweep_progress(spec, folder, rows=[], now=20.0).setup_s == 4.0
    write_progress(folder, SWEEP_PROGRESS, {"slots": 1, "started": 10.0, "setup_s": 4.0, "ended": 30.0})
    assert sweep_progress(spec, folder, rows=[], now=40.0).ended == 30.0


def test_process_start_is_counted_once_per_new_process_not_per_trial() -> None:
    # cell a: a cold trial of 6 s (a new process) and two warm ones of 1 s (reused): start cost 5 s.
    # a has 1 pending trial and cell b, not started, 4 trials of 1 s. On 1 slot the sweep's one
    # process takes them all (any cell's trial reuses it): work 1 + 4 = 5 s (the old model: 5 trials
    # at a's mean of 2.67 s = 13.3 s).
    a = cell("search", 4, [6.0, 1.0, 1.0], key="a/d/b", warm=[False, True, True])
    b = cell("search", 4, [], key="b/d/b")
    assert eta_seconds([a, b], slots=1, now=100.0) == pytest.approx(1.0 + 4 * 1.0)
    # on 2 slots one more process starts (5 s): work (5 + 5) / 2 = 5 s, but b's first trial may be
    # the one on the new process: chain 1 + 5 = 6 s
    assert eta_seconds([a, b], slots=2, now=100.0) == pytest.approx(6.0)
    # a running trial that started cold expects its work and the start; a warm one only its work
    cold = cell("search", 3, [6.0, 1.0], running=[99.0], key="a/d/b", warm=[False, True])
    assert eta_seconds([cold], slots=1, now=100.0) == pytest.approx(1.0 + 5.0 - 1.0)
    warm = cell("search", 3, [6.0, 1.0], running=[99.5], key="a/d/b", warm=[False, True])
    warm.trials[0].warm = True
    assert eta_seconds([warm], slots=1, now=100.0) == pytest.approx(0.5)


def test_a_trial_is_warm_when_it_starts_as_another_trial_of_the_sweep_ends(tmp_path: Path) -> None:
    from dmlbench.orchestrator.spec import SweepSpec, experiment_name
    from dmlbench.orchestrator.status import sweep_progress
    from dmlbench.orchestrator.sweepdir import sweep_dir, write_progress

    spec = SweepSpec(methods=("ccp",), datasets=("digits",), trials=4, final_seeds=1, output=str(tmp_path))
    folder = sweep_dir(spec)
    ended = {"a": {"started": 10.0, "ended": 16.0}, "b": {"started": 16.02, "ended": 17.0},  # b took a's process
             "c": {"started": 12.0, "ended": 18.0}}  # c started on a process of its own while a ran
    running = {"d": {"started": 17.05}, "e": {"started": 30.0}}  # d took b's process; e a new one
    write_progress(folder, experiment_name(spec, spec.cells()[0], "search"), {"ended": ended, "running": running})
    # the final phase's trial took c's process: the processes of one sweep serve every cell phase
    write_progress(folder, experiment_name(spec, spec.cells()[0], "final"), {"running": {"f": {"started": 18.01}}})
    c, f = sweep_progress(spec, folder, rows=None, now=40.0).cells
    assert c.durations == pytest.approx([6.0, 0.98, 6.0]) and c.warm == [False, True, False]
    assert [(t.trial_id, t.warm) for t in c.trials] == [("d", True), ("e", False)]
    assert [(t.trial_id, t.warm) for t in f.trials] == [("f", True)]
