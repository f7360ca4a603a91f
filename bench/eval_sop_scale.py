"""SOP-sized evaluation on CPU: dmlbench's evaluate_embeddings vs PML's AccuracyCalculator.

The embeddings have the shape of Stanford Online Products' test split: 60,502 items in 11,316
classes of 2-12 items (seeded sizes ``2 + Binomial(10, p)`` with mean 60,502 / 11,316 = 5.35 and
exactly these totals, as the full-size SOP stand-in of ``tests/fixtures/standins.py``), 512
dimensions, class centres plus Gaussian noise, L2-normalised. Both sides get the same float32 file.

* **dmlbench**: ``evaluate_embeddings`` with every metric (MAP@R, R-Precision, P@1, Recall@k,
  NMI and F1), cosine distance, the default backend. Recall@k at ``--recall-ks``, by default
  ``dmlbench evaluate``'s 1, 2, 4, 8, so the k-NN needs k = 11 (the largest class); SOP trials
  use 1, 10, 100, 1000, which needs k = 1000 (``--recall-ks 1,10,100,1000``).
* **PML**: ``AccuracyCalculator(k="max_bin_count")`` with its default FaissKNN and FaissKMeans
  (random start, 20 iterations) and every metric it has except AMI: precision_at_1, r_precision,
  mean_average_precision_at_r, mean_average_precision, mean_reciprocal_rank and NMI. AMI
  (scikit-learn's expected mutual information over an 11k x 11k contingency table) alone took
  78 s on the 2-core box; ``--pml-ami`` adds it. PML gets the normalised embeddings (its L2
  ranking then orders like cosine).

Each side runs in its own subprocess, which imports its libraries, loads the file, and then times
one evaluation (wall clock and process CPU time); its peak resident memory is its own
``ru_maxrss`` (``resource.getrusage``), printed in total and above the resident size it had
after loading. Prints both, the ratio PML / dmlbench, and the largest difference of the metrics
both compute (P@1, R-Precision and MAP@R must agree to ``--tol``: the two rank in float32 with
different rounding, so only neighbours whose scores differ by ~1e-7 could swap; NMI is reported
but not checked: the two k-means start differently, see docs/evaluation.md).

Usage::

    python bench/eval_sop_scale.py            # SOP size, several minutes on 2 cores
    python bench/eval_sop_scale.py --quick    # 9,000 x 64 in 1,700 classes, seconds
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.standins import class_sizes  # noqa: E402  (the stand-in SOP's class sizes)

SOP_ITEMS, SOP_CLASSES = 60_502, 11_316
SHARED = {"precision_at_1": "precision_at_1", "r_precision": "r_precision",
          "mean_average_precision_at_r": "map_at_r", "NMI": "nmi"}
RETRIEVAL_SHARED = ("precision_at_1", "r_precision", "map_at_r")


def make_data(items: int, classes: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-structured, L2-normalised float32 embeddings and their labels (shuffled order)."""
    rng = np.random.default_rng(seed)
    sizes = class_sizes(classes, items, 2, 12, rng)
    labels = rng.permutation(np.repeat(np.arange(classes), sizes)).astype(np.int64)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    emb = centres[labels] + noise * rng.standard_normal((items, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return np.ascontiguousarray(emb, dtype=np.float32), labels


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(side: str, folder: Path, recall_ks: tuple[int, ...], pml_ami: bool) -> dict[str, object]:
    """One side in a fresh process: imports and data first, then one timed evaluation."""
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from dmlbench.evaluation import METRICS, evaluate_embeddings

    emb = torch.from_numpy(np.load(folder / "emb.npy"))
    labels = torch.from_numpy(np.load(folder / "labels.npy"))
    base = rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    if side == "dmlbench":
        values = evaluate_embeddings(emb, labels, metrics=METRICS, recall_ks=recall_ks, distance="cosine")
    elif side == "pml":
        exclude = () if pml_ami else ("AMI",)
        calc = AccuracyCalculator(exclude=exclude, k="max_bin_count", device=torch.device("cpu"))
        values = {k: float(v) for k, v in calc.get_accuracy(emb, labels).items()}
    else:
        raise ValueError(side)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_mib": peak, "peak_above_data_mib": peak - base,
            "values": values}


def run_side(side: str, folder: Path, recall_ks: tuple[int, ...], pml_ami: bool) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--worker", side, "--folder", str(folder),
           "--recall-ks", ",".join(map(str, recall_ks))] + (["--pml-ami"] if pml_ami else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the {side} side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=SOP_ITEMS)
    ap.add_argument("--classes", type=int, default=SOP_CLASSES)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--noise", type=float, help="noise std per dimension, class centres having 1 (default 2.2, "
                    "--quick 1.2: P@1 about 0.75, near SOP's published range)")
    ap.add_argument("--recall-ks", default="1,2,4,8",
                    help="dmlbench's Recall@k list: `dmlbench evaluate`'s default; SOP trials use 1,10,100,1000")
    ap.add_argument("--pml-ami", action="store_true", help="also compute PML's AMI (slow at SOP size)")
    ap.add_argument("--tol", type=float, default=1e-6, help="largest allowed retrieval-metric difference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="9,000 x 64 in 1,700 classes (smoke run)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    recall_ks = tuple(int(k) for k in args.recall_ks.split(","))

    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.folder), recall_ks, args.pml_ami)))
        return
    if args.quick:
        args.items, args.classes, args.dim = 9_000, 1_700, 64
    if args.noise is None:
        args.noise = 1.2 if args.quick else 2.2

    import torch

    emb, labels = make_data(args.items, args.classes, args.dim, args.noise, args.seed)
    sizes = np.bincount(labels)
    print(f"{args.items:,} x {args.dim} embeddings, {args.classes:,} classes of {sizes.min()}-{sizes.max()} "
          f"(mean {sizes.mean():.2f}), noise {args.noise}; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    res: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "emb.npy", emb)
        np.save(folder / "labels.npy", labels)
        for side in ("dmlbench", "pml"):
            r = res[side] = run_side(side, folder, recall_ks, args.pml_ami)
            print(f"  {side:9s} wall {r['seconds']:8.2f} s   cpu {r['cpu_seconds']:8.2f} s   "
                  f"peak RSS {r['peak_mib']:6.0f} MiB (+{r['peak_above_data_mib']:5.0f} MiB above the loaded data)")
    dml, pml = res["dmlbench"]["values"], res["pml"]["values"]
    assert isinstance(dml, dict) and isinstance(pml, dict)
    print(f"dmlbench: {json.dumps({k: round(v, 6) for k, v in dml.items()})}")
    print(f"PML     : {json.dumps({k: round(v, 6) for k, v in pml.items()})}")
    diffs = {ours: abs(dml[ours] - pml[theirs]) for theirs, ours in SHARED.items()}
    print("|dmlbench - PML|: " + ", ".join(f"{k} {d:.3g}" for k, d in diffs.items())
          + f"; max over retrieval metrics = {max(diffs[k] for k in RETRIEVAL_SHARED):.3g}")
    d, p = res["dmlbench"], res["pml"]
    print(f"PML / dmlbench time (target >= 1.5x): wall {float(p['seconds']) / float(d['seconds']):.2f}x, "  # type: ignore[arg-type]
          f"cpu {float(p['cpu_seconds']) / float(d['cpu_seconds']):.2f}x; "  # type: ignore[arg-type]
          f"peak RSS dmlbench {d['peak_mib']:.0f} MiB vs PML {p['peak_mib']:.0f} MiB")
    bad = {k: diffs[k] for k in RETRIEVAL_SHARED if not diffs[k] <= args.tol}
    if bad:
        raise SystemExit(f"retrieval metrics differ beyond {args.tol}: {bad}")


if __name__ == "__main__":
    main()
