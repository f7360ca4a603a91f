"""Retrieval and clustering metrics: hand-made neighbour lists, explicit loops, sklearn and PML.

Every retrieval value of :func:`evaluate_embeddings` is compared with pytorch-metric-learning's
``AccuracyCalculator`` on the same embeddings (its default FaissKNN ranks by L2, so cosine
embeddings are L2-normalised before they are handed to it), and with explicit-loop definitions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import pair_confusion_matrix

from dmlbench.evaluation import EvaluationError, evaluate_embeddings, metric_keys
from dmlbench.evaluation.metrics import (
    contingency,
    kmeans_assign,
    map_at_r,
    nmi,
    pair_f1,
    precision_at_1,
    r_precision,
    recall_at_k,
)

pml_acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")

PML_KEYS = {
    "precision_at_1": "precision_at_1",
    "r_precision": "r_precision",
    "mean_average_precision_at_r": "map_at_r",
}
RETRIEVAL = ("map_at_r", "r_precision", "precision_at_1", "recall")


# ---------------------------------------------------------------------------- explicit loops


def loop_metrics(nl: list[list[int]], ql: list[int], rs: list[int], k: int) -> dict[str, float]:
    """The four retrieval metrics of one neighbour-label list, by plain loops."""
    ap, rp, p1, rec = [], [], [], []
    for labels, q, r in zip(nl, ql, rs):
        if r == 0:
            continue
        hits = [int(lab == q) for lab in labels]
        p1.append(hits[0])
        rec.append(int(any(hits[:k])))
        rp.append(sum(hits[:r]) / r)
        total, found = 0.0, 0
        for i in range(r):
            if hits[i]:
                found += 1
                total += found / (i + 1)
        ap.append(total / r)
    return {
        "map_at_r": sum(ap) / len(ap),
        "r_precision": sum(rp) / len(rp),
        "precision_at_1": sum(p1) / len(p1),
        f"recall_at_{k}": sum(rec) / len(rec),
    }


def loop_evaluate(emb: np.ndarray, labels: np.ndarray, distance: str, ks: tuple[int, ...],
                  query: np.ndarray | None = None, gallery: np.ndarray | None = None) -> dict[str, float]:
    """Everything from scratch in float64: ranking, R, metrics (self excluded by index)."""
    n = len(emb)
    qi = np.arange(n) if query is None else np.flatnonzero(query)
    gi = np.arange(n) if gallery is None else np.flatnonzero(gallery)
    x = emb.astype(np.float64)
    if distance == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    out: dict[str, list[float]] = {}
    for q in qi:
        cands = []
        for pos, j in enumerate(gi):
            if j == q:
                continue
            s = float(x[q] @ x[j]) if distance == "cosine" else -float(((x[q] - x[j]) ** 2).sum())
            cands.append((-s, pos, labels[j]))
        cands.sort()
        r = sum(1 for _, _, lab in cands if lab == labels[q])
        if r == 0:
            continue
        row = [lab for _, _, lab in cands]
        for kk in ks:
            one = loop_metrics([row], [labels[q]], [r], kk)
            for key, v in one.items():
                if key.startswith("recall") or kk == ks[0]:
                    out.setdefault(key, []).append(v)
    return {key: sum(v) / len(v) for key, v in out.items()}


def pml(query: torch.Tensor, query_labels: torch.Tensor, reference: torch.Tensor | None = None,
        reference_labels: torch.Tensor | None = None, ref_includes_query: bool = False,
        kmeans_func: object | None = None, include: tuple[str, ...] = tuple(PML_KEYS)) -> dict[str, float]:
    calc = pml_acc.AccuracyCalculator(include=include, k="max_bin_count", device=torch.device("cpu"),
                                      kmeans_func=kmeans_func)
    res = calc.get_accuracy(query, query_labels, reference, reference_labels, ref_includes_query)
    return {PML_KEYS.get(key, key): float(v) for key, v in res.items()}


def clustered(n: int, d: int, classes: int, seed: int, spread: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=g)
    return centres[y] + spread * torch.randn(n, d, generator=g), y


def assert_no_near_ties(x: torch.Tensor, distance: str, k: int, gap: float = 1e-6) -> None:
    """Precondition of the PML comparisons on random data: no two of a query's first k + 1
    neighbour scores (float64) lie closer than ``gap``. Both sides rank in float32, and scores
    that close can swap by rounding (PML ranks by faiss's ``|q|² + |r|² - 2 q·r``, we by
    ``q·r``); such data would test rounding, not the metrics. ``gap`` is relative to the score."""
    z = x.double()
    if distance == "cosine":
        z = torch.nn.functional.normalize(z, dim=1)
        s = z @ z.T
    else:
        s = -torch.cdist(z, z) ** 2
    s.fill_diagonal_(float("-inf"))
    top = torch.topk(s, min(k + 1, len(z) - 1), dim=1).values
    rel = (top[:, :-1] - top[:, 1:]) / (1 + top[:, :-1].abs())
    assert float(rel.min()) > gap, "data has near ties; pick another seed"


def assert_close_dict(got: dict[str, float], want: dict[str, float], tol: float = 1e-9) -> None:
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=tol), key


# ---------------------------------------------------------------------------- hand-made lists


def test_hand_made_neighbour_lists() -> None:
    # query labels, neighbour labels (best first), R per query; the third query is lone
    nl = [[0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0], [2, 2, 1, 0]]
    ql = [0, 1, 3, 2]
    rs = [3, 2, 0, 2]
    t_nl, t_ql, t_rs = torch.tensor(nl), torch.tensor(ql), torch.tensor(rs)
    # by hand: q0 hits at ranks 1,3 of R=3 -> AP (1 + 2/3)/3, RP 2/3; q1 hit at 1 of R=2 -> AP 1/2,
    # RP 1/2; q3 hits at 1,2 of R=2 -> AP 1, RP 1. P@1: 1, 1, 1. Recall@1: 1, 1, 1.
    assert map_at_r(t_nl, t_ql, t_rs) == pytest.approx(((1 + 2 / 3) / 3 + 0.5 + 1.0) / 3)
    assert r_precision(t_nl, t_ql, t_rs) == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert precision_at_1(t_nl, t_ql, t_rs) == 1.0
    assert recall_at_k(t_nl, t_ql, t_rs, 1) == 1.0
    want = loop_metrics(nl, ql, rs, 2)
    assert map_at_r(t_nl, t_ql, t_rs) == pytest.approx(want["map_at_r"])
    assert recall_at_k(t_nl, t_ql, t_rs, 2) == pytest.approx(want["recall_at_2"])


def test_misses_and_lone_queries() -> None:
    nl = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ql = torch.tensor([0, 0])
    rs = torch.tensor([1, 2])
    # q0: the only relevant item is at rank 3, outside R=1 -> AP 0, RP 0, but Recall@3 = 1
    assert map_at_r(nl, ql, rs) == 0.0
    assert r_precision(nl, ql, rs) == 0.0
    assert precision_at_1(nl, ql, rs) == 0.0
    assert recall_at_k(nl, ql, rs, 3) == 0.5
    assert math.isnan(map_at_r(nl, ql, torch.tensor([0, 0])))


def test_r_larger_than_k_is_an_error() -> None:
    with pytest.raises(ValueError, match="retrieve at least max"):
        map_at_r(torch.tensor([[0, 0]]), torch.tensor([0]), torch.tensor([3]))


# ---------------------------------------------------------------------------- against PML


@pytest.mark.parametrize("seed", [1, 2, 3])  # seeds whose data pass assert_no_near_ties
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_random_embeddings_equal_pml_and_loops(seed: int, distance: str) -> None:
    x, y = clustered(150, 16, 8, seed)
    got = evaluate_embeddings(x, y, distance=distance, chunk_size=64, recall_ks=(1, 2, 4, 8),
                              metrics=RETRIEVAL)
    assert_no_near_ties(x, distance, int(torch.bincount(y).max()))
    to_pml = torch.nn.functional.normalize(x, dim=1) if distance == "cosine" else x
    assert_close_dict(got, pml(to_pml, y), tol=1e-12)
    assert_close_dict(got, loop_evaluate(x.numpy(), y.numpy(), distance, (1, 2, 4, 8)))
    assert got["recall_at_1"] == got["precision_at_1"]


def test_ties_equal_pml_and_loops() -> None:
    # small-integer points: exact squared distances, many exact ties and duplicates
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (150, 3), generator=g).float()
    y = torch.randint(0, 5, (150,), generator=g)
    for backend in ("torch", "faiss"):
        got = evaluate_embeddings(x, y, distance="euclidean", chunk_size=32, backend=backend,
                                  metrics=RETRIEVAL, recall_ks=(1, 4))
        assert_close_dict(got, pml(x, y), tol=1e-12)
        assert_close_dict(got, loop_evaluate(x.numpy(), y.numpy(), "euclidean", (1, 4)))


def test_cosine_ties_by_symmetric_angles_equal_pml() -> None:
    # points at ±θ around the x axis tie exactly for the query (1, 0); ties go to the lower index
    angles = torch.tensor([0.0, 0.4, -0.4, 0.8, -0.8, 0.4, 3.0, -3.0, 2.6, 0.0])
    x = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    y = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2, 2, 0])
    got = evaluate_embeddings(x, y, metrics=RETRIEVAL, recall_ks=(1, 2))
    assert_close_dict(got, pml(x, y), tol=1e-12)
    assert_close_dict(got, loop_evaluate(x.numpy(), y.numpy(), "cosine", (1, 2)))


def test_singleton_classes_are_left_out_like_pml() -> None:
    x, y = clustered(120, 6, 10, seed=4)
    assert_no_near_ties(x, "cosine", int(torch.bincount(y).max()))
    y = y.clone()
    y[:7] = torch.arange(100, 107)  # seven classes with a single item
    got = evaluate_embeddings(x, y, metrics=RETRIEVAL, recall_ks=(1, 3))
    assert_close_dict(got, pml(torch.nn.functional.normalize(x, dim=1), y), tol=1e-12)
    assert_close_dict(got, loop_evaluate(x.numpy(), y.numpy(), "cosine", (1, 3)))


def test_query_gallery_disjoint_equals_pml() -> None:
    x, y = clustered(260, 8, 15, seed=7)
    assert_no_near_ties(x, "cosine", int(torch.bincount(y).max()))
    is_query = torch.zeros(260, dtype=torch.bool)
    is_query[::3] = True
    is_gallery = ~is_query
    xn = torch.nn.functional.normalize(x, dim=1)
    for backend in ("torch", "faiss"):
        got = evaluate_embeddings(x, y, query_mask=is_query, gallery_mask=is_gallery, metrics=RETRIEVAL,
                                  recall_ks=(1, 10), chunk_size=16, backend=backend)
        assert_close_dict(got, pml(xn[is_query], y[is_query], xn[is_gallery], y[is_gallery], False), tol=1e-12)
        assert_close_dict(got, loop_evaluate(x.numpy(), y.numpy(), "cosine", (1, 10),
                                             is_query.numpy(), is_gallery.numpy()))


def test_query_inside_gallery_equals_pml_ref_includes_query() -> None:
    x, y = clustered(200, 8, 10, seed=8)
    assert_no_near_ties(x, "cosine", int(torch.bincount(y).max()))
    is_query = torch.zeros(200, dtype=torch.bool)
    is_query[:80] = True  # the queries are the first 80 items of the gallery (PML's prefix rule)
    xn = torch.nn.functional.normalize(x, dim=1)
    got = evaluate_embeddings(x, y, query_mask=is_query, metrics=RETRIEVAL, recall_ks=(1, 2))
    assert_close_dict(got, pml(xn[:80], y[:80], xn, y, True), tol=1e-12)
    assert_close_dict(got, loop_evaluate(x.numpy(), y.numpy(), "cosine", (1, 2), is_query.numpy()))


def test_nmi_equals_pml_with_the_same_kmeans() -> None:
    x, y = clustered(240, 8, 6, seed=7, spread=1.0)
    xn = torch.nn.functional.normalize(x, dim=1)

    def same_kmeans(emb: torch.Tensor, n: int) -> torch.Tensor:
        return torch.from_numpy(kmeans_assign(emb.numpy(), n, seed=0))

    got = evaluate_embeddings(x, y, metrics=("nmi",), seed=0)
    want = pml(xn, y, kmeans_func=same_kmeans, include=("NMI",))
    assert got["nmi"] == pytest.approx(want["NMI"], abs=1e-12)
    assert 0.0 < got["nmi"] < 1.0


# ---------------------------------------------------------------------------- clustering


@pytest.mark.parametrize("seed", [0, 1])
def test_nmi_and_f1_against_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 7, 400)
    clusters = np.where(rng.random(400) < 0.6, labels, rng.integers(0, 7, 400))
    assert nmi(labels, clusters) == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-12)
    (_tn, fp), (fn, tp) = pair_confusion_matrix(labels, clusters)  # ordered pairs (twice each)
    want_f1 = 2 * tp / (2 * tp + fp + fn)
    assert pair_f1(labels, clusters) == pytest.approx(want_f1, abs=1e-12)


def test_clustering_edge_cases() -> None:
    assert nmi(np.array([0, 0, 1, 1]), np.array([5, 5, 3, 3])) == 1.0
    assert nmi(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    assert nmi(np.array([4, 4, 4]), np.array([0, 0, 0])) == 1.0
    assert pair_f1(np.array([0, 1, 2]), np.array([0, 1, 2])) == 1.0  # no pairs on either side
    assert pair_f1(np.array([0, 0, 1]), np.array([0, 1, 2])) == 0.0
    # worked example: classes {0,1,2},{3}; clusters {0,1},{2,3}: P = 1/2, R = 1/3
    assert pair_f1(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])) == pytest.approx(0.4)
    assert contingency(np.array([0, 0, 5]), np.array([1, 2, 2])).tolist() == [[1, 1], [0, 1]]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_is_seeded_and_recovers_separated_blobs(backend: str) -> None:
    rng = np.random.default_rng(8)
    labels = np.repeat(np.arange(5), 30)
    x = (np.eye(5, 16)[labels] * 20 + rng.normal(size=(150, 16))).astype(np.float32)
    a = kmeans_assign(x, 5, seed=3, backend=backend)
    assert np.array_equal(a, kmeans_assign(x, 5, seed=3, backend=backend))
    assert nmi(labels, a) == 1.0
    assert pair_f1(labels, a) == 1.0


def test_evaluate_separated_blobs_scores_one() -> None:
    labels = np.repeat(np.arange(4), 10)
    x = np.eye(4, 8)[labels] * 10 + np.random.default_rng(9).normal(scale=0.1, size=(40, 8))
    got = evaluate_embeddings(x, labels)
    assert set(got) == set(metric_keys())
    assert all(v == pytest.approx(1.0) for v in got.values()), got


# ---------------------------------------------------------------------------- evaluate_embeddings


def test_chunk_size_backend_and_input_types_do_not_change_values() -> None:
    x, y = clustered(310, 12, 20, seed=10)
    ref = evaluate_embeddings(x, y, chunk_size=4096)
    for kwargs in ({"chunk_size": 5}, {"chunk_size": 64, "backend": "faiss"}, {"chunk_size": 100}):
        assert_close_dict(evaluate_embeddings(x, y, **kwargs), ref, tol=1e-12)
    assert_close_dict(evaluate_embeddings(x.numpy(), [f"c{v}" for v in y.tolist()]), ref, tol=1e-12)
    assert evaluate_embeddings(x, y) == ref  # deterministic, k-means included


def test_k_covers_largest_class_and_recall_ks() -> None:
    # one class of 30 (R = 29) among small ones; a recall k beyond the gallery is capped
    y = torch.cat([torch.zeros(30, dtype=torch.long), torch.arange(1, 11).repeat_interleave(2)])
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(11))
    got = evaluate_embeddings(x, y, recall_ks=(1, 100), metrics=RETRIEVAL)
    want = loop_evaluate(x.numpy(), y.numpy(), "cosine", (1, 100))
    assert_close_dict(got, want)
    assert got["recall_at_100"] == 1.0


def test_bad_input_is_one_clear_error() -> None:
    x = torch.randn(6, 3)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(EvaluationError, match="one entry per embedding"):
        evaluate_embeddings(x, y[:5])
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(EvaluationError, match="NaN"):
        evaluate_embeddings(bad, y)
    with pytest.raises(EvaluationError, match="unknown metric 'mapr'; choose from"):
        evaluate_embeddings(x, y, metrics=("mapr",))
    with pytest.raises(EvaluationError, match="unknown distance"):
        evaluate_embeddings(x, y, distance="l1")
    with pytest.raises(EvaluationError, match="no query has another item of its class"):
        evaluate_embeddings(x, torch.arange(6))
    with pytest.raises(EvaluationError, match="selects no embedding"):
        evaluate_embeddings(x, y, query_mask=np.zeros(6, dtype=bool))
    with pytest.raises(EvaluationError, match="recall k values must be positive"):
        evaluate_embeddings(x, y, recall_ks=(0,))
