"""Input pipeline throughput: decoded-image cache vs a plain torchvision ImageFolder + PIL pipeline.

Generates a tree of JPEGs (default 2,000 images of 500×375, like CUB/Cars photos), then times one
pass over it with each pipeline, in the same run, with the same training transforms and the same
number of DataLoader workers. Every ratio printed compares two pipelines that deliver the same
thing (like for like):

(a) ``torchvision.datasets.ImageFolder`` + PIL decode + RandomResizedCrop(224) + flip + ToTensor
    + Normalize (the usual DML training pipeline): normalised float batches;
(b) dmlbench's ``cached_table`` (images decoded and resized once to shorter side 256, read from a
    memory map) + the same transforms applied to the cached uint8 tensors with
    ``torchvision.transforms.v2``: normalised float batches, **ratio b / a**;
(u) ImageFolder + PIL + RandomResizedCrop(224) + flip + PILToTensor: uint8 crops, the float
    conversion and normalisation left to the consumer (the baseline of (c));
(c) the cache with the workers stopping at uint8 crops (normalisation left to the device):
    **ratio c / u**;
(d) dmlbench's actual training input path: ``ImageDataset`` over the cached table with
    ``build_transform`` (uint8 out), ``collate`` into a ``Batch``, then ``Batch.to`` (float in
    [0, 1]) and the backbone's ``InputNorm``, both counted in the main process: on this CPU, or with
    ``--device cuda`` on the GPU, as the trainer runs them: normalised float batches, **ratio d / a**.

(c) against (a) would credit the cache with the float conversion it leaves out, so that ratio is
not printed. With ``--device cuda`` every pipeline copies its batches to the GPU (pinned memory)
and (u) and (c) are finished there the way (d) is, so all five then deliver normalised float
batches on the GPU; the clock stops after a device synchronise. The rounds alternate (a, b, u, c, d, a, ...) so that changes in machine load hit every
pipeline, and the best round of each is reported, with the ratios. The one-time cache build is
timed separately.

Usage::

    python bench/data_pipeline.py                      # 2,000 images, 2 workers
    python bench/data_pipeline.py --images 500 --rounds 1   # quicker
    taskset -c 0,1 python bench/data_pipeline.py --device cuda   # a GPU box, 2 of its cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dmlbench.datasets._common import ImageFileLoader
from dmlbench.datasets.base import SampleTable
from dmlbench.datasets.cache import cached_table, ensure_cache

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def make_jpeg_tree(
    root: Path, n_images: int, n_classes: int, size: tuple[int, int], seed: int = 0
) -> list[Path]:
    """``root/class_XXX/img_XXXXX.jpg``: smooth colour fields plus noise (photo-like JPEG size and decode cost)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n_images):
        c = i % n_classes
        base = np.stack(
            [
                128 + 100 * np.sin(xx / (17 + c) + i),
                128 + 100 * np.cos(yy / (23 + c) - i),
                128 + 60 * np.sin((xx + yy) / 31.0),
            ],
            axis=-1,
        )
        img = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
        path = root / f"class_{c:03d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


class CachedDataset(Dataset[tuple[torch.Tensor, int]]):
    """A cached table with the training transforms applied to uint8 CHW tensors (transforms.v2).

    ``normalize=False`` stops after the flip and returns uint8 crops: ToDtype + Normalize are then
    left to the device, as dmlbench's ``Backbone.input_norm`` does inside the model.
    """

    def __init__(self, table: SampleTable, size: int, normalize: bool = True):
        from torchvision.transforms import v2

        self.table = table
        steps: list[Any] = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        if normalize:
            steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.table.load(i)).permute(2, 0, 1)
        return self.transform(img), int(self.table.labels[i])


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def _to_float_normalised(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a consumer of uint8 crops does on ``device``: float in [0, 1], then ImageNet mean/std
    (dmlbench's ``Batch.to`` + ``InputNorm``; used for (u) and (c) alike when they feed a GPU)."""
    from dmlbench.engine.backbones import InputNorm

    norm = InputNorm().to(device)
    return lambda x: norm(x.float().div_(255.0))


def time_pass(
    dataset: Any, workers: int, batch: int, device: torch.device,
    on_device: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Images per second of one shuffled pass (workers started before the clock runs).

    On a GPU each batch is copied to it (and finished there by ``on_device``) before it counts."""
    cuda = device.type == "cuda"
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        worker_init_fn=_one_thread,
        persistent_workers=False,
        drop_last=False,
        pin_memory=cuda,
    )
    it = iter(loader)
    first = next(it)  # workers up, first batch out
    n = 0
    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in it:
            if cuda:
                x = x.to(device, non_blocking=True)
                if on_device is not None:
                    x = on_device(x)
            n += x.shape[0]
        if cuda:
            torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    del first
    return n / elapsed


def time_dmlbench_pass(table: SampleTable, size: int, workers: int, batch: int, device: torch.device) -> float:
    """Images per second of dmlbench's own training input path, float normalisation included
    (``Batch.to(device)`` + ``InputNorm`` on ``device``: this CPU's main process, or the GPU)."""
    from dmlbench.datasets.torchdata import ImageDataset, collate
    from dmlbench.datasets.transforms import build_transform
    from dmlbench.engine.backbones import InputNorm

    ds = ImageDataset(table, np.arange(len(table)), build_transform(size, train=True))
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, worker_init_fn=_one_thread,
                        collate_fn=collate, persistent_workers=False, pin_memory=device.type == "cuda")  # fmt: skip
    norm = InputNorm().to(device)
    it = iter(loader)
    next(it)
    n = 0
    start = time.perf_counter()
    with torch.no_grad():
        for b in it:
            x = norm(b.to(device).images)
            n += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--size", type=int, default=224, help="crop size")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="alternating timed passes per pipeline")
    ap.add_argument(
        "--device", type=str, default="cpu",
        help="cpu: batches end in the main process; cuda: every pipeline copies its batches to the GPU and "
        "(u), (c), (d) convert and normalise there",
    )
    ap.add_argument(
        "--workdir", type=str, default=None, help="where to write the JPEGs and cache (default: a temp dir)"
    )
    args = ap.parse_args()

    from torchvision import datasets, transforms

    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but CUDA is not available; use --device cpu.")
    finish = _to_float_normalised(device) if device.type == "cuda" else None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dmlbench-bench-"))
    try:
        t0 = time.perf_counter()
        if len(list((work / "jpegs").glob("*/*.jpg"))) != args.images:
            shutil.rmtree(work / "jpegs", ignore_errors=True)
            make_jpeg_tree(work / "jpegs", args.images, args.classes, (args.width, args.height))
            print(
                f"generated {args.images} JPEGs of {args.width}x{args.height} in {time.perf_counter() - t0:.1f}s"
            )

        plain = datasets.ImageFolder(
            str(work / "jpegs"),
            transform=transforms.Compose(
                [
                    transforms.RandomResizedCrop(args.size),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                    transforms.Normalize(MEAN, STD),
                ]
            ),
        )
        plain_u8 = datasets.ImageFolder(
            str(work / "jpegs"),
            transform=transforms.Compose(
                [transforms.RandomResizedCrop(args.size), transforms.RandomHorizontalFlip(), transforms.PILToTensor()]
            ),
        )
        paths = [p for p, _ in plain.samples]
        labels = np.asarray([c for _, c in plain.samples], dtype=np.int64)
        table = SampleTable(
            labels, np.array(["train"] * len(paths)), ImageFileLoader(paths, "bench"), paths=paths
        )
        t0 = time.perf_counter()
        ensure_cache(table, "bench", args.size, work / "cache", workers=args.workers)
        build = time.perf_counter() - t0
        print(
            f"cache build (one-time, {args.workers} threads): {build:.1f}s = {args.images / build:.0f} images/s"
        )
        ct = cached_table(table, "bench", args.size, work / "cache")
        cached = CachedDataset(ct, args.size)
        cached_u8 = CachedDataset(ct, args.size, normalize=False)

        a, b, u, c, d = [], [], [], [], []
        for r in range(args.rounds):
            a.append(time_pass(plain, args.workers, args.batch, device))
            b.append(time_pass(cached, args.workers, args.batch, device))
            u.append(time_pass(plain_u8, args.workers, args.batch, device, finish))
            c.append(time_pass(cached_u8, args.workers, args.batch, device, finish))
            d.append(time_dmlbench_pass(ct, args.size, args.workers, args.batch, device))
            print(
                f"round {r + 1}: float out: (a) ImageFolder+PIL {a[-1]:.0f} img/s, (b) cached {b[-1]:.0f} img/s, "
                f"(d) dmlbench input path (normalise on {device.type}) {d[-1]:.0f} img/s; uint8 out: "
                f"(u) ImageFolder+PIL {u[-1]:.0f} img/s, (c) cached {c[-1]:.0f} img/s"
            )
        best_a, best_b, best_u, best_c, best_d = max(a), max(b), max(u), max(c), max(d)
        print(
            f"RESULT device={device.type} workers={args.workers} cpus={len(os.sched_getaffinity(0))} images={args.images} "
            f"imagefolder_pil={best_a:.0f} img/s cached={best_b:.0f} img/s ratio={best_b / best_a:.2f}x "
            f"dmlbench_path={best_d:.0f} img/s ratio_dmlbench={best_d / best_a:.2f}x "
            f"imagefolder_pil_uint8={best_u:.0f} img/s cached_uint8={best_c:.0f} img/s "
            f"ratio_uint8={best_c / best_u:.2f}x"
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
