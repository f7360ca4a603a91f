"""k-means for NMI/F1: exact k-means++ seeding, speed at thousands of clusters, agreement with PML."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch

from dmlbench.evaluation import evaluate_embeddings
from dmlbench.evaluation.metrics import kmeans_assign, kmeans_plus_plus, nmi, pair_f1

pml_acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")


def _kmeanspp_set_probabilities(x: np.ndarray, k: int) -> dict[frozenset[int], float]:
    """Exact probability of each set of ``k`` rows under sequential k-means++ (enumerated)."""
    probs: dict[frozenset[int], float] = {}
    n = len(x)
    for order in itertools.permutations(range(n), k):
        p = 1.0 / n
        for t in range(1, k):
            d2 = ((x[:, None, :] - x[None, list(order[:t]), :]) ** 2).sum(-1).min(1)
            p *= d2[order[t]] / d2.sum()
        key = frozenset(order)
        probs[key] = probs.get(key, 0.0) + p
    return probs


@pytest.mark.parametrize("batch", [1, 256])
def test_kmeans_plus_plus_draws_from_the_exact_distribution(batch: int) -> None:
    """batch=256: all picks in one round, so the rejection step must reproduce the sequential law."""
    x = np.array([[0.0], [1.0], [3.0], [7.0], [7.5]])
    want = _kmeanspp_set_probabilities(x, 3)
    xt = torch.tensor(x, dtype=torch.float32)
    runs = 2000
    counts: dict[frozenset[int], int] = {}
    for seed in range(runs):
        rows = kmeans_plus_plus(xt, 3, seed, batch=batch).tolist()
        assert len(set(rows)) == 3
        counts[frozenset(rows)] = counts.get(frozenset(rows), 0) + 1
    for key, p in want.items():
        got = counts.get(key, 0) / runs
        assert abs(got - p) < 4 * np.sqrt(p * (1 - p) / runs) + 1e-3, (sorted(key), got, p)


def _blobs(n: int, dim: int, k: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % k)
    centres = rng.standard_normal((k, dim), dtype=np.float32)
    x = centres[labels] + noise * rng.standard_normal((n, dim), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_kmeans_20k_points_2k_clusters_in_seconds_and_recovers_them() -> None:
    """The old numpy k-means++ start took minutes at SOP size (60k x 11k); this is faiss + batched k-means++."""
    x, labels = _blobs(20_000, 512, 2_000, noise=0.02)
    t0 = time.perf_counter()
    clusters = kmeans_assign(x, 2_000, seed=0)
    seconds = time.perf_counter() - t0
    assert seconds < 60, f"k-means of 20,000 x 512 into 2,000 clusters took {seconds:.0f} s"
    assert clusters.shape == (20_000,) and clusters.dtype == np.int64
    assert nmi(labels, clusters) > 0.99
    assert pair_f1(labels, clusters) > 0.9


def test_torch_and_faiss_searches_agree() -> None:
    x, _ = _blobs(3_000, 64, 300, noise=0.3, seed=2)
    a, b = kmeans_assign(x, 300, seed=4, backend="torch"), kmeans_assign(x, 300, seed=4, backend="faiss")
    assert nmi(a, b) > 0.99  # same start and rule; only float32 rounding of the two BLAS can differ


def test_kmeans_with_duplicate_points_and_as_many_clusters_as_points() -> None:
    x = np.repeat(np.eye(3, 4, dtype=np.float32), 4, axis=0)  # 12 rows, 3 distinct
    for backend in ("faiss", "torch"):
        a = kmeans_assign(x, 5, seed=1, backend=backend)  # more clusters than distinct points
        assert a.shape == (12,) and len(np.unique(a)) >= 3
        assert nmi(np.repeat(np.arange(3), 4), a) > 0.7
        assert len(np.unique(kmeans_assign(np.arange(6, dtype=np.float32)[:, None], 6, backend=backend))) == 6
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans_assign(x, 13)
    with pytest.raises(ValueError, match="backend"):
        kmeans_assign(x, 2, backend="sklearn")


@pytest.mark.parametrize(("classes", "per_class"), [(20, 30), (200, 5)])
def test_nmi_close_to_pml_with_its_own_faiss_kmeans(classes: int, per_class: int) -> None:
    """PML's default FaissKMeans (random start, 20 iterations) vs ours on the same embeddings."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(classes).repeat_interleave(per_class)
    x = torch.randn(classes, 32, generator=g)[y] + 0.3 * torch.randn(len(y), 32, generator=g)
    calc = pml_acc.AccuracyCalculator(include=("NMI",), device=torch.device("cpu"))
    want = calc.get_accuracy(torch.nn.functional.normalize(x, dim=1), y)["NMI"]
    got = evaluate_embeddings(x, y, metrics=("nmi",), seed=0)["nmi"]
    assert abs(got - want) < 0.05, (got, want)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_pruned_assignment_equals_full_search_every_iteration(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Searching only against moved centroids (for points whose centroid stayed) changes nothing."""
    import dmlbench.evaluation.metrics as metrics_mod

    x, _ = _blobs(4_000, 32, 400, noise=0.5, seed=5)
    pruned = kmeans_assign(x, 400, seed=2, backend=backend)
    full_step = metrics_mod._lloyd_step
    searched: list[int] = []

    def always_full(search, c, moved, assign, score):  # type: ignore[no-untyped-def]
        searched.append(int(moved.sum()))
        return full_step(search, c, moved, assign, None)

    monkeypatch.setattr(metrics_mod, "_lloyd_step", always_full)
    assert np.array_equal(kmeans_assign(x, 400, seed=2, backend=backend), pruned)
    assert len(searched) >= 3 and searched[-1] < 400  # several iterations, the last ones moved few centroids


def test_nmi_and_f1_with_thousands_of_classes_match_sklearn() -> None:
    """NMI/F1 count only the non-zero contingency cells (a dense 11k x 11k table was 1 GB)."""
    from sklearn.metrics import normalized_mutual_info_score
    from sklearn.metrics.cluster import pair_confusion_matrix

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5_000, 20_000)
    clusters = np.where(rng.random(20_000) < 0.7, labels * 7 + 1, rng.integers(0, 6_000, 20_000))
    assert nmi(labels, clusters) == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-10)
    (_tn, fp), (fn, tp) = pair_confusion_matrix(labels, clusters)
    assert pair_f1(labels, clusters) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
