"""How right is the ETA of ``dmlbench status``? Runs a sweep (default: the smoke sweep of
``make sweep``) through the real CLI in a subprocess, reads the sweep's status every ``--every``
seconds exactly as ``dmlbench status`` does (:func:`dmlbench.orchestrator.status.progress_of`), and
when the sweep has ended compares every ETA with the time that was really left.

Prints one line per sample (trials done, ETA, actual remaining, error) and the largest error once a
third of the trials had ended (the issue's bar: within 25 %).

``--keep DIR`` keeps the sweep's output; ``--replay DIR`` runs no sweep and computes, for a sweep
that ended there, the ETA the status would have shown every ``--every`` seconds, from what its
progress files say was known at that moment (trials started and ended by then; a trial's start and
end times are all the ETA reads of it). A replay is exact for the model (no sampling jitter) and
cheap, so several recorded sweeps can judge a change of the ETA model.

    python bench/eta_accuracy.py                       # the smoke sweep, output in a temporary folder
    python bench/eta_accuracy.py --keep /tmp/eta-a     # ... kept for replays
    python bench/eta_accuracy.py --replay /tmp/eta-a
    python bench/eta_accuracy.py -- --methods ccp --datasets digits --preset smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOKE = ["--methods", "nivmf,ccp,diva,proxyanchor", "--datasets", "embedded", "--preset", "smoke"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=float, default=5.0, help="seconds between two status reads")
    ap.add_argument("--keep", type=Path, help="keep the sweep's output in this (new) folder")
    ap.add_argument("--replay", type=Path, help="no sweep: replay the ETA of the sweep that ended in this folder")
    ap.add_argument("sweep_args", nargs="*", help="dmlbench sweep options (default: the smoke sweep)")
    args = ap.parse_args()
    if args.replay:
        samples, t0, t_end = replay(args.replay, args.every)
        print(f"replay of {args.replay}: wall {t_end - t0:.0f} s to the driver's recorded end")
        report(samples, t0, t_end)
        return

    from dmlbench.errors import DmlbenchError
    from dmlbench.orchestrator.status import progress_of, sweep_eta

    out = args.keep or Path(tempfile.mkdtemp(prefix="eta"))
    if args.keep:
        out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "dmlbench.cli", "sweep", *(args.sweep_args or SMOKE), "--output", str(out)]
    samples: list[tuple[float, int, int, float | None]] = []
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="re", dir="/tmp")})  # fmt: skip
    try:
        while proc.poll() is None:
            time.sleep(args.every)
            try:
                progress = progress_of(out)
            except DmlbenchError:
                continue  # the sweep folder is not there yet
            cells = [c for p in progress for c in p.cells]
            samples.append((time.time(), sum(c.done for c in cells), sum(c.planned for c in cells),
                            sweep_eta(progress)))  # fmt: skip
        t_exit = time.time()
        if proc.returncode != 0:
            raise SystemExit(f"the sweep failed (exit {proc.returncode}): {(proc.stderr.read() if proc.stderr else '')[-2000:]}")
        # the sweep ends when its driver records its end (after Ray's shutdown); the interpreter's own
        # teardown after that is not sweep time, printed apart
        ended = [p.ended for p in progress_of(out)]
        t_end = ended[0] if len(ended) == 1 and ended[0] is not None else t_exit
    finally:
        if proc.poll() is None:
            proc.terminate()
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    print(f"sweep: {' '.join(args.sweep_args or SMOKE)}; wall {t_end - t0:.0f} s to the driver's recorded end, "
          f"the command exited {t_exit - t_end:.1f} s later")
    report(samples, t0, t_end)


def replay(folder: Path, every: float) -> tuple[list[tuple[float, int, int, float | None]], float, float]:
    """ETA samples of the sweep that ended in ``folder``, as ``dmlbench status`` would have shown them
    every ``every`` s from the sweep's start: each from a copy of the progress files cut at that
    moment. Returns the samples, the start and the recorded end."""
    from dmlbench.orchestrator.spec import SweepSpec
    from dmlbench.orchestrator.status import sweep_eta, sweep_progress
    from dmlbench.orchestrator.sweepdir import PROGRESS_DIR, SWEEP_PROGRESS

    spec_file = folder / "sweep.json" if (folder / "sweep.json").exists() else next(folder.glob("*/sweep.json"))
    spec = SweepSpec.model_validate(json.loads(spec_file.read_text())["spec"])
    src = spec_file.parent / PROGRESS_DIR
    files = {p.stem: json.loads(p.read_text()) for p in src.glob("*.json")}
    sweep = files.pop(SWEEP_PROGRESS)
    t0, t_end = float(sweep["started"]), float(sweep["ended"])
    samples = []
    with tempfile.TemporaryDirectory(prefix="eta-replay") as tmp:
        cut = Path(tmp) / PROGRESS_DIR
        cut.mkdir()
        t = t0 + every
        while t < t_end + every:
            (cut / f"{SWEEP_PROGRESS}.json").write_text(json.dumps({k: v for k, v in sweep.items() if k != "ended" or v <= t}))
            for name, state in files.items():
                trials = state.get("ended") or {}
                ended = {k: v for k, v in trials.items() if v["ended"] <= t}
                running = {k: {"started": v["started"], "epoch": 0, "metric": None}
                           for k, v in trials.items() if v["started"] <= t < v["ended"]}  # fmt: skip
                if not any(v["started"] <= t for v in trials.values()):
                    continue  # the experiment had not opened yet (its file appears with its first trial)
                kept = {k: v for k, v in state.items() if k not in ("closed", "ended", "running")}
                if state.get("closed") is not None and state["closed"] <= t:
                    kept["closed"] = state["closed"]
                (cut / f"{name}.json").write_text(json.dumps({**kept, "ended": ended, "running": running}))
            progress = sweep_progress(spec, Path(tmp), rows=None, now=t)
            cells = progress.cells
            samples.append((t, sum(c.done for c in cells), sum(c.planned for c in cells), sweep_eta([progress])))
            t += every
    return samples, t0, t_end


def report(samples: list[tuple[float, int, int, float | None]], t0: float, t_end: float) -> None:
    print(f"{'t s':>6} {'done':>9} {'ETA s':>7} {'actual s':>9} {'error':>7}")
    worst = 0.0
    for t, done, total, eta in samples:
        actual = max(t_end - t, 0.0)
        err = None if eta is None or actual <= 0 else (eta - actual) / actual
        print(f"{t - t0:>6.0f} {done:>4}/{total:<4} {'-' if eta is None else f'{eta:.0f}':>7} {actual:>9.0f} "
              f"{'-' if err is None else f'{err:+.0%}':>7}")  # fmt: skip
        if err is not None and total and done >= total / 3 and done < total:
            worst = max(worst, abs(err))
    print(f"largest |error| once a third of the trials had ended: {worst:.0%}")


if __name__ == "__main__":
    main()
