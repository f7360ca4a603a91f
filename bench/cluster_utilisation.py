"""Cluster utilisation of a sweep: the concurrent scheduler vs the old one-cell-after-another order
and vs one plain Tune experiment of the same trials.

The real sweep machinery (``orchestrator.sweep.run``: Ray Tune, Optuna, the trainable, rows, the
leaderboard) on a local Ray with ``--slots`` logical CPUs (one trial per slot), ``--methods`` ×
``--datasets`` cells, each with ``--trials`` search trials and ``--final-seeds`` final trials. A
trial's train function only sleeps (``--trial-s`` seconds over ``--epochs`` epochs, no pruning; a
final seed's two fold models sleep half each, so it is one trial's work too), so
the work is known exactly: utilisation = trial work / (slots × wall time). The orders run in this
process, one after the other, on the same Ray; the sequential order is the same machinery with the
cells run one at a time (each cell a sweep of its own, in a loop), the order of the first dmlbench;
the ``tune`` order is the peer that bounds them: the same number of trials of the same work as one
plain Tune experiment of Tune's own grid search, whose trial processes are reused for the whole run.

    python bench/cluster_utilisation.py --slots 8 --trials 8 --final-seeds 3 --trial-s 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dmlbench.methods.base import Method, MethodParams

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fixtures import fake_trials  # noqa: E402  (its start_ray ships it to the workers by value)
from tests.fixtures.fake_trials import fold_test_embedding  # noqa: E402

METHODS = ("util_a", "util_b", "util_c")


class SleepParams(MethodParams):
    x: float = 0.5


class SleepMethod(Method):
    name = "util_sleep"
    Params = SleepParams


def register() -> None:
    """Register the sleeping methods (also run in every Ray worker as its setup hook)."""
    from dmlbench.methods.base import METHODS as REGISTRY

    for m in METHODS:
        if m not in REGISTRY:
            REGISTRY.register(m)(SleepMethod)


EPOCH_S = 1.0
#: a JSON-lines file each model's work appends to (set before Ray starts; workers get it by value)
TIMELINE = ""
FOLDS = 2


def epoch_s(phase: str) -> float:
    """A final seed trains the FOLDS fold models one after the other: each sleeps 1/FOLDS of a trial."""
    return EPOCH_S / FOLDS if phase == "final" else EPOCH_S


def sleep_train(cfg: Any, report: Any) -> Any:
    if TIMELINE:  # when this model's work started and ended, in which process (for the breakdown)
        with open(TIMELINE, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "proc_start": process_start(), "start": time.time(),
                                "work": epoch_s(cfg.phase) * cfg.epochs}) + "\n")  # fmt: skip
    for epoch in range(1, cfg.epochs + 1):
        time.sleep(epoch_s(cfg.phase))
        report(epoch, {"map_at_r": float(cfg.params["x"])}, None)
    x = float(cfg.params["x"])
    return SimpleNamespace(metrics={"map_at_r": x}, test_metrics={"map_at_r": x} if cfg.phase == "final" else None,
                           eval_split="test" if cfg.phase == "final" else "val", best_epoch=cfg.epochs,
                           epochs_run=cfg.epochs, steps=cfg.epochs, wall_time_s=epoch_s(cfg.phase) * cfg.epochs,
                           split_hash=None, pretrained_id="none",
                           test_embedding=fold_test_embedding(cfg) if cfg.phase == "final" else None)  # fmt: skip


def process_start() -> float:
    """Wall-clock time this process started (Linux: /proc)."""
    ticks = int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = float(next(ln for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime")).split()[1])
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def breakdown(timeline: Path) -> str:
    """Where held slot time went besides work: trial processes starting (process start to its first
    model's work: the interpreter, Ray's worker, imports) and, in a reused process, the gap from one
    model's end to the next one's start (a trial's wrap-up, Tune's hand-over, the next trial's set-up)."""
    recs = sorted((json.loads(ln) for ln in timeline.read_text().splitlines()), key=lambda r: r["start"])
    cold: list[float] = []
    gaps: list[float] = []
    last: dict[int, dict[str, float]] = {}
    for r in recs:
        prev = last.get(r["pid"])
        if prev is None:
            cold.append(r["start"] - r["proc_start"])
        else:
            gaps.append(r["start"] - prev["start"] - prev["work"])
        last[r["pid"]] = r
    return (f"{len(recs)} models ran in {len(cold)} trial processes; process start to first work "
            f"{sum(cold) / len(cold):.1f} s mean ({sum(cold):.0f} slot-s); {len(gaps)} models in a reused process "
            f"started {sum(gaps) / max(len(gaps), 1):.1f} s after the previous one ended ({sum(gaps):.0f} slot-s)")


def sample_busy(slots: int, busy: list[float], done: threading.Event) -> None:
    """How many of the slots Ray has handed out, every 0.25 s until ``done``."""
    import ray

    while not done.wait(0.25):
        busy.append(slots - ray.available_resources().get("CPU", 0.0))


def held_by_tenth(busy: list[float], slots: int) -> str:
    """The share of slots held in each tenth of the run: where the unheld time lies (the start, while
    trial processes start; the middle, between trials; the end, the last cells' final phases)."""
    n = len(busy)
    tenths = [busy[i * n // 10 : (i + 1) * n // 10] for i in range(10)]
    return " ".join(f"{sum(t) / len(t) / slots:.0%}" if t else "-" for t in tenths)


def plain_trial(config: dict[str, Any]) -> None:
    """A trial of the plain-Tune order: the same known work as a sweep's trial, reported per epoch."""
    from ray import tune

    if TIMELINE:
        with open(TIMELINE, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "proc_start": process_start(), "start": time.time(),
                                "work": EPOCH_S * config["epochs"]}) + "\n")  # fmt: skip
    for epoch in range(1, config["epochs"] + 1):
        time.sleep(EPOCH_S)
        tune.report({"epoch": epoch})


def run_plain_tune(n_trials: int, epochs: int, storage: Path) -> None:
    """The ceiling of any Tune-based order on this machine: the same trials, work and slots as one
    plain Tune experiment (no dmlbench, no Optuna or ASHA, no rows), so every trial process is reused
    for the whole run (``reuse_actors``) and no experiment starts after the first. Its processes pay
    the same start (Ray's worker, the set-up hook's imports, ``ray.tune``)."""
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(plain_trial, {"cpu": 1}),
        param_space={"i": tune.grid_search(list(range(n_trials))), "epochs": epochs},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(name="plain", storage_path=str(storage), verbose=0),
    )
    grid = tuner.fit()
    if grid.num_errors or len(grid) != n_trials:
        raise SystemExit(f"benchmark invalid (tune): {len(grid)} trials, {grid.num_errors} errors (expected {n_trials}, 0)")


def run_sequential(spec: Any) -> None:
    """The old order: each cell's search, then its final phase, then the next cell (each cell a
    sweep of its own, so its search and final phase are one experiment, as in the concurrent order)."""
    from dmlbench.orchestrator import sweep

    for cell in spec.cells():
        one = spec.model_copy(update={"methods": (cell.method,), "datasets": (cell.dataset,),
                                      "name": f"{spec.name}-{cell.slug}"})  # fmt: skip
        sweep.run(one, train_fn=sleep_train, echo=lambda s: None)


def main() -> None:
    global EPOCH_S, TIMELINE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--methods", type=int, default=3, help=f"how many of {METHODS}")
    ap.add_argument("--datasets", default="digits,synthetic")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--final-seeds", type=int, default=3)
    ap.add_argument("--trial-s", type=float, default=10.0, help="seconds of work per trial")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--orders", default="concurrent,sequential,tune",
                    help="which orders to run: concurrent (dmlbench), sequential (cells one after another), tune "
                    "(the same trials as one plain Tune experiment: the ceiling on this machine)")
    ap.add_argument("--sweep-max-concurrent", type=int, default=None,
                    help="the concurrent order's sweep-wide cap (default: none, as the slots allow)")
    args = ap.parse_args()
    EPOCH_S = args.trial_s / args.epochs
    # the sweep driver's Tune settings (sweep.run sets them too): experiment state saved every
    # second, the legacy reporter (quiet at verbose=0)
    os.environ.update({"TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_AIR_NEW_OUTPUT": "0"})

    import ray

    from dmlbench.orchestrator import sweep
    from dmlbench.orchestrator.spec import SweepSpec
    from dmlbench.results import schema, store
    from dmlbench.search_spaces import loader

    tmp = Path(tempfile.mkdtemp(prefix="util"))
    spaces = tmp / "spaces"
    spaces.mkdir()
    for m in METHODS:
        (spaces / f"{m}.yaml").write_text(f"method: {m}\nparams:\n  - {{name: x, type: float, low: 0.1, high: 0.9}}\n")
    loader.SPACES_DIR = spaces
    ray_tmp = tempfile.mkdtemp(prefix="ru", dir="/tmp")
    fake_trials.start_ray(sys.modules[__name__], register, ray_tmp, num_cpus=args.slots)
    results = {}
    notes: dict[str, str] = {}
    try:
        for order in args.orders.split(","):
            spec = SweepSpec(methods=METHODS[: args.methods], datasets=tuple(args.datasets.split(",")),
                             backbones=("tiny",), trials=args.trials, epochs=args.epochs, grace_period=args.epochs,
                             final_seeds=args.final_seeds, folds=FOLDS, search_folds=1, cpus_per_trial=1, name=order,
                             sweep_max_concurrent=args.sweep_max_concurrent,
                             output=str(tmp / order), trial_base={"pretrained": False})  # fmt: skip
            TIMELINE = str(tmp / f"{order}-timeline.jsonl")
            trials = len(spec.cells()) * (args.trials + args.final_seeds)  # each one trial's work
            busy: list[float] = []
            done = threading.Event()
            sampler = threading.Thread(target=sample_busy, args=(args.slots, busy, done), daemon=True)
            t0 = time.perf_counter()
            sampler.start()
            try:
                if order == "concurrent":
                    sweep.run(spec, train_fn=sleep_train, echo=lambda s: None)
                elif order == "sequential":
                    run_sequential(spec)
                else:
                    run_plain_tune(trials, args.epochs, tmp / order)
            finally:
                done.set()
                sampler.join()
            wall = time.perf_counter() - t0
            notes[order] = f"{breakdown(Path(TIMELINE))}; slots held by tenth of the run: {held_by_tenth(busy, args.slots)}"
            if order == "tune":
                results[order] = (wall, trials * args.trial_s, sum(busy) / max(len(busy), 1))
                continue
            rows, _ = store.read_rows(tmp / order)
            # a final seed: one row per fold model and one for their concatenated embedding
            n = len(spec.cells()) * (args.trials + args.final_seeds * (FOLDS + 1))
            if len(rows) != n or set(rows[schema.STATUS]) != {"complete"}:
                raise SystemExit(f"benchmark invalid ({order}): {len(rows)} rows, statuses "
                                 f"{rows[schema.STATUS].value_counts().to_dict()} (expected {n} complete)")  # fmt: skip
            models = rows[~rows[schema.PROTOCOL].astype(str).str.contains("-concat")]
            work = float(sum(e * epoch_s(ph) for e, ph in zip(models[schema.EPOCHS], models[schema.PHASE])))
            results[order] = (wall, work, sum(busy) / max(len(busy), 1))
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)

    cells = args.methods * len(args.datasets.split(","))
    print(f"{args.slots} slots; {cells} cells x ({args.trials} search + {args.final_seeds} final) trials of "
          f"{args.trial_s:.0f} s ({args.epochs} epochs, no pruning)")
    print(f"{'order':<11} {'wall s':>8} {'work s':>8} {'utilisation':>12} {'slots held':>11}")
    for order, (wall, work, held) in results.items():
        print(f"{order:<11} {wall:>8.1f} {work:>8.1f} {work / (args.slots * wall):>11.1%} {held / args.slots:>10.1%}")
    for order, note in notes.items():
        print(f"{order}: {note}")
    print("(slots held: the mean share of the slots that Ray had handed to trials, sampled every 0.25 s; the gap to "
          "utilisation is each trial's own start-up and wrap-up, the gap to 100 % is the driver's scheduling)")
    if {"concurrent", "sequential"} <= results.keys():
        cw, sw = results["concurrent"][0], results["sequential"][0]
        print(f"concurrent / sequential wall time: {cw / sw:.2f} (sequential takes {sw / cw:.2f}x as long)")


if __name__ == "__main__":
    main()
