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


def _sparse_contingency(labels: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-zero cells of :func:`contingency` ``[m, 3]`` (class, cluster, count) and its row
    and column sums, without the dense table (11,316 classes × 11,316 clusters at SOP size
    would be 1 GB of int64)."""
    labels, clusters = np.asarray(labels).ravel(), np.asarray(clusters).ravel()
    if labels.shape != clusters.shape:
        raise ValueError(f"labels and clusters differ in length: {labels.shape[0]} vs {clusters.shape[0]}")
    li = np.unique(labels, return_inverse=True)[1].ravel().astype(np.int64)
    ci = np.unique(clusters, return_inverse=True)[1].ravel().astype(np.int64)
    width = int(ci.max(initial=-1)) + 1
    keys, counts = np.unique(li * width + ci, return_counts=True)
    return np.stack([keys // max(width, 1), keys % max(width, 1), counts], axis=1), np.bincount(li), np.bincount(ci)


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
    cells, rows, cols = _sparse_contingency(labels, clusters)
    n = float(rows.sum())
    if n == 0:
        raise ValueError("NMI of an empty set")
    h_y, h_c = _entropy(rows), _entropy(cols)
    if h_y == 0.0 and h_c == 0.0:
        return 1.0
    n_ij = cells[:, 2].astype(np.float64)  # I = Σ (n_ij / n) log(n · n_ij / (a_i b_j)) over the non-zero cells
    mi = float((n_ij / n * np.log(n * n_ij / (rows[cells[:, 0]].astype(np.float64) * cols[cells[:, 1]]))).sum())
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
    cells, rows, cols = _sparse_contingency(labels, clusters)
    tp = _pairs(cells[:, 2])
    same_cluster, same_class = _pairs(cols), _pairs(rows)
    if same_cluster == 0 or same_class == 0:
        return 1.0 if same_cluster == same_class else 0.0
    if tp == 0:
        return 0.0
    p, r = tp / same_cluster, tp / same_class
    return 2 * p * r / (p + r)


KMEANS_BACKENDS: tuple[str, ...] = ("auto", "faiss", "torch")
_SEED_BATCH = 256  # k-means++: centroids accepted per round before the D² refresh (one matmul)
_EPS = 1.0 / 1024  # faiss's relative perturbation when it splits a cluster into an empty one


def _sq_dists(x: Tensor, c: Tensor) -> Tensor:
    """``[len(x), len(c)]`` squared euclidean distances, ``|x|² + |c|² − 2 x·c``, clamped at 0."""
    d = torch.addmm((c * c).sum(1)[None, :], x, c.T, alpha=-2).add_((x * x).sum(1)[:, None])
    return d.clamp_(min=0)


def kmeans_plus_plus(x: Tensor, n_clusters: int, seed: int, batch: int = _SEED_BATCH) -> Tensor:
    """Rows of ``x`` chosen by k-means++ (Arthur & Vassilvitskii 2007), seeded; int64 ``[n_clusters]``.

    The first row is drawn uniformly; each next one with probability proportional to ``D²``, its
    squared distance to the nearest row chosen so far. Recomputing ``D²`` after every choice
    reads all of ``x`` once per centroid (minutes for 10k+ centroids), so ``D²`` is refreshed
    only after a *round* of up to ``batch`` choices, with one matmul. Inside a round, candidates
    are drawn from the round's stale ``D²_old`` and accepted with probability
    ``D²_now / D²_old`` (``D²_now`` also counts the rows accepted earlier in the round, from a
    small matmul of the round's candidates): rejection sampling, so every accepted row is drawn
    exactly from k-means++'s distribution. The first candidate of a round is always accepted.
    When ``D²`` is 0 everywhere (fewer distinct rows than clusters) the rest are drawn uniformly
    from the rows not chosen.

    Args:
        x: ``[N, D]`` float embeddings (any device; the matmuls run there).
        n_clusters: how many rows to choose, ``1 <= n_clusters <= N``.
        seed: seed of the draws.
        batch: most rows accepted per round.

    Example:
        Two far-apart pairs: the second centroid is (almost surely) drawn from the other pair.

        >>> x = torch.tensor([[0.0, 0.0], [0.0, 0.1], [9.0, 9.0], [9.0, 9.1]])
        >>> c = x[kmeans_plus_plus(x, 2, seed=0)]
        >>> bool(abs(c[0, 0] - c[1, 0]) == 9.0)
        True
    """
    return _kmeans_pp(x, n_clusters, seed, batch)[0]


def _kmeans_pp(x: Tensor, n_clusters: int, seed: int, batch: int = _SEED_BATCH) -> tuple[Tensor, Tensor]:
    """:func:`kmeans_plus_plus`, plus each row's nearest chosen row (its position in the choice,
    int64 ``[N]``), which the ``D²`` refreshes find anyway: k-means' first assignment for free."""
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    x_sq = (x * x).sum(1)

    def nearest_d2(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Squared distance of every row of x to its nearest of ``rows`` (float64) and which one."""
        r = torch.as_tensor(rows, device=x.device)
        block = torch.addmm(x_sq[r][None, :], x, x[r].T, alpha=-2)
        best, which = block.min(1)
        return best.add_(x_sq).clamp_(min=0).double().cpu().numpy(), which.cpu().numpy()

    chosen = [int(rng.integers(n))]
    d2, near = nearest_d2(np.array(chosen))
    d2[chosen] = 0.0
    while len(chosen) < n_clusters:
        want = min(batch, n_clusters - len(chosen))
        cdf = np.cumsum(d2)
        if not cdf[-1] > 0:  # every row coincides with a chosen one
            free = np.setdiff1d(np.arange(n), chosen)
            chosen.extend(rng.choice(free, n_clusters - len(chosen), replace=False).tolist())
            break
        cand = np.minimum(np.searchsorted(cdf, rng.random(2 * want) * cdf[-1], side="right"), n - 1)
        accept_u = rng.random(len(cand))
        xc = x[torch.as_tensor(cand, device=x.device)].double()
        pair = _sq_dists(xc, xc).cpu().numpy()  # candidate-to-candidate D², float64
        old = d2[cand]
        now = old.copy()
        taken: list[int] = []
        for t in range(len(cand)):
            if old[t] > 0 and accept_u[t] * old[t] < now[t]:
                taken.append(t)
                np.minimum(now, pair[t], out=now)
                if len(taken) == want:
                    break
        rows = cand[taken]
        new_d2, which = nearest_d2(rows)
        closer = new_d2 < d2
        near[closer] = len(chosen) + which[closer]
        chosen.extend(rows.tolist())
        d2 = np.minimum(d2, new_d2)
        d2[rows] = 0.0
        near[rows] = np.arange(len(chosen) - len(rows), len(chosen))
    return torch.as_tensor(chosen, dtype=torch.long), torch.as_tensor(near, dtype=torch.long)


def _nearest_torch(x: Tensor) -> Any:
    """Nearest-centroid search with torch on ``x``'s device: chunked ``addmm`` then the row minimum of
    ``|c|² − 2 x·c`` (``|x|²`` does not change a row's argmin). ``search(c, rows)`` returns the
    nearest centroid of each of ``rows`` (default: every point) and that score."""

    def search(c: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        xs = x if rows is None else x[rows]
        step = max(1, min(xs.shape[0], (1 << 25) // c.shape[0]))
        c_sq = (c * c).sum(1)[None, :]
        block = torch.empty((step, c.shape[0]), dtype=x.dtype, device=x.device)
        ids = torch.empty(xs.shape[0], dtype=torch.long, device=x.device)
        best = torch.empty(xs.shape[0], dtype=x.dtype, device=x.device)
        for s in range(0, xs.shape[0], step):
            e = min(s + step, xs.shape[0])
            torch.addmm(c_sq, xs[s:e], c.T, alpha=-2, out=block[: e - s])
            torch.min(block[: e - s], 1, out=(best[s:e], ids[s:e]))
        return ids, best

    return search


def _nearest_faiss(x: Tensor, faiss: Any) -> Any:
    """Nearest-centroid search with faiss's exact flat L2 index (on GPU for CUDA input when faiss
    has GPU support), the search ``faiss.Kmeans`` runs in each iteration; same interface as
    :func:`_nearest_torch` (the score is faiss's squared distance)."""
    xn = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    gpu = x.device.type == "cuda" and faiss.get_num_gpus() > 0

    def search(c: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        index = faiss.IndexFlatL2(xn.shape[1])
        if gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(np.ascontiguousarray(c.detach().cpu().numpy(), dtype=np.float32))
        dist, idx = index.search(xn if rows is None else xn[rows.cpu().numpy()], 1)
        return (torch.from_numpy(idx[:, 0].astype(np.int64)).to(x.device),
                torch.from_numpy(dist[:, 0]).to(x.device))

    return search


def _lloyd_step(search: Any, c: Tensor, moved: Tensor, assign: Tensor,
                score: Tensor | None) -> tuple[Tensor, Tensor]:
    """The next assignment, searching only where it can change.

    A point whose centroid did not move keeps it unless a centroid that moved is now closer
    (the others are where they were when its centroid was the nearest), so it is searched
    against the moved centroids only; points whose centroid moved are searched against all.
    Ties go to the lower centroid index, as in a full search. ``score`` (None: search all):
    each point's score to its centroid from the search that found it.
    """
    if score is None:
        return search(c)  # type: ignore[no-any-return]
    new, new_score = assign.clone(), score.clone()
    full = torch.nonzero(moved[assign]).squeeze(1)
    if len(full):
        new[full], new_score[full] = search(c, full)
    rest = torch.nonzero(~moved[assign]).squeeze(1)
    moved_ids = torch.nonzero(moved).squeeze(1)
    if len(rest) and len(moved_ids):
        ids, sc = search(c[moved_ids], rest)
        ids = moved_ids[ids]
        old = score[rest]
        better = (sc < old) | ((sc == old) & (ids < assign[rest]))
        take = rest[better]
        new[take], new_score[take] = ids[better], sc[better]
    return new, new_score


def _split_empty(c: Tensor, counts: Tensor, rng: np.random.Generator) -> bool:
    """faiss's rule for empty clusters: each takes a copy of a cluster drawn with probability
    ``∝ size − 1``, and the two copies are pushed apart by ``±1/1024`` (relative) in alternate
    coordinates; the drawn cluster's size is halved between them. Returns whether any split."""
    empty = torch.nonzero(counts == 0).squeeze(1).tolist()
    if not empty:
        return False
    size = counts.double().cpu().numpy()
    sign = torch.where(torch.arange(c.shape[1], device=c.device) % 2 == 0, 1.0, -1.0).to(c.dtype)
    for ci in empty:
        weight = np.maximum(size - 1, 0)
        if weight.sum() <= 0:
            break  # no cluster has two members to give
        cj = int(rng.choice(len(size), p=weight / weight.sum()))
        c[ci] = c[cj] * (1 + _EPS * sign)
        c[cj] = c[cj] * (1 - _EPS * sign)
        size[ci] = size[cj] // 2
        size[cj] -= size[ci]
    return True


def kmeans_assign(x: Tensor | np.ndarray, n_clusters: int, *, seed: int = 0, niter: int = 20,
                  backend: str = "auto") -> np.ndarray:
    """Seeded k-means (Lloyd) from a k-means++ start; the cluster of each row (int64 ``[N]``).

    * **Start**: :func:`kmeans_plus_plus` rows (exact k-means++, about one assignment step of
      work, which also yields the first assignment). pytorch-metric-learning's ``FaissKMeans`` uses ``faiss.Kmeans``' random rows, which
      leave about a third of the classes without a centroid when classes have a few items each.
    * **Iterations**: at most ``niter`` (PML: 20) of update (float64 means of the members) then
      assignment (exact nearest centroid; after the first, only against the centroids that moved
      for points whose own centroid did not, :func:`_lloyd_step`), stopping early at a fixed
      point, when an assignment repeats the previous one (the centroids would not move again). Empty clusters are refilled
      as ``faiss.Kmeans`` does (:func:`_split_empty`). The result is the last assignment, to the
      final centroids.
    * **Search** (``backend``): ``"faiss"``: faiss's flat L2 index, the search ``faiss.Kmeans``
      uses (on the GPU for CUDA input when faiss has GPU support); ``"torch"``: chunked
      ``addmm`` + ``argmin`` on the input's device; ``"auto"``: torch for CUDA input (no copy
      off the GPU), else faiss when it imports (its BLAS beats torch's on some CPUs; see
      docs/evaluation.md), else torch.

    Example:
        >>> x = np.array([[0.0, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0]], dtype=np.float32)
        >>> c = kmeans_assign(x, 2, backend="torch")
        >>> bool(c[0] == c[1] and c[2] == c[3] and c[0] != c[2])
        True
    """
    xt = (x.detach() if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))).float().contiguous()
    if xt.ndim != 2 or xt.shape[0] == 0:
        raise ValueError(f"k-means needs a non-empty [N, D] array, got shape {tuple(xt.shape)}")
    n = xt.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"k-means needs 1 <= n_clusters <= {n}, got {n_clusters}")
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; use one of {', '.join(KMEANS_BACKENDS)}")
    if niter < 0:
        raise ValueError(f"k-means needs niter >= 0, got {niter}")
    faiss: Any = None
    if backend == "faiss" or (backend == "auto" and xt.device.type != "cuda"):
        from dmlbench.evaluation.knn import _faiss

        faiss = _faiss()
    nearest = _nearest_faiss(xt, faiss) if faiss is not None else _nearest_torch(xt)
    rng = np.random.default_rng(seed)
    rows, assign = _kmeans_pp(xt, n_clusters, seed)
    c = xt[rows.to(xt.device)].clone()
    assign = assign.to(xt.device)
    score: Tensor | None = None  # the start's assignment came from k-means++'s matmuls: search all once
    for _ in range(niter):
        counts = torch.bincount(assign, minlength=n_clusters)
        sums = torch.zeros((n_clusters, xt.shape[1]), dtype=torch.float64, device=xt.device)
        for s in range(0, n, 8192):  # float64 sums without a float64 copy of x
            sums.index_add_(0, assign[s:s + 8192], xt[s:s + 8192].double())
        old = c.clone()
        filled = counts > 0
        c[filled] = (sums[filled] / counts[filled, None]).float()
        split = _split_empty(c, counts, rng)
        new, score = _lloyd_step(nearest, c, (c != old).any(1), assign, score)
        if not split and torch.equal(new, assign):
            break
        assign = new
    return assign.cpu().numpy().astype(np.int64)
