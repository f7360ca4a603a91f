"""Class-disjoint splits and seeded validation folds, with a manifest and a hash.

The official train/test halves come from the dataset (``SampleTable.split``). The training
classes are shuffled with ``split_seed`` and cut into ``num_folds`` class-disjoint folds. A search
trial trains on train-minus-fold and validates on the fold; the test split is never read there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from dmlbench.datasets.base import SampleTable
from dmlbench.errors import DatasetError


@dataclass(frozen=True)
class SplitManifest:
    dataset: str
    train_classes: tuple[int, ...]
    test_classes: tuple[int, ...]
    folds: tuple[tuple[int, ...], ...]
    split_seed: int
    images_per_split: tuple[int, int]

    @property
    def hash(self) -> str:
        payload = json.dumps(
            {
                "dataset": self.dataset,
                "train": self.train_classes,
                "test": self.test_classes,
                "folds": self.folds,
                "seed": self.split_seed,
                "images": self.images_per_split,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, object]:
        return {
            "dataset": self.dataset,
            "train_classes": list(self.train_classes),
            "test_classes": list(self.test_classes),
            "folds": [list(f) for f in self.folds],
            "split_seed": self.split_seed,
            "hash": self.hash,
        }


def make_manifest(table: SampleTable, dataset: str, num_folds: int, split_seed: int) -> SplitManifest:
    """Seeded class-disjoint folds of the training classes.

    Example:
        >>> import numpy as np
        >>> t = SampleTable(np.array([0, 0, 1, 1, 2, 2, 3, 3, 9]), np.array(["train"] * 8 + ["test"]), load=None)
        >>> m = make_manifest(t, "toy", num_folds=2, split_seed=0)
        >>> sorted(c for f in m.folds for c in f), m.test_classes
        ([0, 1, 2, 3], (9,))
    """
    train = np.unique(table.labels[table.split == "train"])
    test = np.unique(table.labels[table.split == "test"])
    if len(train) < 2 * num_folds:
        raise DatasetError(
            f"{dataset} has {len(train)} training classes, too few for {num_folds} validation folds of at least "
            f"2 classes each; use num_folds <= {max(len(train) // 2, 1)}."
        )
    rng = np.random.default_rng(split_seed)
    perm = rng.permutation(train)
    folds = tuple(tuple(sorted(int(c) for c in f)) for f in np.array_split(perm, num_folds))
    n_train = int((table.split == "train").sum())
    return SplitManifest(
        dataset,
        tuple(int(c) for c in train),
        tuple(int(c) for c in test),
        folds,
        split_seed,
        (n_train, len(table) - n_train),
    )


@dataclass(frozen=True)
class TrialSplit:
    """Image indices a trial uses: training images, and the evaluation sets."""

    train: np.ndarray
    val: np.ndarray | None  # validation fold (self-retrieval)
    test: np.ndarray | None  # test split (only in the final phase)
    train_classes: tuple[int, ...]


def trial_split(table: SampleTable, manifest: SplitManifest, phase: str, fold: int | None) -> TrialSplit:
    """Indices for a phase: search → train-minus-fold / fold; final → the same plus the test split
    (``fold=None`` in the final phase trains on all training classes with no validation)."""
    labels = table.labels
    if fold is None:
        if phase == "search":
            raise DatasetError("the search phase needs a validation fold")
        train_classes = manifest.train_classes
        val = None
    else:
        held = set(manifest.folds[fold])
        train_classes = tuple(c for c in manifest.train_classes if c not in held)
        val = np.flatnonzero(np.isin(labels, sorted(held)))
    train = np.flatnonzero(np.isin(labels, train_classes))
    test = np.flatnonzero(table.split == "test") if phase == "final" else None
    return TrialSplit(train, val, test, train_classes)
