"""The symmetric self k-NN (CPU, numba kernels): exact against float64 brute force and the plain path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmlbench.evaluation import knn as knn_mod
from dmlbench.evaluation.knn import iter_knn, knn
from tests.test_knn import brute_force, integer_data

kern = pytest.importorskip("dmlbench.evaluation._selfknn_kernels")


def signed_unit_data(n: int, d: int, seed: int) -> torch.Tensor:
    """Vectors with four ±1 entries: norm 2, so normalised entries are ±0.5 and every cosine is
    an exact multiple of 1/4 in float32 and float64 (many exact ties, exact zeros)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, d)
    for i in range(n):
        cols = torch.randperm(d, generator=g)[:4]
        x[i, cols] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    return x


def count_rows(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Wrap ``knn_mod.<name>`` (first argument: query rows) and record each call's row count."""
    calls: list[int] = []
    real = getattr(knn_mod, name)

    def spy(x, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(x))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(knn_mod, name, spy)
    return calls


# ---------------------------------------------------------------------------- kernels


def test_select_best_keeps_the_best_k_by_score_then_id() -> None:
    rng = np.random.default_rng(0)
    for cnt, k in [(1, 1), (2, 1), (10, 3), (50, 49), (300, 100), (1023, 199)]:
        for values in (rng.standard_normal(cnt), rng.integers(0, 3, cnt), np.zeros(cnt)):
            v = values.astype(np.float32)
            ids = rng.permutation(cnt * 3)[:cnt].astype(np.int32)
            want = sorted(zip(-v.astype(np.float64), ids))[:k]
            bv, bi = v.copy(), ids.copy()
            wv, wi = kern.select_best(bv, bi, cnt, k)
            got = sorted(zip(-bv[:k].astype(np.float64), bi[:k]))
            assert got == want, (cnt, k)
            assert (-float(wv), int(wi)) == want[-1]  # the worst kept
            assert sorted(zip(bv, bi)) == sorted(zip(v, ids))  # a permutation: nothing lost


def test_sorted_rows_orders_by_score_desc_then_id_asc() -> None:
    v = np.array([[0.5, -0.0, 0.0, -np.inf, 0.5, -2.0, 3.0e38, -1e-30]], dtype=np.float32)
    i = np.array([[9, 4, 2, 0, 3, 7, 8, 1]], dtype=np.int32)
    out_v, out_i = np.empty((1, 8), np.float32), np.empty((1, 8), np.int64)
    kern.sorted_rows(v, i, np.array([8], np.int32), 8, 0, 1, out_v, out_i)
    assert out_i.tolist() == [[8, 3, 9, 2, 4, 1, 7, 0]]  # -0.0 and 0.0 tie: by id
    np.testing.assert_array_equal(out_v, np.array([[3.0e38, 0.5, 0.5, 0.0, 0.0, -1e-30, -2.0, -np.inf]], np.float32))


# ---------------------------------------------------------------------------- whole search


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 1000])
@pytest.mark.parametrize("k", [1, 5, 40, 119])
def test_symmetric_euclidean_with_exact_ties_matches_brute_force(chunk_size: int, k: int) -> None:
    # 27 distinct points among 120: duplicates and exact ties everywhere; k = 119 = n - 1 takes
    # every other point, and tiles narrower than k seed reservoirs with fewer than k items
    x = integer_data(120, 3, seed=0)
    got = knn(x, None, k, distance="euclidean", chunk_size=chunk_size, symmetric=True)
    want = brute_force(x.numpy(), x.numpy(), k, "euclidean", exclude=list(range(len(x))))
    np.testing.assert_array_equal(got.indices.numpy(), want)
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(got.scores.numpy(), -sq.gather(1, got.indices).numpy())


@pytest.mark.parametrize("chunk_size", [5, 64, 500])
def test_symmetric_cosine_with_exact_ties_matches_brute_force(chunk_size: int) -> None:
    x = signed_unit_data(300, 6, seed=1)
    got = knn(x, None, 50, distance="cosine", chunk_size=chunk_size, symmetric=True)
    want = brute_force(x.numpy(), x.numpy(), 50, "cosine", exclude=list(range(len(x))))
    np.testing.assert_array_equal(got.indices.numpy(), want)
    xn = torch.nn.functional.normalize(x, dim=1)
    np.testing.assert_array_equal(got.scores.numpy(), (xn @ xn.T).gather(1, got.indices).numpy())


def test_symmetric_equals_plain_on_wide_rows_and_threads() -> None:
    # wide enough for many compactions of every reservoir (k = 30, 2,500 candidates per row)
    x = integer_data(2500, 4, seed=2, high=6)
    plain = knn(x, None, 30, distance="euclidean", symmetric=False)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, threads):
            torch.set_num_threads(n_threads)
            for chunk_size in (256, 1024, 4096):
                got = knn(x, None, 30, distance="euclidean", chunk_size=chunk_size, symmetric=True)
                assert torch.equal(got.indices, plain.indices)
                assert torch.equal(got.scores, plain.scores)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rank", [1, 2, 6])
def test_rows_whose_sample_bar_was_too_high_are_recomputed(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    # a bar at the best (or 2nd, 6th) sampled item is above most rows' 10th best: those rows
    # end with fewer than k candidates and are recomputed whole; the rest keep the fast path
    monkeypatch.setattr(knn_mod, "sample_rank", lambda k, candidates, sample: rank)
    monkeypatch.setattr(knn_mod, "_SAMPLE", 50)
    redone = count_rows(monkeypatch, "_torch_chunks")
    x = integer_data(300, 3, seed=8, high=5)
    want = brute_force(x.numpy(), x.numpy(), 10, "euclidean", exclude=list(range(len(x))))
    for chunk_size in (7, 128):
        got = knn(x, None, 10, distance="euclidean", chunk_size=chunk_size, symmetric=True)
        np.testing.assert_array_equal(got.indices.numpy(), want)
        sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        np.testing.assert_array_equal(got.scores.numpy(), -sq.gather(1, got.indices).numpy())
    assert 0 < sum(redone) < 2 * 300 if rank == 6 else sum(redone) > 300  # most rows redone at rank 1


def test_sample_rank_is_rarely_above_the_kth_best() -> None:
    # the bar fails when more than q - 1 sampled items beat the k-th best: count it by simulation
    rng = np.random.default_rng(0)
    for k, candidates, sample in [(199, 19_999, 1024), (999, 99_999, 1024), (5, 9_000, 1024), (50, 8_191, 1024)]:
        q = knn_mod.sample_rank(k, candidates, sample)
        assert 1 < q < sample
        beats = np.array([(rng.choice(candidates, sample, replace=False) < k).sum() for _ in range(4000)])
        assert (beats >= q).mean() < 0.005, (k, candidates, sample, q)


def test_symmetric_chunks_are_tiles_in_order() -> None:
    x = integer_data(2100, 2, seed=3)
    spans = [(c.start, c.stop) for c in iter_knn(x, None, 3, chunk_size=4096, symmetric=True)]
    assert spans == [(0, 1024), (1024, 2048), (2048, 2100)]
    empty = list(iter_knn(x, None, 0, chunk_size=1000, symmetric=True))
    assert [tuple(c.indices.shape) for c in empty] == [(1000, 0), (1000, 0), (100, 0)]


def test_auto_takes_the_symmetric_path_from_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_rows(monkeypatch, "_symmetric_self")
    monkeypatch.setattr(knn_mod, "SYMMETRIC_MIN_N", 100)
    x = integer_data(150, 3, seed=4)
    auto = knn(x, None, 10, distance="euclidean")
    assert calls == [150]
    knn(x[:99], None, 10, distance="euclidean")  # below the threshold
    knn(x, x, 10, distance="euclidean")  # an explicit reference set
    knn(x.double(), None, 10, distance="euclidean")  # float64
    knn(x, None, 10, distance="euclidean", backend="faiss")
    assert calls == [150]
    assert torch.equal(auto.indices, knn(x, None, 10, distance="euclidean", symmetric=False).indices)


def test_symmetric_refuses_what_it_cannot_do() -> None:
    x = integer_data(20, 3, seed=5)
    with pytest.raises(ValueError, match="a reference set was given"):
        knn(x, x, 3, symmetric=True)
    with pytest.raises(ValueError, match="float64"):
        knn(x.double(), None, 3, symmetric=True)
    with pytest.raises(ValueError, match="faiss backend"):
        knn(x, None, 3, symmetric=True, backend="faiss")
    for value in (float("nan"), float("inf")):
        bad = x.clone()
        bad[3, 1] = value
        with pytest.raises(ValueError, match="not finite"):
            knn(bad, None, 3, symmetric=True, chunk_size=8)
    huge = x * 1e20  # finite embeddings whose squared norms overflow float32
    with pytest.raises(ValueError, match="too large"):
        knn(huge, None, 3, distance="euclidean", symmetric=True, chunk_size=8)


def test_without_numba_auto_falls_back_and_true_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn_mod, "_kernels", lambda: None)
    monkeypatch.setattr(knn_mod, "SYMMETRIC_MIN_N", 10)
    x = integer_data(60, 3, seed=6)
    got = knn(x, None, 8, distance="euclidean")
    np.testing.assert_array_equal(got.indices.numpy(), brute_force(x.numpy(), x.numpy(), 8, "euclidean",
                                                                   exclude=list(range(60))))
    with pytest.raises(ValueError, match="needs numba"):
        knn(x, None, 8, symmetric=True)


def test_evaluation_on_the_symmetric_path_equals_pml() -> None:
    """Above the size threshold evaluate_embeddings takes the symmetric path; its metrics must
    equal pytorch-metric-learning's AccuracyCalculator exactly (integer embeddings: exact scores,
    real ties, broken by lower index on both sides)."""
    from dmlbench.evaluation import evaluate_embeddings
    from tests.test_metrics import pml

    n = knn_mod.SYMMETRIC_MIN_N + 500
    g = torch.Generator().manual_seed(7)
    labels = torch.randperm(n, generator=g) % 40
    centres = torch.randint(-6, 7, (40, 8), generator=g).float()
    x = centres[labels] + torch.randint(-4, 5, (n, 8), generator=g).float()
    ours = evaluate_embeddings(x, labels, metrics=("precision_at_1", "r_precision", "map_at_r"),
                               distance="euclidean")
    theirs = pml(x, labels)
    for key in ("precision_at_1", "r_precision", "map_at_r"):
        assert ours[key] == theirs[key], key
    plain = knn(x, None, 50, distance="euclidean", symmetric=False)
    assert torch.equal(knn(x, None, 50, distance="euclidean").indices, plain.indices)


def test_run_blockwise_keeps_blocks_apart_and_stages_in_order() -> None:
    # tasks that sleep (releasing the GIL) so that two threads overlap; each checks, on entry,
    # that no running task names one of its blocks and that its blocks' earlier stages are done
    import threading
    import time

    lock = threading.Lock()
    running: set[int] = set()
    done: list[tuple[int, tuple[int, ...]]] = []
    broken: list[str] = []

    def task(stage: int, blocks: tuple[int, ...]):  # type: ignore[no-untyped-def]
        def work(buffer: torch.Tensor) -> None:
            with lock:
                if not running.isdisjoint(blocks):
                    broken.append(f"{blocks} ran beside {running}")
                todo = [t for t in tasks if t[0] < stage and set(t[1]) & set(blocks) and (t[0], t[1]) not in done]
                if todo:
                    broken.append(f"{stage, blocks} before {todo[0][:2]}")
                running.update(blocks)
            time.sleep(0.002)
            with lock:
                running.difference_update(blocks)
                done.append((stage, blocks))
        return work

    spans = range(5)
    tasks = [(0, (a,), task(0, (a,))) for a in spans]
    tasks += [(1, (a, b), task(1, (a, b))) for a in spans for b in spans if b >= a]
    tasks += [(2, (a,), task(2, (a,))) for a in spans]
    threads = torch.get_num_threads()
    knn_mod._run_blockwise(tasks, [torch.empty(1) for _ in range(3)])
    assert broken == []
    assert sorted(done) == sorted(t[:2] for t in tasks)
    assert torch.get_num_threads() == threads


def test_run_blockwise_raises_a_task_error_after_the_threads_stop() -> None:
    # (how many other tasks ran before the threads saw the error depends on timing: not checked)
    ran: list[int] = []

    def work(i: int):  # type: ignore[no-untyped-def]
        def run(buffer: torch.Tensor) -> None:
            ran.append(i)
            if i == 3:
                raise ArithmeticError("task 3")
        return run

    threads = torch.get_num_threads()
    with pytest.raises(ArithmeticError, match="task 3"):
        knn_mod._run_blockwise([(0, (i,), work(i)) for i in range(50)], [torch.empty(1), torch.empty(1)])
    assert 3 in ran
    assert torch.get_num_threads() == threads
