"""Orchestration overhead: N trivial trials through the sweep machinery vs the same work in a loop.

Each trial's train function sleeps ``--sleep`` seconds per epoch and reports once per epoch, so
the work is known exactly. The sweep path is the real one (``orchestrator.sweep.run``: Ray Tune,
Optuna, ASHA, the trainable, row files, the leaderboard) with concurrency 1, so the difference in
wall time is the orchestration overhead. Prints overhead per trial and as a fraction of wall time.

    python bench/orchestration_overhead.py --trials 8 --sleep 2 --epochs 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dmlbench.methods.base import Method, MethodParams


class SleepParams(MethodParams):
    x: float = 0.5


class SleepMethod(Method):
    name = "bench_sleep"
    Params = SleepParams


def register() -> None:
    """Register the sleeping method (also run in every Ray worker as its setup hook)."""
    from dmlbench.methods.base import METHODS

    if "bench_sleep" not in METHODS:
        METHODS.register("bench_sleep")(SleepMethod)


SLEEP = 1.0


def sleep_train(cfg: Any, report: Any) -> Any:
    for epoch in range(1, cfg.epochs + 1):
        time.sleep(SLEEP)
        report(epoch, {"map_at_r": float(cfg.params["x"])}, None)
    return SimpleNamespace(metrics={"map_at_r": float(cfg.params["x"])}, eval_split="val", best_epoch=cfg.epochs,
                           epochs_run=cfg.epochs, steps=cfg.epochs, wall_time_s=SLEEP * cfg.epochs,
                           split_hash=None, pretrained_id="none", test_metrics=None)  # fmt: skip


def main() -> None:
    global SLEEP
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--sleep", type=float, default=2.0, help="seconds of 'training' per epoch")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    SLEEP = args.sleep

    import ray
    import ray.cloudpickle as cp

    from dmlbench.orchestrator import sweep
    from dmlbench.orchestrator.spec import SweepSpec
    from dmlbench.search_spaces import loader

    register()
    cp.register_pickle_by_value(sys.modules[__name__])
    with tempfile.TemporaryDirectory() as tmp:
        spaces = Path(tmp) / "spaces"
        spaces.mkdir()
        (spaces / "bench_sleep.yaml").write_text(
            "method: bench_sleep\nparams:\n  - {name: x, type: float, low: 0.1, high: 0.9}\n"
        )
        loader.SPACES_DIR = spaces
        spec = SweepSpec(methods=("bench_sleep",), datasets=("digits",), backbones=("tiny",), trials=args.trials,
                         epochs=args.epochs, grace_period=args.epochs, final_seeds=0, max_concurrent=1, folds=3,
                         output=str(Path(tmp) / "out"), trial_base={"pretrained": False})  # fmt: skip

        t0 = time.perf_counter()
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": register})  # fmt: skip
        t_init = time.perf_counter() - t0
        t1 = time.perf_counter()
        sweep.run(spec, train_fn=sleep_train, echo=lambda s: None)
        t_sweep = time.perf_counter() - t1
        ray.shutdown()
        from dmlbench.results import schema, store

        rows, _ = store.read_rows(Path(tmp) / "out")
        statuses = rows[schema.STATUS].value_counts().to_dict()
        if statuses.get("complete", 0) != args.trials:
            raise SystemExit(f"benchmark invalid: trial statuses {statuses} (expected {args.trials} complete)")

    t2 = time.perf_counter()
    for _ in range(args.trials):
        cfg = SimpleNamespace(epochs=args.epochs, params={"x": 0.5})
        sleep_train(cfg, lambda *a: None)
    t_loop = time.perf_counter() - t2

    per_trial = (t_sweep - t_loop) / args.trials
    trial_s = args.sleep * args.epochs
    print(f"trials={args.trials} epochs={args.epochs} sleep/epoch={args.sleep}s (trial = {trial_s:.1f} s of work)")
    print(f"plain loop      : {t_loop:8.2f} s")
    print(f"sweep machinery : {t_sweep:8.2f} s   (+ ray.init {t_init:.2f} s, once per sweep)")
    print(f"overhead        : {per_trial:8.2f} s per trial, {(t_sweep - t_loop) / t_sweep:6.1%} of sweep wall time")
    print(f"for 60 s trials : {per_trial / (60 + per_trial):6.1%} of wall time (same per-trial overhead)")


if __name__ == "__main__":
    main()
