"""dmlbench's retrieval metrics vs pytorch-metric-learning's AccuracyCalculator, same embeddings.

Computes P@1, R-Precision and MAP@R with both on the same embeddings in the same run, asserts that
the values agree (to ``--tol``), and prints the time ratio, the peak memory of each side, and the
times of bare float32 matmuls without any selection (the floors):

* ``matmul``: the one product ``X @ X.T`` (a fresh ``[N, N]`` result), every similarity;
* ``matmul-chunked``: the same flops into one reused ``[chunk, N]`` buffer;
* ``matmul-half``: the upper-triangle tile products of dmlbench's symmetric path (square tiles
  of side ``min(chunk, 1024)`` on and above the diagonal, each similarity once), without its
  selection kernels and without its 1,024-item sample products.

PML (faiss) forms every similarity; dmlbench's symmetric path (automatic on CPU from
``SYMMETRIC_MIN_N`` = 8,192 embeddings) forms each once, so its like-for-like floor is
``matmul-half`` and the headline floor ratio uses it; below that size dmlbench forms every
similarity too and the headline floor is ``matmul-chunked``.

Times are wall clock and process CPU time (all threads). On a shared box the wall times swing
several-fold with other people's load; CPU time with ``OMP_NUM_THREADS=1`` is the stable figure.

Each side runs in its own subprocess so that its peak resident memory (``ru_maxrss``, which sees
torch and faiss allocations, unlike tracemalloc) is its own; the figure printed is the peak minus
the resident size after the embeddings were loaded.

Embeddings: ``--classes`` balanced classes, Gaussian class centres plus noise. By default they are
rounded to small integers and compared with the euclidean distance: squared distances are then
exact in float32 for both libraries (faiss computes ``|q|² + |r|² - 2 q·r``, dmlbench
``2 q·r - |q|² - |r|²``), ties are real ties, broken by lower index on both sides, so the values
must be identical. ``--distance cosine`` uses float embeddings instead; there both sides round
differently and neighbours whose scores differ by ~1e-7 can swap (see docs/evaluation.md).

Usage::

    python bench/eval_vs_pml.py                 # 20,000 x 512, 100 classes
    python bench/eval_vs_pml.py --n 100000      # memory case
    python bench/eval_vs_pml.py --quick         # 9,000 x 64 smoke run (above SYMMETRIC_MIN_N)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METRICS = ("precision_at_1", "r_precision", "map_at_r")
ONE_CALL_MAX_N = 40_000  # the one-call floor holds an [N, N] float32 result
PML_NAMES = {"precision_at_1": "precision_at_1", "r_precision": "r_precision",
             "mean_average_precision_at_r": "map_at_r"}


def make_data(n: int, dim: int, classes: int, seed: int, distance: str) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels, class centres + noise; small integers for the exact euclidean case."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % classes).astype(np.int64)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    emb = centres[labels] + 4.0 * rng.standard_normal((n, dim), dtype=np.float32)
    if distance == "euclidean":
        # integers in [-45, 45]: |q|², |r|², 2 q·r and |q - r|² stay below 2²⁴ for dim ≤ 512, so
        # every float32 sum is exact; the fine grid keeps exact ties rare, as with real embeddings
        if dim > 512:
            raise SystemExit("the exact euclidean case needs --dim <= 512")
        emb = np.clip(np.rint(emb * 3.5), -45, 45)
    return np.ascontiguousarray(emb, dtype=np.float32), labels


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(side: str, folder: Path, distance: str, chunk: int) -> dict[str, object]:
    """One side, in a fresh process: load the arrays, run twice, report times and memory."""
    import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401  (imports outside the timing)
    import torch

    import dmlbench.evaluation  # noqa: F401

    emb = torch.from_numpy(np.load(folder / "emb.npy"))
    labels = torch.from_numpy(np.load(folder / "labels.npy"))
    base = rss_mib()
    runs = []
    for _ in range(2):  # cold (first call in this process: imports, JIT loading) then warm
        t0, c0 = time.perf_counter(), time.process_time()
        values = run_once(side, emb, labels, distance, chunk)
        runs.append((time.perf_counter() - t0, time.process_time() - c0))
    return {"seconds": runs[0][0], "cpu_seconds": runs[0][1], "warm_seconds": runs[1][0],
            "warm_cpu_seconds": runs[1][1], "peak_mib": peak_mib() - base, "values": values}


def run_once(side: str, emb, labels, distance: str, chunk: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from dmlbench.evaluation import evaluate_embeddings

    if side == "dmlbench":
        return evaluate_embeddings(emb, labels, metrics=("precision_at_1", "r_precision", "map_at_r"),
                                   distance=distance, chunk_size=chunk, backend="torch")
    if side == "pml":
        calc = AccuracyCalculator(include=tuple(PML_NAMES), k="max_bin_count", device=torch.device("cpu"))
        query = torch.nn.functional.normalize(emb, dim=1) if distance == "cosine" else emb
        return {PML_NAMES[k]: float(v) for k, v in calc.get_accuracy(query, labels).items()}
    if side == "matmul":  # the bare product X @ X.T, [N, N] float32 in one call
        if emb.shape[0] > ONE_CALL_MAX_N:
            raise SystemExit(f"the one-call floor needs N <= {ONE_CALL_MAX_N:,} (an [N, N] float32 result)")
        torch.mm(emb, emb.T)
        return {}
    if side == "matmul-chunked":  # the same flops into one reused [chunk, N] buffer
        n = emb.shape[0]
        out = torch.empty(min(chunk, n), n)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            torch.mm(emb[s:e], emb.T, out=out[: e - s])
        return {}
    if side == "matmul-half":  # the symmetric path's tile products, each similarity once
        from dmlbench.evaluation.knn import _TILE

        n = emb.shape[0]
        side_len = max(1, min(chunk, _TILE))
        flat = torch.empty(side_len * min(side_len, n))
        for s in range(0, n, side_len):
            e = min(s + side_len, n)
            for t in range(s, n, side_len):
                u = min(t + side_len, n)
                torch.mm(emb[s:e], emb[t:u].T, out=flat[: (e - s) * (u - t)].view(e - s, u - t))
        return {}
    raise ValueError(side)


def run_side(side: str, folder: Path, distance: str, chunk: int) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--worker", side, "--folder", str(folder), "--distance", distance,
           "--chunk", str(chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="number of embeddings")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--distance", choices=("euclidean", "cosine"), default="euclidean")
    ap.add_argument("--chunk", type=int, default=4096, help="dmlbench chunk size")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="runs per side; the fastest is reported")
    ap.add_argument("--quick", action="store_true", help="9,000 x 64 smoke run (the symmetric path runs)")
    ap.add_argument("--skip-pml", action="store_true", help="dmlbench and the floor only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.folder), args.distance, args.chunk)))
        return
    if args.quick:  # just above SYMMETRIC_MIN_N, so the symmetric path is what runs
        args.n, args.dim, args.classes = 9_000, 64, 45

    import torch

    from dmlbench.evaluation.knn import SYMMETRIC_MIN_N

    emb, labels = make_data(args.n, args.dim, args.classes, args.seed, args.distance)
    print(f"{args.n} x {args.dim} embeddings, {args.classes} classes, {args.distance}; "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    symmetric = args.n >= SYMMETRIC_MIN_N
    floors = (["matmul-half"] if symmetric else []) + ["matmul-chunked"] + (["matmul"] if args.n <= ONE_CALL_MAX_N else [])
    sides = floors + ["dmlbench"] + ([] if args.skip_pml else ["pml"])
    best: dict[tuple[str, str], dict[str, float]] = {}  # (side, "cold" | "warm") -> fastest run
    values: dict[str, dict[str, float]] = {}
    peak: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "emb.npy", emb)
        np.save(folder / "labels.npy", labels)
        for _ in range(args.repeats):
            for side in sides:
                res = run_side(side, folder, args.distance, args.chunk)
                print(f"  {side:14s} cold: wall {res['seconds']:6.2f} s cpu {res['cpu_seconds']:6.2f} s   "
                      f"warm: wall {res['warm_seconds']:6.2f} s cpu {res['warm_cpu_seconds']:6.2f} s   "
                      f"peak +{res['peak_mib']:6.0f} MiB")
                values[side], peak[side] = res["values"], res["peak_mib"]
                for mode, prefix in (("cold", ""), ("warm", "warm_")):
                    run = {"wall": res[f"{prefix}seconds"], "cpu": res[f"{prefix}cpu_seconds"]}
                    if (side, mode) not in best or run["wall"] < best[(side, mode)]["wall"]:
                        best[(side, mode)] = run

    print(f"dmlbench: {json.dumps(values['dmlbench'])}")

    def ratio(num: str, den: str, mode: str) -> str:
        a, b = best[(num, mode)], best[(den, mode)]
        return f"wall {a['wall'] / b['wall']:.2f}x, cpu {a['cpu'] / b['cpu']:.2f}x"

    # cold: the first evaluation in a fresh process (imports, numba loading its cached kernels);
    # warm: the next one, what every later evaluation of a training run costs.
    # Like for like: the symmetric path forms each similarity once, so its floor is matmul-half;
    # the full products are printed for reference (PML forms every similarity).
    like = floors[0]
    path = "symmetric path" if symmetric else "plain path"
    print(f"dmlbench ({path}) / {like} floor, like for like (target <= 1.5x): "
          f"cold {ratio('dmlbench', like, 'cold')}; warm {ratio('dmlbench', like, 'warm')}")
    for floor in floors[1:]:
        print(f"  for reference, dmlbench / {floor} floor (every similarity): "
              f"cold {ratio('dmlbench', floor, 'cold')}; warm {ratio('dmlbench', floor, 'warm')}")
    if "pml" in values:
        print(f"PML     : {json.dumps(values['pml'])}")
        diffs = {k: abs(values["dmlbench"][k] - values["pml"][k]) for k in METRICS}
        print(f"max |dmlbench - PML| = {max(diffs.values()):.3g}")
        print(f"PML / dmlbench time (target >= 1.5x): cold {ratio('pml', 'dmlbench', 'cold')}; "
              f"warm {ratio('pml', 'dmlbench', 'warm')};  peak memory dmlbench {peak['dmlbench']:.0f} MiB "
              f"vs PML {peak['pml']:.0f} MiB")
        bad = {k: d for k, d in diffs.items() if not d <= args.tol}
        if bad:
            raise SystemExit(f"values differ beyond {args.tol}: {bad}")


if __name__ == "__main__":
    main()
