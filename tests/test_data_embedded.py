from __future__ import annotations

import numpy as np
import pytest
import torch

from dmlbench.datasets import DATASETS
from dmlbench.datasets.splits import make_manifest, trial_split
from dmlbench.datasets.torchdata import ClassBalancedBatchSampler, ImageDataset, collate
from dmlbench.datasets.transforms import build_transform
from dmlbench.errors import ConfigError, DatasetError


def test_digits_class_disjoint_split() -> None:
    t = DATASETS.get("digits")().table()
    assert len(t) == 1797 and t.load(0).shape == (32, 32, 3) and t.load(0).dtype == np.uint8
    train, test = set(t.classes("train")), set(t.classes("test"))
    assert train == set(range(6)) and test == {6, 7, 8, 9}


def test_synthetic_sizes_and_bad_option() -> None:
    t = DATASETS.get("synthetic")(num_classes=6, per_class=5, size=16).table()
    assert len(t) == 30 and t.load(3).shape == (16, 16, 3)
    assert list(t.classes("train")) == [0, 1, 2]
    with pytest.raises(ConfigError, match="unknown synthetic dataset option"):
        DATASETS.get("synthetic")(colours=3).table()


def test_manifest_folds_disjoint_seeded_and_hashed() -> None:
    t = DATASETS.get("synthetic")(num_classes=16, per_class=3, size=8).table()
    m = make_manifest(t, "synthetic", num_folds=4, split_seed=0)
    flat = [c for f in m.folds for c in f]
    assert sorted(flat) == list(range(8)) and len(set(flat)) == 8
    assert make_manifest(t, "synthetic", 4, 0).hash == m.hash
    assert make_manifest(t, "synthetic", 4, 1).hash != m.hash
    s = trial_split(t, m, "search", 1)
    assert s.test is None and s.val is not None
    held = set(m.folds[1])
    assert set(t.labels[s.val]) == held and not held & set(t.labels[s.train])
    assert not set(t.labels[s.train]) & set(t.classes("test"))
    f = trial_split(t, m, "final", 1)
    assert f.test is not None and set(t.labels[f.test]) == set(t.classes("test"))
    with pytest.raises(DatasetError, match="too few"):
        make_manifest(t, "synthetic", num_folds=5, split_seed=0)


def test_sampler_invariants_and_determinism() -> None:
    labels = np.repeat(np.arange(6), 5)
    s = ClassBalancedBatchSampler(labels, classes_per_batch=3, samples_per_class=2, num_batches=10, seed=3)
    s.set_epoch(2)
    batches = list(s)
    assert len(batches) == 10
    for b in batches:
        cls = labels[b]
        assert len(set(b)) == 6
        assert sorted(np.unique(cls, return_counts=True)[1]) == [2, 2, 2]
    s2 = ClassBalancedBatchSampler(labels, 3, 2, 10, seed=3)
    s2.set_epoch(2)
    assert list(s2) == batches
    s2.set_epoch(3)
    assert list(s2) != batches
    # every class visited once per pass of 2 batches
    assert set(labels[batches[0] + batches[1]]) == set(range(6))
    # classes smaller than samples_per_class are filled with repeats (counted), never refused;
    # more classes per batch than there are classes is refused
    small = ClassBalancedBatchSampler(labels, 3, 6, 1, 0)
    assert small.small_classes == 6 and all(len(b) == 18 for b in small)
    with pytest.raises(ValueError, match="classes per batch"):
        ClassBalancedBatchSampler(labels, 7, 2, 1, 0)


def test_dataset_views_and_collate() -> None:
    t = DATASETS.get("digits")().table()
    idx = np.flatnonzero(t.labels == 3)[:4]
    ds = ImageDataset(t, idx, build_transform(16, train=True, embedded=True), {3: 0}, n_views=2)
    b = collate([ds[i] for i in range(4)])
    assert len(b.views) == 2 and b.images.shape == (4, 3, 16, 16)
    assert b.labels.tolist() == [0, 0, 0, 0] and b.images.dtype == torch.uint8
    f = b.to("cpu").images
    assert f.dtype == torch.float32 and 0.0 <= float(f.min()) and float(f.max()) <= 1.0
    assert not bool((b.views[0] == b.views[1]).all())  # independent augmentations
