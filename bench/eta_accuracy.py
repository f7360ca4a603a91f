"""How right is the ETA of ``dmlbench status``? Runs a sweep (default: the smoke sweep of
``make sweep``) through the real CLI in a subprocess, reads the sweep's status every ``--every``
seconds exactly as ``dmlbench status`` does (:func:`dmlbench.orchestrator.status.progress_of`), and
when the sweep has ended compares every ETA with the time that was really left.

Prints one line per sample (trials done, ETA, actual remaining, error) and the largest error once a
third of the trials had ended (the issue's bar: within 25 %).

    python bench/eta_accuracy.py                       # the smoke sweep, output in a temporary folder
    python bench/eta_accuracy.py -- --methods ccp --datasets digits --preset smoke
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("sweep_args", nargs="*", help="dmlbench sweep options (default: the smoke sweep)")
    args = ap.parse_args()

    from dmlbench.errors import DmlbenchError
    from dmlbench.orchestrator.status import progress_of, sweep_eta

    out = Path(tempfile.mkdtemp(prefix="eta"))
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
        shutil.rmtree(out, ignore_errors=True)

    print(f"sweep: {' '.join(args.sweep_args or SMOKE)}; wall {t_end - t0:.0f} s to the driver's recorded end, "
          f"the command exited {t_exit - t_end:.1f} s later")
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
