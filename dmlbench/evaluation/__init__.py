"""Retrieval and clustering evaluation of embeddings: exact chunked k-NN plus DML metrics.

:func:`evaluate_embeddings` is the one entry point the engine and the CLI use; the maths lives in
:mod:`dmlbench.evaluation.knn` and :mod:`dmlbench.evaluation.metrics`. Definitions and measured
speed: ``docs/evaluation.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dmlbench.errors import DmlbenchError
from dmlbench.evaluation.knn import BACKENDS, DISTANCES, iter_knn, prepare
from dmlbench.evaluation.metrics import (
    average_precision_at_r_per_query,
    kmeans_assign,
    nmi,
    pair_f1,
    precision_at_1_per_query,
    r_precision_per_query,
    recall_at_k_per_query,
)

__all__ = ["METRICS", "EvaluationError", "evaluate_embeddings", "iter_knn", "metric_keys"]

#: metric groups :func:`evaluate_embeddings` can compute ("recall" = every ``recall_at_{k}``)
METRICS: tuple[str, ...] = ("map_at_r", "r_precision", "precision_at_1", "recall", "nmi", "f1")
_RETRIEVAL = ("map_at_r", "r_precision", "precision_at_1", "recall")


class EvaluationError(DmlbenchError, ValueError):
    """Embeddings, labels or options that cannot be evaluated."""


def metric_keys(metrics: Sequence[str] = METRICS, recall_ks: Sequence[int] = (1, 2, 4, 8)) -> list[str]:
    """Result keys of :func:`evaluate_embeddings` for these options, in output order.

    Example:
        >>> metric_keys(("map_at_r", "recall"), (1, 10))
        ['map_at_r', 'recall_at_1', 'recall_at_10']
    """
    keys: list[str] = []
    for m in metrics:
        if m == "recall":
            keys.extend(f"recall_at_{k}" for k in recall_ks)
        else:
            keys.append(m)
    return keys


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise EvaluationError(f"{name} must be a numeric array ({err}).") from None


def _mask(mask: Any, n: int, name: str) -> np.ndarray:
    if mask is None:
        return np.ones(n, dtype=bool)
    m = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if m.shape != (n,):
        raise EvaluationError(f"{name} must have one entry per embedding ({n}), got shape {m.shape}.")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise EvaluationError(f"{name} must be boolean (or 0/1).")
        m = m.astype(bool)
    if not m.any():
        raise EvaluationError(f"{name} selects no embedding; mark at least one item.")
    return m


def evaluate_embeddings(
    embeddings: Tensor | np.ndarray,
    labels: Tensor | np.ndarray | Sequence[Any],
    *,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    query_mask: Tensor | np.ndarray | None = None,
    gallery_mask: Tensor | np.ndarray | None = None,
    distance: str = "cosine",
    metrics: Sequence[str] = METRICS,
    chunk_size: int = 4096,
    backend: str = "auto",
    seed: int = 0,
) -> dict[str, float]:
    """Score embeddings with the DML retrieval and clustering metrics.

    Every query retrieves from the gallery (default: all items, each query excluded from its own
    neighbours by index). With ``query_mask``/``gallery_mask`` (In-Shop), queries retrieve from
    the gallery items; an item in both sets is still not its own neighbour. A query's relevant
    count ``R`` is the number of same-label gallery items other than itself; queries with
    ``R = 0`` are left out of the retrieval metrics (as PML's AccuracyCalculator does). NMI and F1
    cluster the query embeddings (L2-normalised for cosine) with seeded k-means, one cluster per
    query class (:func:`~dmlbench.evaluation.metrics.kmeans_assign`). Torch tensors stay on
    their device: on CUDA the k-NN and the k-means run there.

    Args:
        embeddings: ``[N, D]`` float array (torch tensors stay on their device).
        labels: ``[N]`` class labels (any hashable values; compared for equality).
        recall_ks: the k of each ``recall_at_{k}``.
        query_mask: ``[N]`` booleans selecting the queries (default: all).
        gallery_mask: ``[N]`` booleans selecting the gallery (default: all).
        distance: ``"cosine"`` (L2-normalised inner product) or ``"euclidean"``.
        metrics: subset of :data:`METRICS`.
        chunk_size: queries per similarity block; memory is ``O(chunk_size × gallery size)``.
        backend: k-NN and k-means backend, ``"auto"``, ``"torch"`` or ``"faiss"``.
        seed: k-means seed.

    Returns:
        ``{key: value}`` for the keys of :func:`metric_keys`, values in ``[0, 1]``.

    Raises:
        EvaluationError: bad shapes, non-finite embeddings, unknown names, or no query with a
            same-class item to find.

    Example:
        >>> emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> evaluate_embeddings(emb, [0, 0, 1, 1], recall_ks=(1,), metrics=("map_at_r", "recall"))
        {'map_at_r': 1.0, 'recall_at_1': 1.0}
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise EvaluationError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}.")
    if distance not in DISTANCES:
        raise EvaluationError(f"unknown distance {distance!r}; use one of {', '.join(DISTANCES)}.")
    if backend not in BACKENDS:
        raise EvaluationError(f"unknown k-NN backend {backend!r}; use one of {', '.join(BACKENDS)}.")
    ks = [int(k) for k in recall_ks]
    if "recall" in metrics and (not ks or min(ks) < 1):
        raise EvaluationError(f"recall k values must be positive integers, got {list(recall_ks)}.")
    if chunk_size < 1:
        raise EvaluationError(f"chunk size must be at least 1, got {chunk_size}.")

    emb = _as_tensor(embeddings, "embeddings")
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise EvaluationError(f"embeddings must be a non-empty [N, D] array, got shape {tuple(emb.shape)}.")
    if emb.dtype == torch.bool or not (emb.is_floating_point() or emb.dtype in (torch.int32, torch.int64)):
        raise EvaluationError(f"embeddings must be floating point, got {emb.dtype}.")
    emb = emb if emb.is_floating_point() else emb.float()
    if not bool(torch.isfinite(emb).all()):
        raise EvaluationError("embeddings contain NaN or infinite values; the model diverged or the file is corrupt.")
    n = emb.shape[0]
    lab_np = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if lab_np.shape != (n,):
        raise EvaluationError(f"labels must have one entry per embedding ({n}), got shape {lab_np.shape}.")
    _, lab_np = np.unique(lab_np, return_inverse=True)
    lab_np = lab_np.astype(np.int64).ravel()
    q_mask, g_mask = _mask(query_mask, n, "query mask"), _mask(gallery_mask, n, "gallery mask")
    q_idx, g_idx = np.flatnonzero(q_mask), np.flatnonzero(g_mask)
    same_set = np.array_equal(q_idx, g_idx)

    out: dict[str, float] = {}
    device = emb.device
    if any(m in metrics for m in _RETRIEVAL):
        q_lab = lab_np[q_idx]
        g_lab = lab_np[g_idx]
        if same_set:
            exclude_np = None
            in_gallery = np.ones(len(q_idx), dtype=bool)
        else:
            pos = np.full(n, -1, dtype=np.int64)
            pos[g_idx] = np.arange(len(g_idx))
            exclude_np = pos[q_idx]
            in_gallery = exclude_np >= 0
            if not in_gallery.any():
                exclude_np = None
        counts = np.bincount(g_lab, minlength=int(lab_np.max()) + 1)
        num_rel = counts[q_lab] - in_gallery.astype(np.int64)
        if not (num_rel > 0).any():
            raise EvaluationError(
                "no query has another item of its class in the gallery, so retrieval metrics are undefined; "
                "check the labels (every class needs at least two items)."
            )
        available = len(g_idx) - (1 if (same_set or exclude_np is not None) else 0)
        want_recall = max(ks) if "recall" in metrics else 1
        k = min(max(int(num_rel.max()), want_recall), available)

        x = emb.to(device)
        g_lab_t = torch.as_tensor(g_lab, device=device)
        q_lab_t = torch.as_tensor(q_lab, device=device)
        r_t = torch.as_tensor(num_rel, device=device)
        if same_set:
            chunks = iter_knn(x[torch.as_tensor(q_idx, device=device)] if len(q_idx) < n else x, None, k,
                              distance=distance, chunk_size=chunk_size, backend=backend)
        else:
            chunks = iter_knn(x[torch.as_tensor(q_idx, device=device)], x[torch.as_tensor(g_idx, device=device)],
                              k, distance=distance, chunk_size=chunk_size, backend=backend,
                              exclude=None if exclude_np is None else torch.as_tensor(exclude_np))
        # per-query values, summed once at the end: the result does not depend on the chunking
        per_query: dict[str, list[torch.Tensor]] = {
            key: [] for key in metric_keys([m for m in metrics if m in _RETRIEVAL], ks)
        }
        n_valid = int((num_rel > 0).sum())
        for chunk in chunks:
            r = r_t[chunk.start:chunk.stop]
            valid = r > 0
            hits = g_lab_t[chunk.indices] == q_lab_t[chunk.start:chunk.stop, None]
            hits, r = hits[valid], r[valid]
            if "map_at_r" in metrics:
                per_query["map_at_r"].append(average_precision_at_r_per_query(hits, r))
            if "r_precision" in metrics:
                per_query["r_precision"].append(r_precision_per_query(hits, r))
            if "precision_at_1" in metrics:
                per_query["precision_at_1"].append(precision_at_1_per_query(hits))
            if "recall" in metrics:
                for kk in ks:
                    per_query[f"recall_at_{kk}"].append(recall_at_k_per_query(hits, kk))
        out.update({key: float(torch.cat(v).double().sum()) / n_valid for key, v in per_query.items()})

    if "nmi" in metrics or "f1" in metrics:
        xq = prepare(emb[torch.as_tensor(q_idx, device=device)], distance)  # stays on its device
        q_lab = lab_np[q_idx]
        clusters = kmeans_assign(xq, len(np.unique(q_lab)), seed=seed, backend=backend)
        if "nmi" in metrics:
            out["nmi"] = nmi(q_lab, clusters)
        if "f1" in metrics:
            out["f1"] = pair_f1(q_lab, clusters)
    return {key: out[key] for key in metric_keys(metrics, ks)}
