"""Run ``dmlbench <args>`` (the real CLI) with a fake, fast train function: the subprocess driver of
the interrupt and cluster tests (``python tests/sweep_driver.py sweep --methods ...``).

The fake train function sleeps ``$SWEEP_EPOCH_S`` seconds per epoch (default 1), saves a resumable
checkpoint every epoch, reports a quality derived from the sampled parameters, and logs
``start|epoch|end <dataset> <trial id> <epoch> <unix time> <GCS address>`` lines (start: the epoch of the
checkpoint it resumes from, 0 for none) to ``$SWEEP_LOG`` (when set), so a
test can tell which cells started, when, and whether a trial resumed from its checkpoint.

This file runs as ``__main__``, so cloudpickle ships the train function by value to the Ray
workers (of a local Ray or of a ``ray start`` cluster) and nothing needs installing there.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def _log(what: str, cfg: Any, epoch: int) -> None:
    path = os.environ.get("SWEEP_LOG")
    if not path:
        return
    import ray
    from ray import tune

    here = Path(cfg.output_dir)
    trial = tune.get_context().get_trial_id()
    if here.name.startswith("fold"):  # one model of a fold-model group (the protocol's search / final phase)
        trial = f"{trial}.{here.name}"
    gcs = ray.get_runtime_context().gcs_address  # which cluster the trial runs on
    with open(path, "a") as fh:
        fh.write(f"{what} {cfg.dataset} {trial} {epoch} {time.time():.3f} {gcs}\n")


def fake_train(cfg: Any, report: Any) -> Any:
    ck = Path(cfg.output_dir) / "checkpoints"
    start = int((ck / "last.pt").read_text()) if (ck / "last.pt").exists() else 0
    _log("start", cfg, start)
    digest = hashlib.sha256(repr(sorted(cfg.params.items())).encode()).digest()
    quality = 0.1 + 0.8 * digest[0] / 255
    for epoch in range(start + 1, cfg.epochs + 1):
        time.sleep(float(os.environ.get("SWEEP_EPOCH_S", "1")))
        ck.mkdir(parents=True, exist_ok=True)
        (ck / "last.pt").write_text(str(epoch))
        report(epoch, {"map_at_r": quality}, str(ck))
        _log("epoch", cfg, epoch)
    _log("end", cfg, cfg.epochs)
    if os.environ.get("SWEEP_FAIL"):  # every trial fails (a job whose trials all fail)
        raise RuntimeError("fake training failure")
    return SimpleNamespace(metrics={"map_at_r": quality}, eval_split="val", best_epoch=cfg.epochs,
                           epochs_run=cfg.epochs, steps=cfg.epochs, wall_time_s=1.0, split_hash="h",
                           pretrained_id="none", test_metrics={"map_at_r": quality})  # fmt: skip


def driver_env(base: Path) -> dict[str, str]:
    """Environment of a driver subprocess with its own Ray temp dir under ``base`` (keep it short:
    Ray's socket paths must fit), its own home (Ray writes ~/.ray/auth_token) and log."""
    (base / "home").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(HOME=str(base / "home"), RAY_TMPDIR=str(base), PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               SWEEP_LOG=str(base / "starts.log"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # fmt: skip
    return env


def log_lines(env: dict[str, str]) -> list[list[str]]:
    """The fake train function's log lines, split."""
    path = Path(env["SWEEP_LOG"])
    return [ln.split() for ln in path.read_text().splitlines()] if path.exists() else []


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def run_until(cmd: list[str], env: dict[str, str], ready: Callable[[], bool], act: Callable[[int], float],
              what: str, ready_s: float = 300, end_s: float = 180) -> tuple[int, str, float, float]:  # fmt: skip
    """Start ``cmd`` in its own session, wait until ``ready()``, then ``act(pid)`` (which returns the
    moment to measure from) and wait for the process to end. Returns its exit code, its output, that
    moment and the seconds from it to the end; its process group is killed if it is still there."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        wait_for(ready, ready_s, what)
        t0 = act(proc.pid)
        output, _ = proc.communicate(timeout=end_s)
        return proc.returncode, output, t0, time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str]) -> None:
    from dmlbench.orchestrator import sweep

    sweep.run = functools.partial(sweep.run, train_fn=fake_train)  # the CLI looks it up at call time
    from dmlbench.cli import main as cli_main

    sys.argv = ["dmlbench", *argv]
    cli_main()


if __name__ == "__main__":
    main(sys.argv[1:])
