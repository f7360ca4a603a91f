"""Exact chunked k-NN: hand-made ties, brute force in float64, chunking, backends, self exclusion."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

from dmlbench.evaluation import knn as knn_mod
from dmlbench.evaluation.knn import (
    group_size,
    iter_knn,
    knn,
    sort_pairs_desc,
    topk_desc,
    topk_grouped,
)


def brute_force(
    query: np.ndarray,
    reference: np.ndarray,
    k: int,
    distance: str,
    exclude: list[int] | None = None,
) -> np.ndarray:
    """Neighbour positions by explicit loops in float64: score desc, then position asc."""
    q, r = query.astype(np.float64), reference.astype(np.float64)
    if distance == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        r = r / np.linalg.norm(r, axis=1, keepdims=True)
    rows = []
    for i in range(len(q)):
        cands = []
        for j in range(len(r)):
            if exclude is not None and exclude[i] == j:
                continue
            if distance == "cosine":
                score = float(np.dot(q[i], r[j]))
            else:
                score = -float(np.sum((q[i] - r[j]) ** 2))
            cands.append((-score, j))
        cands.sort()
        rows.append([j for _, j in cands[:k]])
    return np.array(rows, dtype=np.int64)


def integer_data(n: int, d: int, seed: int, high: int = 3) -> torch.Tensor:
    """Small-integer embeddings: float32 squared distances are exact, so ties are real ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, d), generator=g).float()


# ---------------------------------------------------------------------------- top-k primitives


def test_topk_desc_orders_ties_by_lower_column() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    v, i = topk_desc(scores, 4, offset=100)
    assert i.tolist() == [[101, 102, 104, 103], [100, 101, 102, 103]]
    assert v.tolist() == [[3.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]]
    # tie across the cut: the two lowest of the three 3.0 columns are kept
    assert topk_desc(scores[:1], 2)[1].tolist() == [[1, 2]]
    assert topk_desc(scores, 0)[1].shape == (2, 0)
    with pytest.raises(ValueError, match="k must be in"):
        topk_desc(scores, 6)


def test_topk_desc_matches_stable_sort_on_many_ties() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (50, 300), generator=g).float()
    for k in (1, 5, 100, 299, 300):
        v, i = topk_desc(scores, k)
        ref = torch.sort(scores, dim=1, descending=True, stable=True)
        assert torch.equal(i, ref.indices[:, :k])
        assert torch.equal(v, ref.values[:, :k])


@pytest.mark.parametrize("group", [2, 3, 7])
@pytest.mark.parametrize("k", [1, 9, 40])
def test_topk_grouped_equals_topk_desc(group: int, k: int) -> None:
    g = torch.Generator().manual_seed(group * 100 + k)
    width = group * 60
    cases = {
        "random": torch.randn(64, width, generator=g),
        "many ties": torch.randint(0, 5, (64, width), generator=g).float(),  # group maxima tie often
        "few ties": torch.randint(0, 400, (64, width), generator=g).float(),
        "constant": torch.zeros(4, width),
    }
    with_inf = torch.randn(16, width, generator=g)
    with_inf[:, ::5] = float("-inf")
    cases["-inf columns"] = with_inf
    for name, scores in cases.items():
        v, i = topk_grouped(scores, k, group)
        ref = torch.sort(scores, dim=1, descending=True, stable=True)  # ties: lower column first
        assert torch.equal(i, ref.indices[:, :k]), name
        assert torch.equal(v, ref.values[:, :k]), name


def test_topk_grouped_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of the group size"):
        topk_grouped(torch.zeros(2, 10), 2, 3)
    with pytest.raises(ValueError, match="more than k"):
        topk_grouped(torch.zeros(2, 10), 5, 2)
    assert group_size(1000, 199) == 0 and group_size(20_000, 0) == 0
    assert group_size(20_000, 199) == 10


def test_sort_pairs() -> None:
    _, i = sort_pairs_desc(torch.tensor([[0.5, 0.9, 0.5, 0.5]]), torch.tensor([[7, 3, 2, 9]]))
    assert i.tolist() == [[3, 2, 7, 9]]


# ---------------------------------------------------------------------------- against brute force


@pytest.mark.parametrize("backend", ["torch", "symmetric", "faiss"])
@pytest.mark.parametrize("chunk_size", [3, 7, 64, 1000])
def test_self_knn_with_exact_ties_matches_brute_force(backend: str, chunk_size: int) -> None:
    x = integer_data(120, 3, seed=0)  # 27 distinct points: many duplicates and exact ties
    k = 40
    got = knn(x, None, k, distance="euclidean", chunk_size=chunk_size, backend=backend.replace("symmetric", "torch"),
              symmetric=backend == "symmetric")
    want = brute_force(x.numpy(), x.numpy(), k, "euclidean", exclude=list(range(len(x))))
    np.testing.assert_array_equal(got.indices.numpy(), want)
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(got.scores.numpy(), -sq.gather(1, got.indices).numpy())


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_grouped_top_k_path_matches_brute_force(distance: str) -> None:
    # wide enough rows (400 >= 16 (k + 1)) for the grouped top-k; 400 is not a multiple of the
    # group size, so the padded columns are exercised too; for euclidean, small integers give
    # exact ties (normalised for cosine they would round differently in float32 and float64)
    if distance == "euclidean":
        x = integer_data(400, 4, seed=5, high=4)
    else:
        x = torch.randn(400, 6, generator=torch.Generator().manual_seed(5))
    k = 10
    assert group_size(400, k) == 6
    want = brute_force(x.numpy(), x.numpy(), k, distance, exclude=list(range(len(x))))
    for chunk_size in (64, 400):
        got = knn(x, None, k, distance=distance, chunk_size=chunk_size)
        np.testing.assert_array_equal(got.indices.numpy(), want)
    if distance == "euclidean":  # scores are exact here: -|q - r|²
        sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        np.testing.assert_array_equal(got.scores.numpy(), -sq.gather(1, got.indices).numpy())
    # explicit reference set with one excluded item per query, grouped too
    q, r = x[:50], x[50:]
    exclude = torch.full((50,), -1, dtype=torch.long)
    exclude[::3] = torch.arange(0, 50, 3)
    got = knn(q, r, k, distance=distance, exclude=exclude, chunk_size=16)
    want = brute_force(q.numpy(), r.numpy(), k, distance, exclude=exclude.tolist())
    np.testing.assert_array_equal(got.indices.numpy(), want)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_self_excluded_by_index_duplicates_kept(backend: str) -> None:
    x = torch.tensor([[0.0], [0.0], [0.0], [5.0]])
    for chunk_size in (1, 2, 4):
        for sym in (False, True) if backend == "torch" else (False,):
            got = knn(x, None, 3, distance="euclidean", backend=backend, chunk_size=chunk_size,
                      symmetric=sym).indices.tolist()
            assert got == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_random_tie_free_matches_brute_force(backend: str, distance: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(150, 8, generator=g) * 3 + 1
    got = knn(x, None, 20, distance=distance, chunk_size=32, backend=backend)
    want = brute_force(x.numpy(), x.numpy(), 20, distance, exclude=list(range(150)))
    np.testing.assert_array_equal(got.indices.numpy(), want)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_query_gallery_mode_and_exclude(backend: str) -> None:
    g = torch.Generator().manual_seed(4)
    q, r = torch.randn(30, 6, generator=g), torch.randn(80, 6, generator=g)
    got = knn(q, r, 10, chunk_size=7, backend=backend)
    np.testing.assert_array_equal(got.indices.numpy(), brute_force(q.numpy(), r.numpy(), 10, "cosine"))
    # overlap: query i is gallery item 2i for even i, and not in the gallery for odd i
    r2 = r.clone()
    ex = torch.full((30,), -1, dtype=torch.long)
    ex[::2] = torch.arange(0, 30, 2) * 2
    r2[ex[::2]] = q[::2]
    got2 = knn(q, r2, 10, exclude=ex, chunk_size=4, backend=backend)
    want2 = brute_force(q.numpy(), r2.numpy(), 10, "cosine", exclude=ex.tolist())
    np.testing.assert_array_equal(got2.indices.numpy(), want2)
    assert not any(int(ex[i]) in got2.indices[i].tolist() for i in range(0, 30, 2))


def test_chunk_size_and_repeats_do_not_change_results() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(333, 16, generator=g)
    ref = knn(x, None, 25, chunk_size=333)
    for cs in (7, 10, 64, 100, 4096):
        got = knn(x, None, 25, chunk_size=cs)
        assert torch.equal(got.indices, ref.indices)
        torch.testing.assert_close(got.scores, ref.scores, rtol=0, atol=1e-6)
    again = knn(x, None, 25, chunk_size=64)
    assert torch.equal(again.indices, knn(x, None, 25, chunk_size=64).indices)
    # the symmetric path, at any chunk size, equals the plain one
    for cs in (7, 64, 333):
        sym = knn(x, None, 25, chunk_size=cs, symmetric=True)
        assert torch.equal(sym.indices, ref.indices)
        torch.testing.assert_close(sym.scores, ref.scores, rtol=0, atol=1e-6)


def test_faiss_and_torch_agree_on_random_data() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(400, 32, generator=g)
    for distance in ("cosine", "euclidean"):
        a = knn(x, None, 30, distance=distance, backend="torch", chunk_size=128)
        b = knn(x, None, 30, distance=distance, backend="faiss", chunk_size=128)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-4)


def test_cosine_is_euclidean_on_normalised_vectors_but_not_on_raw() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200, 8, generator=g) * torch.rand(200, 1, generator=g) * 10
    xn = torch.nn.functional.normalize(x, dim=1)
    cos = knn(x, None, 15, distance="cosine").indices
    assert torch.equal(cos, knn(xn, None, 15, distance="euclidean").indices)
    assert not torch.equal(cos, knn(x, None, 15, distance="euclidean").indices)


def test_faiss_flat_l2_breaks_exact_ties_by_lower_id() -> None:
    """The documented reason our order equals PML's default FaissKNN on tied data."""
    faiss = pytest.importorskip("faiss")
    x = integer_data(200, 3, seed=8).numpy()
    index = faiss.IndexFlatL2(3)
    index.add(x)
    for nq in (5, 200):  # faiss switches from direct to BLAS distances at 20 queries
        _, ids = index.search(x[:nq], 150)
        want = brute_force(x[:nq], x, 150, "euclidean")
        np.testing.assert_array_equal(ids, want)


def test_missing_faiss_warns_once_and_uses_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    knn_mod._faiss.cache_clear()
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    try:
        x = integer_data(50, 3, seed=9)
        with pytest.warns(RuntimeWarning, match="faiss cannot be imported"):
            a = knn(x, None, 5, distance="euclidean", backend="faiss")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            b = knn(x, None, 5, distance="euclidean", backend="faiss")
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.indices, knn(x, None, 5, distance="euclidean", backend="torch").indices)
    finally:
        knn_mod._faiss.cache_clear()


def test_iter_knn_yields_chunks_in_order() -> None:
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(10))
    spans = [(c.start, c.stop, tuple(c.indices.shape)) for c in iter_knn(x, None, 3, chunk_size=4)]
    assert spans == [(0, 4, (4, 3)), (4, 8, (4, 3)), (8, 10, (2, 3))]


def test_bad_arguments() -> None:
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="only 4 reference items"):
        knn(x, None, 5)
    with pytest.raises(ValueError, match="unknown distance"):
        knn(x, None, 2, distance="manhattan")
    with pytest.raises(ValueError, match="unknown k-NN backend"):
        knn(x, None, 2, backend="annoy")
    with pytest.raises(ValueError, match="same width"):
        knn(x, torch.randn(5, 4), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(11))
    cpu = knn(x, None, 12, chunk_size=64)
    for backend in ("torch", "faiss"):
        gpu = knn(x.cuda(), None, 12, chunk_size=64, backend=backend)
        assert gpu.indices.device.type == "cuda"
        assert torch.equal(gpu.indices.cpu(), cpu.indices)
