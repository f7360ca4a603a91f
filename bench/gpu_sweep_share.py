"""Trials sharing one GPU: a 4-trial smoke sweep with ``--gpus-per-trial 0.25`` on CUDA.

Runs the sweep through the library (``orchestrator.sweep``, as ``dmlbench sweep`` does):
``--methods proxyanchor --datasets synthetic --preset smoke --trials 4 --final-seeds 0
--gpus-per-trial 0.25``, with one change to the preset's trial settings: ``device=cuda`` (the smoke
preset pins ``device=cpu`` so that it runs anywhere) and a few more steps per epoch so the trials
overlap long enough to be seen. While it runs, a thread samples
``nvidia-smi --query-compute-apps=pid,used_memory`` every 0.5 s; the evidence of sharing is the
largest number of distinct processes holding memory on the GPU at once (one per running trial).
Then it prints each row's status, ``gpu_type`` and the device its config trained on.

    python bench/gpu_sweep_share.py --output /tmp/gpucheck-results      # on a GPU machine
    python bench/gpu_sweep_share.py --dry-run                            # the plan only (any machine)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


class SmiSampler(threading.Thread):
    """Samples the GPU's compute processes every ``period`` seconds until stopped."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period = period
        self.samples: list[dict[int, str]] = []
        self.error: str | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        cmd = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"]
        while not self._stop_event.is_set():
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired) as err:
                self.error = f"{type(err).__name__}: {err}"
                return
            if out.returncode != 0:
                self.error = (out.stderr or out.stdout).strip()[:200]
                return
            rows = [ln.split(",") for ln in out.stdout.strip().splitlines() if ln.strip()]
            self.samples.append({int(r[0]): r[1].strip() for r in rows if r[0].strip().isdigit()})
            self._stop_event.wait(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=15)

    def busiest(self) -> dict[int, str]:
        return max(self.samples, key=len, default={})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=None, help="results folder (default: a new temporary one)")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--gpus-per-trial", type=float, default=0.25)
    ap.add_argument("--iters-per-epoch", type=int, default=40, help="steps per epoch (the preset has 4)")
    ap.add_argument("--dry-run", action="store_true", help="print the sweep's plan and start nothing")
    args = ap.parse_args()

    from dmlbench.orchestrator import sweep as sw
    from dmlbench.orchestrator.presets import preset_defaults

    output = args.output or Path(tempfile.mkdtemp(prefix="gpucheck-results-"))
    trial_base = {**preset_defaults("smoke")["trial_base"], "device": "cuda", "iters_per_epoch": args.iters_per_epoch}
    spec = sw.build_spec(
        methods="proxyanchor", datasets="synthetic", preset="smoke", trials=args.trials, final_seeds=0,
        gpus_per_trial=args.gpus_per_trial, output=output, trial_base=trial_base,
    )  # fmt: skip
    if args.dry_run:
        sw.run(spec, dry_run=True)
        return 0
    if shutil.which("nvidia-smi") is None:
        print("nvidia-smi is not on PATH: this check needs an NVIDIA GPU machine (use --dry-run elsewhere).",
              file=sys.stderr)
        return 2
    sampler = SmiSampler()
    sampler.start()
    t0 = time.time()
    try:
        sw.run(spec)
    finally:
        sampler.stop()
    print(f"sweep wall time {time.time() - t0:.0f} s; {len(sampler.samples)} nvidia-smi samples")
    if sampler.error:
        print(f"nvidia-smi sampling stopped: {sampler.error}")
    busiest = sampler.busiest()
    print(f"max distinct GPU processes at once: {len(busiest)} "
          f"({', '.join(f'pid {p}: {m}' for p, m in sorted(busiest.items())) or 'none'})")
    import pandas as pd

    from dmlbench.results import schema

    files = sorted(output.glob("*/rows/*.parquet"))
    if not files:
        print(f"no result rows under {output}")
        return 1
    rows = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    rows["device"] = [json.loads(c).get("device") for c in rows[schema.CONFIG_JSON]]
    cols = [schema.TRIAL_ID, schema.PHASE, schema.STATUS, schema.GPU_TYPE, "device", schema.WALL_TIME_S]
    print(rows[cols].to_string(index=False))
    shared = len(busiest) >= 2
    finished = rows[schema.STATUS].isin(("complete", "pruned")).all() and len(rows) == args.trials
    on_gpu = (rows[schema.GPU_TYPE] != "cpu").all() and (rows["device"] == "cuda").all()
    ok = shared and finished and on_gpu
    print(f"GPU shared by {len(busiest)} trials at once: {'yes' if shared else 'NO'}; {len(rows)} rows, all finished: "
          f"{'yes' if finished else 'NO'}; all on the GPU: {'yes' if on_gpu else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
