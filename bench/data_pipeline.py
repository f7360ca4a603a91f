"""Input pipeline throughput: decoded-image cache vs a plain torchvision ImageFolder + PIL pipeline.

Generates a tree of JPEGs (default 2,000 images of 500×375, like CUB/Cars photos), then times one
pass over it with each pipeline, in the same run, with the same training transforms and the same
number of DataLoader workers:

(a) ``torchvision.datasets.ImageFolder`` + PIL decode + RandomResizedCrop(224) + flip + ToTensor
    + Normalize (the usual DML training pipeline);
(b) dmlbench's ``cached_table`` (images decoded and resized once to shorter side 256, read from a
    memory map) + the same transforms applied to the cached uint8 tensors with
    ``torchvision.transforms.v2``;
(c) the same, with the workers stopping at uint8 crops (normalisation left to the device);
(d) dmlbench's actual training input path: ``ImageDataset`` over the cached table with
    ``build_transform`` (uint8 out), ``collate`` into a ``Batch``, then ``Batch.to`` (float in
    [0, 1]) and the backbone's ``InputNorm``, both counted here on the CPU in the main process (on a
    GPU box they run on the device).

The rounds alternate (a, b, a, b, ...) so that changes in machine load hit both, and the best
round of each is reported, with the ratio. The one-time cache build is timed separately.

Usage::

    python bench/data_pipeline.py                      # 2,000 images, 2 workers
    python bench/data_pipeline.py --images 500 --rounds 1   # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
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


def time_pass(dataset: Any, workers: int, batch: int) -> float:
    """Images per second of one shuffled pass (workers started before the clock runs)."""
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        worker_init_fn=_one_thread,
        persistent_workers=False,
        drop_last=False,
    )
    it = iter(loader)
    first = next(it)  # workers up, first batch out
    n = 0
    start = time.perf_counter()
    for x, _ in it:
        n += x.shape[0]
    elapsed = time.perf_counter() - start
    del first
    return n / elapsed


def time_dmlbench_pass(table: SampleTable, size: int, workers: int, batch: int) -> float:
    """Images per second of dmlbench's own training input path, float normalisation included."""
    from dmlbench.datasets.torchdata import ImageDataset, collate
    from dmlbench.datasets.transforms import build_transform
    from dmlbench.engine.backbones import InputNorm

    ds = ImageDataset(table, np.arange(len(table)), build_transform(size, train=True))
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, worker_init_fn=_one_thread,
                        collate_fn=collate, persistent_workers=False)  # fmt: skip
    norm = InputNorm()
    it = iter(loader)
    next(it)
    n = 0
    start = time.perf_counter()
    with torch.no_grad():
        for b in it:
            x = norm(b.to("cpu").images)
            n += x.shape[0]
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
        "--workdir", type=str, default=None, help="where to write the JPEGs and cache (default: a temp dir)"
    )
    args = ap.parse_args()

    from torchvision import datasets, transforms

    torch.set_num_threads(1)
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

        a, b, c, d = [], [], [], []
        for r in range(args.rounds):
            a.append(time_pass(plain, args.workers, args.batch))
            b.append(time_pass(cached, args.workers, args.batch))
            c.append(time_pass(cached_u8, args.workers, args.batch))
            d.append(time_dmlbench_pass(ct, args.size, args.workers, args.batch))
            print(
                f"round {r + 1}: ImageFolder+PIL {a[-1]:.0f} img/s, cached (same transforms) {b[-1]:.0f} img/s, "
                f"cached uint8 out (normalise on device) {c[-1]:.0f} img/s, "
                f"dmlbench input path (normalise on this CPU) {d[-1]:.0f} img/s"
            )
        best_a, best_b, best_c, best_d = max(a), max(b), max(c), max(d)
        print(
            f"RESULT workers={args.workers} cpus={os.cpu_count()} images={args.images} "
            f"imagefolder_pil={best_a:.0f} img/s cached={best_b:.0f} img/s ratio={best_b / best_a:.2f}x "
            f"cached_uint8={best_c:.0f} img/s ratio_uint8={best_c / best_a:.2f}x "
            f"dmlbench_path={best_d:.0f} img/s ratio_dmlbench={best_d / best_a:.2f}x"
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
