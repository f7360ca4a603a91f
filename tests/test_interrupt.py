"""Ctrl-C stops the whole sweep: SIGINT to the process group of a running ``dmlbench sweep`` (what a
terminal sends), exit 130 with the command to resume, no new trial, no row from an interrupted trial;
the rerun continues every interrupted trial from its checkpoint, reruns no finished one and writes
no duplicate row. A second Ctrl-C exits at once.

The sweeps run the real CLI on a private local Ray (its own temp dir and home) with the fake train
function of ``tests/sweep_driver.py``, so they need no engine and kill only processes they started.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sweep_driver import driver_env, log_lines, run_until, wait_for

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("sweep_driver.py")


@pytest.fixture
def private_env() -> Iterator[dict[str, str]]:
    base = Path(tempfile.mkdtemp(prefix="dmlb-", dir="/tmp"))
    try:
        yield driver_env(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def sweep_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(DRIVER), "sweep", "--methods", "proxyanchor", "--datasets", "digits,synthetic",
            "--backbones", "tiny", "--trials", "4", "--epochs", "3", "--grace-period", "3", "--final-seeds", "0",
            "--folds", "3", "--search-folds", "1", "--output", str(out), "--name", "intr",
            "--checkpoint-every-epochs", "1", *extra]  # fmt: skip


def read_rows(out: Path):  # type: ignore[no-untyped-def]
    from dmlbench.results import store

    df, warnings = store.read_rows(out)
    assert warnings == []
    return df


def test_first_ctrl_c_stops_the_sweep_and_the_rerun_continues(private_env: dict[str, str], tmp_path: Path) -> None:
    from dmlbench.results import schema

    env = {**private_env, "SWEEP_EPOCH_S": "3"}
    out = tmp_path / "out"
    cmd = sweep_cmd(out)

    # a trial of the first cell has finished (a row), and another has just saved its first epoch's
    # checkpoint (two more epochs of 3 s to go, so it is surely running when Ctrl-C comes 1 s later)
    def mid_way() -> bool:
        lines = log_lines(env)
        ended = {ln[2] for ln in lines if ln[0] == "end"}
        last: dict[str, int] = {}
        for ln in lines:
            if ln[0] == "epoch":
                last[ln[2]] = int(ln[3])
        return bool(ended) and any(e == 1 and t not in ended for t, e in last.items())

    def ctrl_c(pid: int) -> float:
        time.sleep(1.0)  # Tune's controller has processed the epoch's report and its checkpoint
        os.killpg(pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        return time.time()

    rc, output, t_sigint, took = run_until(cmd, env, mid_way, ctrl_c, "a finished trial and one with a checkpoint")
    assert rc == 130, output[-3000:]
    assert took < 60, f"exit took {took:.0f} s after Ctrl-C"
    print(f"exit 130 {took:.1f} s after SIGINT")
    flat = " ".join(output.split())
    assert "stopped by Ctrl-C" in flat and "rerun the same command" in flat
    assert "dmlbench sweep --methods proxyanchor --datasets digits,synthetic" in flat  # the command to resume

    lines = log_lines(env)
    # the cells run side by side; after Ctrl-C no trial starts (a trial Tune launched just before the
    # signal may still log its start while its worker process comes up)
    late = [ln for ln in lines if ln[0] == "start" and float(ln[4]) > t_sigint + 3.0]
    assert not late, f"trials started after Ctrl-C: {late}"
    ended = {ln[2] for ln in lines if ln[0] == "end"}
    reported = {}  # trial -> last epoch it reported at least 1 s before the SIGINT
    for ln in lines:
        if ln[0] == "epoch" and float(ln[4]) <= t_sigint - 1.0:
            reported[ln[2]] = max(reported.get(ln[2], 0), int(ln[3]))
    interrupted = {t: e for t, e in reported.items() if t not in ended}
    assert interrupted, "no trial was interrupted mid-way; the test did not test anything"
    df = read_rows(out)
    # only trials that ended have rows: nothing interrupted is recorded as pruned, complete or NaN
    assert set(df[schema.STATUS]) == {"complete"}
    assert not df[schema.MAP_AT_R].isna().any()
    assert {r.rsplit("-", 1)[1] for r in df[schema.ROW_ID]} == ended

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    df = read_rows(out)
    assert len(df) == 8 and df[schema.ROW_ID].is_unique
    assert set(df[schema.STATUS]) == {"complete"} and all(math.isfinite(v) for v in df[schema.MAP_AT_R])
    starts: dict[str, list[int]] = {}
    for ln in log_lines(env):
        if ln[0] == "start":
            starts.setdefault(ln[2], []).append(int(ln[3]))
    for trial in ended:
        assert len(starts[trial]) == 1, f"finished trial {trial} was started again"
    for trial, epoch in interrupted.items():
        assert len(starts[trial]) == 2 and starts[trial][1] >= 1, (
            f"interrupted trial {trial} (epoch {epoch} saved) restarted from epoch {starts[trial][1:]}, not its checkpoint"
        )


def test_second_ctrl_c_exits_at_once(private_env: dict[str, str], tmp_path: Path) -> None:
    env = {**private_env, "SWEEP_EPOCH_S": "3"}
    out = tmp_path / "out"

    def ctrl_c_twice(pid: int) -> float:
        os.killpg(pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(pid, signal.SIGINT)
        return time.time()

    started = lambda: any(ln[0] == "start" for ln in log_lines(env))  # noqa: E731
    rc, output, _, took = run_until(sweep_cmd(out), env, started, ctrl_c_twice, "the first trial", end_s=60)
    assert rc == 130, output[-3000:]
    assert took < 10, f"the second Ctrl-C took {took:.1f} s"
    print(f"exit 130 {took:.2f} s after the second SIGINT")
    assert "Ctrl-C again: quitting now" in output
    if (out / "intr" / "rows").exists():
        read_rows(out)  # what was written is intact


def test_an_experiment_in_another_thread_stops_at_its_next_step(tmp_path: Path) -> None:
    """Tune installs no SIGINT handler outside the main thread (a scheduler running experiments side
    by side): the sweep's stop request ends such an experiment through its StopCallback."""
    import threading

    import ray
    from ray import tune

    from dmlbench.errors import SweepInterrupted
    from dmlbench.orchestrator import interrupts

    def slow(config: dict[str, object]) -> None:
        for i in range(300):
            time.sleep(0.2)
            tune.report({"x": i})

    temp = tempfile.mkdtemp(prefix="dmlb-", dir="/tmp")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    box: dict[str, BaseException] = {}

    def started() -> bool:  # the trial has reported (Tune wrote a result)
        return any(p.stat().st_size > 0 for p in (tmp_path / "thread").rglob("result.json"))

    def fit() -> None:
        try:
            tune.Tuner(slow, run_config=tune.RunConfig(name="thread", storage_path=str(tmp_path), verbose=0,
                                                       callbacks=[interrupts.StopCallback()])).fit()  # fmt: skip
        except BaseException as err:  # what the thread ended with is the result
            box["err"] = err

    try:
        with interrupts.handling():
            thread = threading.Thread(target=fit)
            thread.start()
            wait_for(lambda: started() or "err" in box, 120, "the experiment's first result")
            assert "err" not in box, box
            interrupts.request()
            t0 = time.time()
            thread.join(120)
            took = time.time() - t0
        assert not thread.is_alive()
        assert isinstance(box.get("err"), SweepInterrupted), box
        assert took < 60
        print(f"experiment in a thread stopped {took:.1f} s after the request")
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
