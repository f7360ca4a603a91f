"""SOP-sized evaluation on one device: dmlbench vs pytorch-metric-learning's AccuracyCalculator.

Same fp32 embeddings for both, held on ``--device`` (default cuda): 60,502 × 512 in 11,316 classes
of 2–12 items (the SOP test split's shape). Retrieval first: P@1, R-Precision and MAP@R from
dmlbench's ``evaluate_embeddings`` (torch k-NN on the device) vs PML's
``AccuracyCalculator(k="max_bin_count", device=..., knn_func=CustomKNN(LpDistance, batch_size))``
(k-NN on the device in blocks). As in ``bench/eval_vs_pml.py`` the embeddings are small integers
compared by euclidean distance, so every float32 sum is exact and both libraries see the same
distances; neighbours at exactly the same distance are ordered by index in dmlbench and as
``torch.topk`` leaves them in PML, so a tie at the R-th place can move MAP@R by about 1/(N·R).
The values must agree to ``--tol`` (default 1e-4; exit 1 otherwise), and the largest difference is
printed. dmlbench's R@1/10/100/1000 (the SOP protocol's k list; 1,000 neighbours per query) are
timed on their own after. Then clustering (``--clustering``,
on by default): dmlbench's NMI and F1 vs PML's NMI (PML's own faiss k-means; skipped when faiss
cannot be imported); the k-means differ, so these values are printed side by side, not compared.

Each part prints its wall time (the device synchronised), its ratio, and peak device memory.

    python bench/gpu_eval_check.py                    # 60,502 x 512 on cuda (bench/gpu_check.sh)
    python bench/gpu_eval_check.py --quick            # 2,000 x 64 on cpu (smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

RETRIEVAL = {"precision_at_1": "precision_at_1", "r_precision": "r_precision", "mean_average_precision_at_r": "map_at_r"}
RETRIEVAL_OURS = ("precision_at_1", "r_precision", "map_at_r", "recall")


def sop_like(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` integer embeddings in ``classes`` classes of 2–12 items (sizes summing to ``n``).

    Example:
        >>> x, y = sop_like(100, 8, 20)
        >>> x.shape, int(np.bincount(y).min()) >= 2, int(np.bincount(y).max()) <= 12
        ((100, 8), True, True)
    """
    if not 2 * classes <= n <= 12 * classes:
        raise SystemExit(f"{n} items cannot form {classes} classes of 2-12 items")
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 13, classes)
    while (gap := n - int(sizes.sum())) != 0:  # move random classes one item towards the total
        room = np.flatnonzero(sizes < 12) if gap > 0 else np.flatnonzero(sizes > 2)
        sizes[rng.choice(room, size=min(abs(gap), len(room)), replace=False)] += 1 if gap > 0 else -1
    labels = rng.permutation(np.repeat(np.arange(classes), sizes)).astype(np.int64)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    emb = centres[labels] + 2.0 * rng.standard_normal((n, dim), dtype=np.float32)
    # integers in [-45, 45]: every float32 dot product and squared distance is exact for dim <= 512
    emb = np.clip(np.rint(emb * 8.0), -45, 45)
    return np.ascontiguousarray(emb, dtype=np.float32), labels


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """(result, seconds, peak device MiB above the start; 0 on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else 0.0
    return out, seconds, peak


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60_502)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=11_316)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--chunk", type=int, default=4096, help="queries per block on both sides")
    ap.add_argument("--retrieval", action=argparse.BooleanOptionalAction, default=True,
                    help="P@1, R-Precision, MAP@R (compared) and R@k (dmlbench)")
    ap.add_argument("--clustering", action=argparse.BooleanOptionalAction, default=True,
                    help="also NMI/F1 (dmlbench) and NMI (PML, faiss k-means)")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed |dmlbench - PML| per metric")
    ap.add_argument("--quick", action="store_true", help="2,000 x 64, 400 classes, on cpu")
    args = ap.parse_args()
    if args.quick:
        args.n, args.dim, args.classes, args.device = 2_000, 64, 400, "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda was asked for but CUDA is not available here; use --device cpu or --quick.", file=sys.stderr)
        return 2

    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    from dmlbench.evaluation import evaluate_embeddings

    x_np, y_np = sop_like(args.n, args.dim, args.classes)
    x = torch.from_numpy(x_np).to(device)
    y = torch.from_numpy(y_np).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"evaluation on {name}: {args.n:,} x {args.dim} fp32, {args.classes:,} classes of "
          f"{int(np.bincount(y_np).min())}-{int(np.bincount(y_np).max())}, euclidean, blocks of {args.chunk}", flush=True)

    def pml(include: tuple[str, ...], n: int = args.n) -> dict[str, float]:
        calc = AccuracyCalculator(include=include, k="max_bin_count", device=device,
                                  knn_func=CustomKNN(LpDistance(normalize_embeddings=False), batch_size=args.chunk))
        return {k: float(v) for k, v in calc.get_accuracy(x[:n], y[:n]).items()}

    def ours(metrics: tuple[str, ...], n: int = args.n) -> dict[str, float]:
        return evaluate_embeddings(x[:n], y[:n], metrics=metrics, distance="euclidean",
                                   recall_ks=(1, 10, 100, 1000), chunk_size=args.chunk, backend="torch")

    # warm both on a slice first (CUDA context, kernel loading), then time the full size
    ok = True
    if args.retrieval:
        same = tuple(RETRIEVAL.values())
        ours(same + ("recall",), n=min(args.n, 4096))
        pml(tuple(RETRIEVAL), n=min(args.n, 4096))
        d_vals, d_s, d_mem = timed(lambda: ours(same), device)
        p_vals, p_s, p_mem = timed(lambda: pml(tuple(RETRIEVAL)), device)
        diff = max(abs(d_vals[ours_key] - p_vals[k]) for k, ours_key in RETRIEVAL.items())
        for k, ours_key in RETRIEVAL.items():
            print(f"  {ours_key:15s} dmlbench {d_vals[ours_key]:.6f}  PML {p_vals[k]:.6f}")
        print(f"retrieval (P@1, R-Precision, MAP@R): dmlbench {d_s:.2f} s (peak {d_mem:,.0f} MiB)  PML {p_s:.2f} s "
              f"(peak {p_mem:,.0f} MiB)  PML / dmlbench time = {p_s / d_s:.2f}x", flush=True)
        ok = diff <= args.tol
        print(f"retrieval values {'agree' if ok else 'DIFFER'} (max |dmlbench - PML| = {diff:.3g}, tolerance "
              f"{args.tol:g})", flush=True)
        r_vals, r_s, _ = timed(lambda: ours(("recall",)), device)
        print("  dmlbench R@1/10/100/1000 (the SOP protocol's; PML has no R@k): "
              + ", ".join(f"{r_vals[f'recall_at_{k}']:.4f}" for k in (1, 10, 100, 1000)) + f" in {r_s:.2f} s",
              flush=True)
    if args.clustering:
        c_vals, c_s, c_mem = timed(lambda: ours(("nmi", "f1")), device)
        print(f"clustering: dmlbench NMI {c_vals['nmi']:.4f} F1 {c_vals['f1']:.4f} in {c_s:.2f} s (peak "
              f"{c_mem:,.0f} MiB)", flush=True)
        try:
            import faiss  # PML's k-means
        except ImportError:
            print(f"clustering: dmlbench NMI {c_vals['nmi']:.4f} F1 {c_vals['f1']:.4f} in {c_s:.2f} s; PML's NMI "
                  f"skipped (its k-means needs faiss, which cannot be imported here)")
        else:
            n_vals, n_s, _ = timed(lambda: pml(("NMI",)), device)
            print(f"clustering: PML NMI {n_vals['NMI']:.4f} in {n_s:.2f} s (its faiss k-means, on "
                  f"{'the GPU' if faiss.get_num_gpus() else 'the CPU: faiss has no GPU support here'})  "
                  f"PML / dmlbench time = {n_s / c_s:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
