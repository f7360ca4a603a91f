"""Checkpoint size per method on a real backbone, and what a sweep writes to Tune's storage.

For each method: the backbone (ResNet-50 by default, ``pretrained=False``: the size does not depend
on the weights) with the method's heads/proxies/extra networks, its optimiser after one step (Adam
state exists only then), serialised exactly as the trainer does: ``last.pt`` (resumable: model,
optimiser, scheduler, method extra state) and ``best.pt`` (weights only). CPU is enough.

Then the storage written by a sweep of ``--cells`` cells × ``--trials`` search trials (+ final
seeds): a trial hands Tune one ``last.pt`` per checkpoint period (``--epoch-s`` seconds per epoch,
``--period-s`` between hand-overs, ``--epochs`` per complete trial, ASHA with reduction factor 2
from ``--grace`` epochs pruning half the trials at each rung), the final phase also ``best.pt``;
Tune keeps one per trial. Printed beside the old scheme (every epoch, ``last.pt`` + ``best.pt``, both
full states).

    python bench/checkpoint_size.py --backbone resnet50 --methods nivmf,ccp,diva,proxyanchor
"""

from __future__ import annotations

import argparse
import io
import math
import tempfile
import time
from pathlib import Path
from typing import Any


def sizes(method: str, backbone: str, dataset: str, classes: int) -> tuple[int, int, float]:
    """Bytes of ``last.pt`` and ``best.pt`` as the trainer writes them, and seconds to write
    ``last.pt`` to a local temporary file (atomically, as the trainer does)."""
    import torch

    from dmlbench.config import TrialConfig
    from dmlbench.engine.backbones import build_backbone
    from dmlbench.engine.trainer import CHECKPOINT_VERSION, atomic_torch_save, make_optimizer, make_scheduler
    from dmlbench.methods import METHODS

    cfg = TrialConfig.from_dict({"method": method, "dataset": dataset, "backbone": backbone, "pretrained": False,
                                 "device": "cpu", "progress": False})  # fmt: skip
    model = METHODS.get(method).build(cfg, build_backbone(cfg), num_classes=classes)
    opt = make_optimizer(cfg, model.param_groups(cfg.lr))
    sched = model.configure_scheduler(opt, cfg.epochs) or make_scheduler(cfg, opt)
    for group in opt.param_groups:  # one step with zero gradients: the optimiser's state exists
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()

    def nbytes(obj: Any) -> int:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.tell()

    head = {"format": CHECKPOINT_VERSION, "config": cfg.to_dict(), "model": model.state_dict(),
            "extra": model.extra_state()}  # fmt: skip
    state = {**head, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "trainer": {"epoch": 1},
             "rng": {"torch": torch.get_rng_state()}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        atomic_torch_save(state, Path(tmp) / "last.pt")
        save_s = time.perf_counter() - t0
    return nbytes(state), nbytes({**head, "trainer": {"epoch": 1}}), save_s


def trial_epochs(trials: int, epochs: int, grace: int) -> list[int]:
    """Epochs each of ``trials`` search trials trains under ASHA (reduction factor 2, rungs at
    grace·2^k): half of the trials reaching a rung stop there."""
    rungs = []
    r = grace
    while r < epochs:
        rungs.append(r)
        r *= 2
    out, alive = [], trials
    for rung in rungs:
        stop = alive // 2
        out += [rung] * stop
        alive -= stop
    return out + [epochs] * alive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--methods", default="nivmf,ccp,diva,proxyanchor")
    ap.add_argument("--dataset", default="cub200")
    ap.add_argument("--classes", type=int, default=100, help="training classes (CUB: 100)")
    ap.add_argument("--cells", type=int, default=12, help="cells of the sweep (3 methods x 4 datasets)")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--final-seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--grace", type=int, default=1)
    ap.add_argument("--epoch-s", type=float, default=120.0, help="seconds per epoch (ResNet-50 on one GPU)")
    ap.add_argument("--period-s", type=float, default=600.0)
    args = ap.parse_args()

    rows = {m: sizes(m, args.backbone, args.dataset, args.classes) for m in args.methods.split(",")}
    print(f"{args.backbone}, {args.classes} classes, pretrained=False (sizes do not depend on the weights)")
    print(f"{'method':<14} {'last.pt MB':>11} {'best.pt MB':>11} {'write last.pt s':>16}")
    for m, (last, best, save_s) in rows.items():
        print(f"{m:<14} {last / 1e6:>11.1f} {best / 1e6:>11.1f} {save_s:>16.2f}")

    search = trial_epochs(args.trials, args.epochs, args.grace)
    every = max(1, math.ceil(args.period_s / args.epoch_s))  # epochs between hand-overs
    mean_last = sum(v[0] for v in rows.values()) / len(rows)
    mean_best = sum(v[1] for v in rows.values()) / len(rows)
    new = args.cells * (sum(e // every for e in search) * mean_last
                        + args.final_seeds * (args.epochs // every) * (mean_last + mean_best))  # fmt: skip
    # before: the whole checkpoint folder at every evaluation, last.pt and best.pt both full states
    old = args.cells * (sum(search) + args.final_seeds * args.epochs) * 2 * mean_last
    print(f"\nsweep: {args.cells} cells x {args.trials} trials (ASHA grace {args.grace}, rf 2: epochs per trial "
          f"{sorted(search)}) + {args.final_seeds} final seeds x {args.epochs} epochs, {args.epoch_s:.0f} s/epoch")
    print(f"written to storage, every epoch (last+best, both full): {old / 1e9:8.1f} GB")
    print(f"written to storage, every {args.period_s:.0f} s (last; final +best): {new / 1e9:8.1f} GB  "
          f"(one hand-over every {every} epoch(s); {old / max(new, 1):.1f}x less)")
    kept = args.cells * (sum(e >= every for e in search) * mean_last
                         + args.final_seeds * (args.epochs >= every) * (mean_last + mean_best))  # fmt: skip
    print(f"kept in storage at the end (one per trial)     : {kept / 1e9:8.1f} GB (trials shorter than the "
          "period keep none)")


if __name__ == "__main__":
    main()
