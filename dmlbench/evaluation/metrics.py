"""Retrieval and clustering metrics of deep metric learning, as pure functions.

Retrieval metrics take a neighbour-label matrix ``[Q, k]`` (labels of each query's neighbours,
best first, the query itself already excluded), the query labels ``[Q]`` and the number of
relevant items per query ``R`` ``[Q]`` (same-class items in the reference set, the query itself
not counted). Queries with ``R = 0`` have nothing to find and are left out of every mean, as in
pytorch-metric-learning's ``AccuracyCalculator`` ("lone" queries); a mean over no query is NaN.

* ``precision_at_1``: fraction of queries whose nearest neighbour shares their class.
* ``recall_at_k``: the DML "Recall@k" (Song et al. 2016): fraction of queries with at least one
  same-class item among their ``k`` nearest neighbours (not the IR recall).
* ``r_precision``: mean over queries of (same-class items among the first ``R``) / ``R``.
* ``map_at_r``: MAP@R of Musgrave et al. 2020, "A Metric Learning Reality Check":
  ``1/R · Σ_{i ≤ R} P(i) · rel(i)`` per query, with ``P(i)`` the precision at rank ``i``.

Clustering metrics compare class labels with cluster assignments (k-means with as many clusters
as classes, :func:`kmeans_assign`):

* ``nmi``: mutual information / arithmetic mean of the two entropies (scikit-learn's default
  ``normalized_mutual_info_score``, what PML reports).
* ``f1``: pair-counting F1 (Song et al. 2016): precision and recall of "same cluster" as a
  predictor of "same class" over all unordered pairs.

The ``*_per_query`` functions give one value per query (for chunked evaluation); the plain ones
are their means over queries with ``R > 0``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor


def hits_matrix(neighbour_labels: Tensor, query_labels: Tensor) -> Tensor:
    """``[Q, k]`` booleans: whether each neighbour shares its query's label.

    Example:
        >>> hits_matrix(torch.tensor([[0, 1], [1, 1]]), torch.tensor([0, 2])).tolist()
        [[True, False], [False, False]]
    """
    if neighbour_labels.ndim != 2 or query_labels.shape != (neighbour_labels.shape[0],):
        raise ValueError(
            f"neighbour labels must be [Q, k] and query labels [Q], got {tuple(neighbour_labels.shape)} "
            f"and {tuple(query_labels.shape)}"
        )
    return neighbour_labels == query_labels.to(neighbour_labels.device)[:, None]


def _check_r(hits: Tensor, num_relevant: Tensor, need_k_ge_r: bool) -> Tensor:
    r = num_relevant.to(hits.device).long()
    if r.shape != (hits.shape[0],):
        raise ValueError(f"num_relevant must have one entry per query ({hits.shape[0]}), got {tuple(r.shape)}")
    if need_k_ge_r and hits.shape[0] > 0 and int(r.max()) > hits.shape[1]:
        raise ValueError(
            f"some query has R={int(r.max())} relevant items but only {hits.shape[1]} neighbours were "
            "retrieved; retrieve at least max(R) neighbours for R-Precision and MAP@R"
        )
    return r


def _mean_valid(per_query: Tensor, num_relevant: Tensor) -> float:
    valid = num_relevant.to(per_query.device) > 0
    if not bool(valid.any()):
        return math.nan
    return float(per_query[valid].double().mean())


def precision_at_1_per_query(hits: Tensor) -> Tensor:
    """1.0 where the nearest neighbour is a hit, else 0.0 (float64 ``[Q]``).

    Example:
        >>> precision_at_1_per_query(torch.tensor([[True, False], [False, True]])).tolist()
        [1.0, 0.0]
    """
    return hits[:, 0].double()


def recall_at_k_per_query(hits: Tensor, k: int) -> Tensor:
    """1.0 where a hit is among the first ``k`` neighbours (float64 ``[Q]``).

    Example:
        >>> recall_at_k_per_query(torch.tensor([[False, True], [False, False]]), 2).tolist()
        [1.0, 0.0]
    """
    if k < 1:
        raise ValueError(f"Recall@k needs k >= 1, got {k}")
    return hits[:, :k].any(dim=1).double()


def r_precision_per_query(hits: Tensor, num_relevant: Tensor) -> Tensor:
    """Hits among the first ``R`` neighbours divided by ``R`` (NaN where ``R = 0``).

    Example:
        >>> r_precision_per_query(torch.tensor([[True, False, True]]), torch.tensor([2])).tolist()
        [0.5]
    """
    r = _check_r(hits, num_relevant, True)
    in_r = torch.arange(hits.shape[1], device=hits.device)[None, :] < r[:, None]
    return (hits & in_r).sum(dim=1).double() / r.double()


def average_precision_at_r_per_query(hits: Tensor, num_relevant: Tensor) -> Tensor:
    """AP@R per query: ``1/R · Σ_{i ≤ R} rel(i) · (hits in the first i) / i`` (NaN where R = 0).

    Example:
        Hits at ranks 1 and 3 of R = 3 relevant items: (1/1 + 2/3) / 3 = 0.5556.

        >>> round(average_precision_at_r_per_query(
        ...     torch.tensor([[True, False, True, True]]), torch.tensor([3])).item(), 4)
        0.5556
    """
    r = _check_r(hits, num_relevant, True)
    ranks = torch.arange(1, hits.shape[1] + 1, device=hits.device, dtype=torch.float64)
    in_r = ranks[None, :] <= r[:, None]
    rel = hits & in_r
    precision = torch.cumsum(rel, dim=1).double() / ranks[None, :]
    return (precision * rel).sum(dim=1) / r.double()


def precision_at_1(neighbour_labels: Tensor, query_labels: Tensor, num_relevant: Tensor) -> float:
    """Mean Precision@1 over queries with ``R > 0``.

    Example:
        >>> precision_at_1(torch.tensor([[0, 1], [0, 1], [2, 2]]), torch.tensor([0, 1, 2]),
        ...                torch.tensor([1, 1, 0]))
        0.5
    """
    hits = hits_matrix(neighbour_labels, query_labels)
    return _mean_valid(precision_at_1_per_query(hits), num_relevant)


def recall_at_k(neighbour_labels: Tensor, query_labels: Tensor, num_relevant: Tensor, k: int) -> float:
    """DML Recall@k: fraction of queries (``R > 0``) with a same-class item in their top ``k``.

    Example:
        >>> nl = torch.tensor([[1, 0], [1, 1], [0, 1]])
        >>> recall_at_k(nl, torch.tensor([0, 0, 1]), torch.tensor([1, 1, 1]), 2)
        0.6666666666666666
    """
    hits = hits_matrix(neighbour_labels, query_labels)
    return _mean_valid(recall_at_k_per_query(hits, k), num_relevant)


def r_precision(neighbour_labels: Tensor, query_labels: Tensor, num_relevant: Tensor) -> float:
    """Mean R-Precision over queries with ``R > 0``.

    Example:
        Query 0 (R = 2) finds one of its two among its first two: 1/2; query 1 (R = 1) hits: 1.

        >>> r_precision(torch.tensor([[0, 1, 0], [1, 0, 0]]), torch.tensor([0, 1]), torch.tensor([2, 1]))
        0.75
    """
    hits = hits_matrix(neighbour_labels, query_labels)
    return _mean_valid(r_precision_per_query(hits, num_relevant), num_relevant)


def map_at_r(neighbour_labels: Tensor, query_labels: Tensor, num_relevant: Tensor) -> float:
    """Mean MAP@R (Musgrave et al. 2020) over queries with ``R > 0``.

    Example:
        Query 0 (R = 2): hits at ranks 2 and 3, only rank 2 counts: (1/2) / 2 = 0.25.
        Query 1 (R = 1): hit at rank 1: 1.0. Mean: 0.625.

        >>> map_at_r(torch.tensor([[1, 0, 0], [1, 0, 0]]), torch.tensor([0, 1]), torch.tensor([2, 1]))
        0.625
    """
    hits = hits_matrix(neighbour_labels, query_labels)
    return _mean_valid(average_precision_at_r_per_query(hits, num_relevant), num_relevant)


# --------------------------------------------------------------------------------------------
# clustering
# --------------------------------------------------------------------------------------------


def contingency(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Counts ``n[c, j]`` of items of class ``c`` in cluster ``j`` (classes and clusters relabelled).

    Example:
        >>> contingency(np.array([0, 0, 5]), np.array([1, 2, 2])).tolist()
        [[1, 1], [0, 1]]
    """
    labels, clusters = np.asarray(labels).ravel(), np.asarray(clusters).ravel()
    if labels.shape != clusters.shape:
        raise ValueError(f"labels and clusters differ in length: {labels.shape[0]} vs {clusters.shape[0]}")
    _, li = np.unique(labels, return_inverse=True)
    _, ci = np.unique(clusters, return_inverse=True)
    table = np.zeros((li.max(initial=-1) + 1, ci.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(table, (li, ci), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Normalised mutual information, ``I(Y; C) / ((H(Y) + H(C)) / 2)``.

    Both partitions being a single group (both entropies 0) counts as perfect agreement (1.0).

    Example:
        Two classes split into two pure clusters: I = H(Y) = H(C) = ln 2, NMI = 1.

        >>> nmi(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]))
        1.0
        >>> round(nmi(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])), 6)
        0.0
    """
    table = contingency(labels, clusters).astype(np.float64)
    n = table.sum()
    if n == 0:
        raise ValueError("NMI of an empty set")
    h_y, h_c = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_y == 0.0 and h_c == 0.0:
        return 1.0
    joint = table / n
    py, pc = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / (py @ pc)[nz])).sum())
    return max(0.0, min(1.0, mi / ((h_y + h_c) / 2)))


def _pairs(counts: np.ndarray) -> float:
    c = counts.astype(np.float64)
    return float((c * (c - 1) / 2).sum())


def pair_f1(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Pair-counting F1 of a clustering against class labels.

    Over unordered pairs: ``TP`` = same class and same cluster, precision = ``TP`` / pairs in the
    same cluster, recall = ``TP`` / pairs in the same class, F1 = their harmonic mean. When no
    pair shares a class or a cluster, F1 is 1.0 if neither partition has a pair, else 0.0.

    Example:
        Classes {0,1,2},{3} vs clusters {0,1},{2,3}: TP = 1 (0-1), cluster pairs = 2, class
        pairs = 3; P = 1/2, R = 1/3, F1 = 2·(1/6)/(5/6) = 0.4.

        >>> round(pair_f1(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])), 6)
        0.4
    """
    table = contingency(labels, clusters)
    tp = _pairs(table)
    same_cluster, same_class = _pairs(table.sum(0)), _pairs(table.sum(1))
    if same_cluster == 0 or same_class == 0:
        return 1.0 if same_cluster == same_class else 0.0
    if tp == 0:
        return 0.0
    p, r = tp / same_cluster, tp / same_class
    return 2 * p * r / (p + r)


def kmeans_plus_plus(x: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """k-means++ initial centroids (Arthur & Vassilvitskii 2007): D² sampling, seeded.

    The first centroid is a uniformly drawn row; each next one is drawn with probability
    proportional to the squared distance to the nearest centroid chosen so far.

    Example:
        Two far-apart pairs: the second centroid is (almost surely) drawn from the other pair.

        >>> x = np.array([[0.0, 0.0], [0.0, 0.1], [9.0, 9.0], [9.0, 9.1]])
        >>> c = kmeans_plus_plus(x, 2, seed=0)
        >>> bool(abs(c[0, 0] - c[1, 0]) == 9.0)
        True
    """
    rng = np.random.default_rng(seed)
    x64 = x.astype(np.float64)
    sq = (x64 * x64).sum(1)
    chosen = [int(rng.integers(len(x)))]
    d2 = np.maximum(sq - 2 * x64 @ x64[chosen[0]] + sq[chosen[0]], 0.0)
    for _ in range(1, n_clusters):
        total = d2.sum()
        nxt = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        chosen.append(nxt)
        d2 = np.minimum(d2, np.maximum(sq - 2 * x64 @ x64[nxt] + sq[nxt], 0.0))
    return np.ascontiguousarray(x[chosen], dtype=np.float32)


def kmeans_assign(x: np.ndarray, n_clusters: int, *, seed: int = 0, niter: int = 20,
                  backend: str = "auto") -> np.ndarray:
    """Seeded k-means with k-means++ initialisation; returns the cluster of each row (int64 ``[N]``).

    ``backend="faiss"`` (or ``"auto"`` with faiss importable): :func:`kmeans_plus_plus` centroids,
    then ``niter`` Lloyd iterations of ``faiss.Kmeans`` on all points. ``"sklearn"``: scikit-learn's
    ``KMeans`` (its own k-means++, ``n_init=1``, ``max_iter=niter``). faiss's own initialisation
    (random rows) often puts two centroids in one class and leaves another without one.

    Example:
        >>> x = np.array([[0.0, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0]], dtype=np.float32)
        >>> c = kmeans_assign(x, 2, backend="sklearn")
        >>> bool(c[0] == c[1] and c[2] == c[3] and c[0] != c[2])
        True
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"k-means needs a non-empty [N, D] array, got shape {x.shape}")
    if not 1 <= n_clusters <= x.shape[0]:
        raise ValueError(f"k-means needs 1 <= n_clusters <= {x.shape[0]}, got {n_clusters}")
    if backend not in ("auto", "faiss", "sklearn"):
        raise ValueError(f"unknown k-means backend {backend!r}; use auto, faiss or sklearn")
    faiss: Any = None
    if backend in ("auto", "faiss"):
        from dmlbench.evaluation.knn import _faiss

        faiss = _faiss()
    if faiss is not None:
        km = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=seed, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 20)
        km.train(x, init_centroids=kmeans_plus_plus(x, n_clusters, seed))
        _, assign = km.index.search(x, 1)
        return assign.ravel().astype(np.int64)
    from sklearn.cluster import KMeans

    km2 = KMeans(n_clusters=n_clusters, n_init=1, max_iter=niter, random_state=seed)
    return km2.fit_predict(x).astype(np.int64)
