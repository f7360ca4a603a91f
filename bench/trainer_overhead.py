"""Trainer overhead: dmlbench's training step vs a bare PyTorch loop, side by side in one run.

Both sides train the same model (dmlbench's ``Backbone``: input normalisation, a timm trunk and the
linear embedding head, built from the same seed), with the same loss (pytorch-metric-learning's
``ProxyAnchorLoss`` on both sides, the ``proxyanchor`` method's with a reducer that skips PML's
per-step ``isnan`` read, the same numbers; proxies from the same seed), the same
optimiser (Adam, proxies at 100× the LR without weight decay), on the same batches held in memory
(uint8 images, ``classes × samples`` labels). Evaluation is not part of it, nor is the data
pipeline (decode, crop, flip: ``bench/data_pipeline.py`` measures that); what is timed is
everything from a host batch to an updated model:

* dmlbench: ``Trainer.run_steps`` (``build_trainer(cfg)``), i.e. ``Batch.to`` (asynchronous copy,
  uint8 → float on the device, memory format), autocast, ``Method.loss``, hooks, optimiser, the
  step logs kept on the device and the non-finite check read back every ``sync_every`` steps;
* bare: ``x = images.to(dev).float() / 255; loss = criterion(model(x), y); zero_grad; backward;
  step`` with the same autocast and memory format, and no logging at all.

Rounds alternate (dmlbench then bare, bare then dmlbench, ...) so load changes hit both; the median time per
step of each is reported with the ratio, in wall time and, on CPU, in process CPU time (all
threads): on a shared machine the wall times swing with other people's load, while the CPU time
with one torch thread (``--threads 1``) is the stable figure. The first step of each side starts from the same weights
on the same batch, so their losses must agree (the run exits non-zero when they do not).

    python bench/trainer_overhead.py                       # CPU, timm test_resnet, 64 px, batch 32
    python bench/trainer_overhead.py --quick               # seconds (smoke test)
    python bench/gpu_train_throughput.py                   # the same on CUDA: ResNet-50, 224 px, 112
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from dmlbench.config import TrialConfig
from dmlbench.engine.backbones import build_backbone
from dmlbench.engine.runtime import trial_runtime
from dmlbench.engine.trainer import Trainer, autocast_for, build_trainer, seed_everything
from dmlbench.methods import Batch

#: the defaults of this CPU benchmark (``gpu_train_throughput.py`` has its own)
CPU_DEFAULTS = dict(device="cpu", backbone="test_resnet", image_size=64, embedding_dim=128, classes=8, samples=4,
                    batches=8, rounds=5, steps=24, warmup=8, amp="off", threads=None)
QUICK = dict(backbone="tiny", image_size=32, classes=4, samples=4, batches=4, rounds=2, steps=4, warmup=1)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} torch threads"


def trial_config(args: argparse.Namespace) -> TrialConfig:
    classes = args.classes
    return TrialConfig.from_dict({
        "method": "proxyanchor", "dataset": "synthetic",
        # only the number of training classes matters here: the timed batches are made below
        "dataset_kwargs": {"num_classes": max(24, 3 * classes), "per_class": max(8, args.samples), "size": 16},
        "backbone": args.backbone, "pretrained": False, "image_size": args.image_size,
        "embedding_dim": args.embedding_dim, "classes_per_batch": classes, "samples_per_class": args.samples,
        "lr": 1e-4, "optimizer": "adam", "amp": args.amp, "device": args.device, "progress": False,
        "eval_at_start": False, "channels_last": args.channels_last, "torch_compile": args.compile,
        "torch_threads": args.threads, "sync_every": args.sync_every,
    })  # fmt: skip


def make_batches(n: int, classes: int, samples: int, size: int, num_classes: int, pin: bool, seed: int = 0) -> list[Batch]:
    """``n`` host batches of random uint8 images, ``classes`` × ``samples`` labels each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randperm(num_classes, generator=g)[:classes].repeat_interleave(samples)
        images = torch.randint(0, 256, (len(labels), 3, size, size), generator=g, dtype=torch.uint8)
        if pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        out.append(Batch([images], labels, torch.arange(len(labels))))
    return out


class BareLoop:
    """The plain PyTorch loop a researcher would write for the same model, loss and optimiser."""

    def __init__(self, cfg: TrialConfig, num_classes: int, memory_format: torch.memory_format):
        from pytorch_metric_learning import losses

        self.cfg, self.device, self.memory_format = cfg, torch.device(cfg.device), memory_format
        seed_everything(cfg.seed)  # the trainer's order: backbone, then the loss's proxies
        self.model = build_backbone(cfg).to(self.device)
        hp = cfg.method_params()
        self.criterion = losses.ProxyAnchorLoss(num_classes, cfg.embedding_dim, margin=hp.margin, alpha=hp.alpha)  # type: ignore[attr-defined]
        self.criterion.to(self.device)
        if memory_format == torch.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.torch_compile:
            self.model.compile()
        self.optimizer = torch.optim.Adam(
            [{"params": list(self.model.parameters()), "lr": cfg.lr},
             {"params": list(self.criterion.parameters()), "lr": cfg.lr * hp.loss_lr_mult, "weight_decay": 0.0}],  # type: ignore[attr-defined]
            lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps,
        )  # fmt: skip
        self.model.train()

    def run(self, batches: list[Batch]) -> float:
        """Train on ``batches``; returns the first step's loss (read once, after the loop)."""
        first = None
        for batch in batches:
            x = batch.images.to(self.device, non_blocking=True).to(torch.float32, memory_format=self.memory_format).div_(255)
            y = batch.labels.to(self.device, non_blocking=True)
            with autocast_for(self.cfg, self.device):
                loss = self.criterion(self.model(x).float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            first = loss.detach() if first is None else first
        return float(first) if first is not None else float("nan")


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds of all threads) of ``fn()``, the device synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _syncs_per_step(fn: Callable[[list[Batch]], Any], batches: list[Batch]) -> float:
    """Host synchronisations CUDA reports per step while ``fn`` runs ``batches`` (sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / len(batches)


def compare(args: argparse.Namespace) -> int:
    cfg = trial_config(args)
    device = torch.device(cfg.device)
    with trial_runtime(cfg.torch_threads, device, deterministic=False):
        trainer: Trainer = build_trainer(cfg)
        trainer.method.train()  # as Trainer.run does before its first epoch (BN policy)
        num_classes = trainer.method.num_classes
        bare = BareLoop(cfg, num_classes, trainer.memory_format)
        batches = make_batches(args.batches, args.classes, args.samples, args.image_size, num_classes,
                               pin=trainer.pin_memory)
        stream = [batches[i % len(batches)] for i in range(args.steps)]
        batch_size = args.classes * args.samples
        print(f"trainer overhead: {cfg.backbone} {args.image_size} px, batch {batch_size} ({args.classes} classes x "
              f"{args.samples}), proxyanchor, Adam, amp={cfg.amp}, channels_last="
              f"{trainer.memory_format == torch.channels_last}, compile={cfg.torch_compile}")
        print(f"machine: {machine(device)}; torch {torch.__version__}")
        # same weights, same first batch: the two loops must compute the same loss
        first_trainer = trainer.run_steps(stream[:1])["loss"]
        first_bare = bare.run(stream[:1])
        # fp32 on CPU: the same arithmetic; bf16 / cuDNN's autotuned kernels: a few ulps of bf16
        exact = cfg.amp == "off" and device.type == "cpu"
        agree = abs(first_trainer - first_bare) <= (1e-5 if exact else 2e-2) * max(1.0, abs(first_bare))
        print(f"first-step loss: dmlbench {first_trainer:.6f}  bare {first_bare:.6f}  ({'same' if agree else 'DIFFERENT'})")
        warm = stream[: args.warmup]
        trainer.run_steps(warm)
        bare.run(warm)
        t_tr: list[tuple[float, float]] = []
        t_bare: list[tuple[float, float]] = []
        for r in range(args.rounds):  # who goes first alternates too
            if r % 2 == 0:
                t_tr.append(_timed(lambda: trainer.run_steps(stream), device))
            t_bare.append(_timed(lambda: bare.run(stream), device))
            if r % 2 == 1:
                t_tr.append(_timed(lambda: trainer.run_steps(stream), device))
        if device.type == "cuda":
            few = stream[: min(10, len(stream))]
            print(f"host syncs per step (CUDA sync debug mode): dmlbench {_syncs_per_step(trainer.run_steps, few):.2f}"
                  f"  bare {_syncs_per_step(bare.run, few):.2f}")
    print(f"{args.rounds} rounds x {args.steps} steps after {args.warmup + 1} warm-up steps")
    per_step = {}
    for i, clock in enumerate(("wall", "CPU")):
        if clock == "CPU" and device.type == "cuda":
            continue  # on a GPU the wall time is the figure; the CPU mostly waits
        tr = [t[i] / args.steps for t in t_tr]
        ba = [t[i] / args.steps for t in t_bare]
        per_step[clock] = (statistics.median(tr), statistics.median(ba))
        print(f"{clock} time per step (median): dmlbench {per_step[clock][0] * 1e3:.2f} ms  bare "
              f"{per_step[clock][1] * 1e3:.2f} ms  (rounds: dmlbench {', '.join(f'{t * 1e3:.1f}' for t in tr)}; "
              f"bare {', '.join(f'{t * 1e3:.1f}' for t in ba)})")
    for clock, (tr_s, ba_s) in per_step.items():
        print(f"{clock} time: dmlbench / bare per step = {tr_s / ba_s:.3f} (overhead {100 * (tr_s / ba_s - 1):+.1f} %); "
              f"throughput dmlbench {batch_size / tr_s:.1f} img/s, bare {batch_size / ba_s:.1f} img/s, "
              f"dmlbench / bare = {100 * ba_s / tr_s:.1f} %")
    return 0 if agree else 1


def parser(defaults: dict[str, Any], doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=defaults["device"], help="cpu or cuda")
    ap.add_argument("--backbone", default=defaults["backbone"], help="timm name or 'tiny'")
    ap.add_argument("--image-size", type=int, default=defaults["image_size"])
    ap.add_argument("--embedding-dim", type=int, default=defaults["embedding_dim"])
    ap.add_argument("--classes", type=int, default=defaults["classes"], help="classes per batch")
    ap.add_argument("--samples", type=int, default=defaults["samples"], help="images per class in a batch")
    ap.add_argument("--batches", type=int, default=defaults["batches"], help="distinct batches held in memory")
    ap.add_argument("--rounds", type=int, default=defaults["rounds"])
    ap.add_argument("--steps", type=int, default=defaults["steps"], help="timed steps per round and side")
    ap.add_argument("--warmup", type=int, default=defaults["warmup"], help="untimed steps per side first")
    ap.add_argument("--amp", default=defaults["amp"], choices=["auto", "off", "bf16"])
    ap.add_argument("--threads", type=int, default=defaults["threads"], help="torch threads (default: as started)")
    ap.add_argument("--channels-last", default=None, type=lambda s: {"on": True, "off": False}[s],
                    help="on/off (default: the trainer's choice, on for conv nets on CUDA)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone on both sides")
    ap.add_argument("--sync-every", type=int, default=50, help="the trainer's read-back interval")
    ap.add_argument("--quick", action="store_true", help="a few seconds on CPU: tiny backbone, 32 px (smoke test)")
    return ap


def main(defaults: dict[str, Any] = CPU_DEFAULTS, doc: str | None = __doc__) -> int:
    ap = parser(defaults, doc)
    args = ap.parse_args()
    if args.quick:
        args = ap.parse_args(namespace=argparse.Namespace(**{**vars(args), **QUICK, "device": "cpu", "amp": "off"}))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda was asked for but CUDA is not available here; use --device cpu or --quick.", file=sys.stderr)
        return 2
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
