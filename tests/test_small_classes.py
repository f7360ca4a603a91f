"""Small classes (issue 17): classes with fewer images than ``samples_per_class`` are filled by
repeating images under fresh augmentations, with a count, never an error, and every method trains
on SOP- and In-Shop-shaped data (the stand-in trees with the real class-size distributions: SOP
2-12 images per class, In-Shop with single-image items)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dmlbench.datasets.torchdata import ClassBalancedBatchSampler
from dmlbench.engine import train
from dmlbench.engine.resolve import layered_config
from tests.fixtures.standins import build, class_sizes


def sop_shaped_labels(n_classes: int, seed: int, singles: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sizes = class_sizes(n_classes, int(n_classes * 5.26), 2, 12, rng)  # SOP: 59,551 / 11,318 ≈ 5.26 per class
    sizes[:singles] = 1  # In-Shop-like single-image items
    return np.repeat(np.arange(n_classes), sizes)


@pytest.mark.parametrize(("P", "K", "singles"), [(8, 4, 0), (8, 4, 5), (4, 8, 3), (16, 2, 6)])
def test_sampler_fills_small_classes_by_repetition(P: int, K: int, singles: int) -> None:
    labels = sop_shaped_labels(200, seed=P * K, singles=singles)
    counts = np.bincount(labels)
    s = ClassBalancedBatchSampler(labels, P, K, num_batches=60, seed=3)
    assert s.small_classes == int((counts < K).sum()) > 0
    seen: Counter[int] = Counter()
    for batch in s:
        assert len(batch) == P * K
        per = Counter(int(labels[i]) for i in batch)
        assert len(per) == P and set(per.values()) == {K}
        for c in per:
            imgs = Counter(i for i in batch if labels[i] == c)
            n = int(counts[c])
            if n >= K:
                assert max(imgs.values()) == 1  # distinct images while the class has enough
            else:
                assert set(imgs) == set(np.flatnonzero(labels == c))  # every image of a small class is used
                assert max(imgs.values()) - min(imgs.values()) <= 1  # repeated as evenly as possible
        seen.update(per)
    # every class is visited once per pass over the classes (60 batches x 8+ classes > 200)
    assert len(seen) == 200 or P * 60 < 200
    # a resumed epoch replays exactly
    s.set_epoch(4)
    first = list(s)
    s.set_epoch(4)
    assert list(s) == first


def test_sampler_still_refuses_more_classes_than_exist() -> None:
    with pytest.raises(ValueError, match="classes per batch"):
        ClassBalancedBatchSampler(np.array([0, 0, 1]), 3, 2, 1, 0)


TINY: dict[str, Any] = {"backbone": "tiny", "pretrained": False, "image_size": 16, "embedding_dim": 16,
                        "bn_policy": "train", "epochs": 1, "iters_per_epoch": 2, "classes_per_batch": 4,
                        "samples_per_class": 4, "device": "cpu", "progress": False, "num_folds": 4,
                        "eval_batch_size": 64, "lr": 1e-3, "early_stop_patience": None,
                        "val_clustering": False, "dataset_kwargs": {"expect_full": False}}  # fmt: skip
PARAMS: dict[str, dict[str, Any]] = {
    "nivmf": {"log_cp": "exact", "n_samples": 2, "temp": 0.1, "concentration": 4.0, "init_norm_multiplier": 10.0},
    "ccp": {"proxies_per_class": 2, "pool_ratio": 1.5, "stage_patience": 1},
    "diva": {"n_key_batches": 1, "decorr_hidden": 16, "eval_heads": False, "eval_disc_weights": [],
             "lr_milestone_frac": None},
    "proxyanchor": {},
}  # fmt: skip


@pytest.fixture(scope="module")
def standin_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("standins")
    build(root, scale=0.002, seed=0, workers=1, names=("sop", "inshop"))
    return root


@pytest.mark.parametrize("dataset", ["sop", "inshop"])
@pytest.mark.parametrize("method", ["nivmf", "ccp", "diva", "proxyanchor"])
def test_every_method_trains_on_small_classes(method: str, dataset: str, standin_root: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("DMLBENCH_CACHE", str(tmp_path / "cache"))
    cfg = layered_config(method, dataset, explicit={**TINY, "data_root": str(standin_root),
                                                    "params": PARAMS[method]})  # fmt: skip
    result = train(cfg)
    assert result.epochs_run == 1 and np.isfinite(result.metrics["map_at_r"])
    err = capsys.readouterr().err
    assert "fewer than samples_per_class=4" in err  # the count is reported, not an error
    if dataset == "inshop":
        assert "(smallest: 1)" in err  # single-image items are in the training classes
