"""Embedded datasets: no download, used by the smoke sweep and the tests.

* ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8×8 images, 10 classes),
  upscaled to 32×32 RGB. Classes 0–5 train, 6–9 test.
* ``synthetic``: procedural images with class-dependent structure (an oriented grating, a
  colour and a blob position per class) plus per-image jitter and noise. Sizes configurable.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from dmlbench.datasets.base import DATASETS, DatasetCheck, DatasetSource, SampleTable
from dmlbench.errors import ConfigError

#: settings that make a trial on an embedded dataset run in seconds on a CPU
EMBEDDED_PRESET: dict[str, Any] = {
    "backbone": "tiny",
    "pretrained": False,
    "image_size": 32,
    "embedding_dim": 64,
    "bn_policy": "train",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "epochs": 8,
    "classes_per_batch": 4,
    "samples_per_class": 8,
    "eval_batch_size": 512,
    "num_folds": 3,
}


def _in_memory_table(images: np.ndarray, labels: np.ndarray, train_classes: set[int]) -> SampleTable:
    split = np.where(np.isin(labels, sorted(train_classes)), "train", "test")
    return SampleTable(labels=labels.astype(np.int64), split=split, load=lambda i: images[i])


class _Embedded(DatasetSource):
    embedded: ClassVar[bool] = True
    preset: ClassVar[dict[str, Any]] = EMBEDDED_PRESET
    default_folds: ClassVar[int] = 3

    def check(self) -> DatasetCheck:
        t = self.table()
        return DatasetCheck(
            self.name,
            "found",
            "embedded (no download)",
            counts={
                "images": len(t),
                "train_classes": len(t.classes("train")),
                "test_classes": len(t.classes("test")),
            },
        )


@DATASETS.register("digits")
class Digits(_Embedded):
    """scikit-learn's handwritten digits, upscaled (real data, bundled with scikit-learn)."""

    name = "digits"
    recall_ks = (1, 2, 4, 8)
    how_to_get = "bundled with scikit-learn"
    _cache: ClassVar[dict[int, tuple[np.ndarray, np.ndarray]]] = {}

    def table(self) -> SampleTable:
        size = int(self.options.get("size", 32))
        if size not in self._cache:
            from sklearn.datasets import load_digits

            d = load_digits()
            img = (d.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)  # [N, 8, 8]
            reps = max(1, size // 8)
            up = img.repeat(reps, axis=1).repeat(reps, axis=2)
            up = np.ascontiguousarray(np.repeat(up[..., None], 3, axis=3))
            self._cache[size] = (up, d.target.astype(np.int64))
        images, labels = self._cache[size]
        return _in_memory_table(images, labels, set(range(6)))


def make_synthetic(
    num_classes: int = 24, per_class: int = 24, size: int = 32, noise: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Procedural class-structured images.

    Each class has a grating orientation and frequency, an RGB colour and a blob centre; each image
    jitters them, shifts the phase and adds Gaussian noise, so classes overlap a little and a small
    CNN must learn invariances to separate them.

    Example:
        >>> x, y = make_synthetic(num_classes=3, per_class=2, size=16)
        >>> x.shape, x.dtype, y.tolist()
        ((6, 16, 16, 3), dtype('uint8'), [0, 0, 1, 1, 2, 2])
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, np.pi, num_classes)
    freq = rng.uniform(2.0, 6.0, num_classes)
    colour = rng.uniform(0.2, 1.0, (num_classes, 3))
    centre = rng.uniform(0.25, 0.75, (num_classes, 2))
    images = np.empty((num_classes * per_class, size, size, 3), np.uint8)
    labels = np.repeat(np.arange(num_classes), per_class)
    for n, c in enumerate(labels):
        th = theta[c] + rng.normal(0, 0.12)
        f = freq[c] * rng.uniform(0.9, 1.1)
        phase = rng.uniform(0, 2 * np.pi)
        grating = 0.5 + 0.5 * np.sin(2 * np.pi * f * (xx * np.cos(th) + yy * np.sin(th)) + phase)
        cy, cx = centre[c] + rng.normal(0, 0.05, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
        base = 0.6 * grating[..., None] * colour[c] + 0.4 * blob[..., None]
        img = base * rng.uniform(0.8, 1.2) + rng.normal(0, noise, (size, size, 3))
        images[n] = (img.clip(0, 1) * 255).astype(np.uint8)
    return images, labels


@DATASETS.register("synthetic")
class Synthetic(_Embedded):
    """Procedural images (options: num_classes, per_class, size, noise, seed); half the classes train."""

    name = "synthetic"
    recall_ks = (1, 2, 4, 8)
    how_to_get = "generated in code"
    _cache: ClassVar[dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]]] = {}
    _OPTIONS: ClassVar[tuple[str, ...]] = ("num_classes", "per_class", "size", "noise", "seed")

    def table(self) -> SampleTable:
        unknown = sorted(set(self.options) - set(self._OPTIONS))
        if unknown:
            raise ConfigError(
                f"unknown synthetic dataset option(s) {', '.join(unknown)}; valid: {', '.join(self._OPTIONS)}."
            )
        key = tuple(sorted(self.options.items()))
        if key not in self._cache:
            self._cache[key] = make_synthetic(**self.options)
        images, labels = self._cache[key]
        n_classes = int(labels.max()) + 1
        return _in_memory_table(images, labels, set(range(n_classes // 2)))
