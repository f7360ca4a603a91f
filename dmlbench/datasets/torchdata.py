"""Torch datasets and loaders over a :class:`SampleTable` (class-balanced training batches)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dmlbench.datasets.base import SampleTable
from dmlbench.datasets.transforms import Transform
from dmlbench.methods.base import Batch


class ImageDataset(Dataset[tuple[list[torch.Tensor], int, int]]):
    """Images ``indices`` of ``table``; labels remapped by ``label_map`` (dataset id → 0..C-1)."""

    def __init__(
        self,
        table: SampleTable,
        indices: np.ndarray,
        transform: Transform,
        label_map: dict[int, int] | None = None,
        n_views: int = 1,
    ):
        self.table = table
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.label_map = label_map
        self.n_views = n_views
        raw = table.labels[self.indices]
        self.labels = np.array([label_map[int(c)] for c in raw], np.int64) if label_map is not None else raw

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[list[torch.Tensor], int, int]:
        img = self.table.load(int(self.indices[j]))
        views = [self.transform(img) for _ in range(self.n_views)]
        return views, int(self.labels[j]), int(self.indices[j])


def collate(items: Sequence[tuple[list[torch.Tensor], int, int]]) -> Batch:
    n_views = len(items[0][0])
    views = [torch.stack([it[0][v] for it in items]) for v in range(n_views)]
    return Batch(views, torch.tensor([it[1] for it in items]), torch.tensor([it[2] for it in items]))


class ClassBalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """``classes_per_batch`` distinct classes × ``samples_per_class`` images per batch.

    Classes are visited in a seeded shuffled cycle (every class once per pass); images of a class
    come without replacement from a reshuffled queue. A class with fewer images than
    ``samples_per_class`` (SOP's 2-image products, In-Shop's single-image items) is filled by
    repeating its images, each as few times as possible; every copy goes through the training
    transform on its own, so it is a fresh augmentation (as the reference code and
    pytorch-metric-learning's ``MPerClassSampler`` do). ``small_classes`` counts such classes; it
    is never an error. The order depends only on ``(seed, epoch)``, so a resumed epoch replays
    exactly.

    Example:
        >>> s = ClassBalancedBatchSampler(np.array([0, 0, 1, 1, 2]), 2, 2, num_batches=3, seed=0)
        >>> [len(b) for b in s], s.small_classes
        ([4, 4, 4], 1)
    """

    def __init__(
        self, labels: np.ndarray, classes_per_batch: int, samples_per_class: int, num_batches: int, seed: int
    ):
        self.labels = np.asarray(labels)
        self.classes, counts = np.unique(self.labels, return_counts=True)
        self.by_class = {int(c): np.flatnonzero(self.labels == c) for c in self.classes}
        self.P, self.K = classes_per_batch, samples_per_class
        self.num_batches = num_batches
        self.seed = seed
        self.epoch = 0
        if self.P > len(self.classes):
            raise ValueError(f"{self.P} classes per batch but only {len(self.classes)} training classes")
        #: classes with fewer than ``samples_per_class`` images (filled with repeated images)
        self.small_classes = int((counts < self.K).sum())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _take(self, c: int, queue: dict[int, list[int]], rng: np.random.Generator) -> list[int]:
        """``K`` images of class ``c``: distinct while the class has that many, else its images
        repeated as evenly as possible (shuffled)."""
        members = self.by_class[c]
        if len(members) < self.K:
            reps = np.resize(rng.permutation(members), self.K)  # each image ⌊K/n⌋ or ⌈K/n⌉ times
            return [int(i) for i in rng.permutation(reps)]
        q = queue.get(c, [])
        if len(q) < self.K:
            q = q + [int(i) for i in rng.permutation(members) if int(i) not in q]
        queue[c] = q[self.K :]
        return q[: self.K]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        class_queue: list[int] = []
        img_queue: dict[int, list[int]] = {}
        for _ in range(self.num_batches):
            chosen: list[int] = []
            while len(chosen) < self.P:
                if not class_queue:
                    class_queue = [int(c) for c in rng.permutation(self.classes)]
                c = class_queue.pop()
                if c not in chosen:
                    chosen.append(c)
            batch: list[int] = []
            for c in chosen:
                batch.extend(self._take(c, img_queue, rng))
            yield batch


def make_loader(
    dataset: ImageDataset, batch_size: int | None = None, sampler: ClassBalancedBatchSampler | None = None,
    num_workers: int = 0, pin_memory: bool | None = None, persistent_workers: bool = False,
) -> DataLoader[Batch]:
    """A loader of :class:`Batch` (uint8 images): class-balanced batches from ``sampler``, else
    ``batch_size`` images in order.

    ``pin_memory=None`` pins when CUDA is available (see :func:`dmlbench.engine.runtime.pin_memory_for`
    for the trial's own choice); ``persistent_workers`` keeps worker processes alive between epochs
    (only with ``num_workers > 0``). Workers run one intra-op thread each (PyTorch's default).
    """
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    common = dict(num_workers=num_workers, collate_fn=collate, persistent_workers=persistent_workers and num_workers > 0,
                  pin_memory=pin)
    if sampler is not None:
        return DataLoader(dataset, batch_sampler=sampler, **common)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **common)  # type: ignore[arg-type]
