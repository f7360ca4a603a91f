"""Exact k-nearest-neighbour search, chunked so memory grows with ``chunk × N``, never ``N²``.

Scores are similarities (higher = closer):

* ``"cosine"``: inner product after L2-normalising queries and references;
* ``"euclidean"``: negative squared L2 distance ``-(|q|² + |r|² - 2 q·r)``. The torch path ranks
  a query's neighbours by ``2 q·r - |r|²`` (the query's ``|q|²`` is the same for the whole row)
  and subtracts ``|q|²`` from the kept scores only; in float32 that subtraction can round two
  different ranking scores to one returned value, which then keeps the ranking's order.

**Ordering and ties.** Neighbours are ordered by score, highest first; equal scores are ordered by
reference index, lowest first. The order is exact: :func:`topk_desc` detects rows where the k-th
and (k+1)-th scores are equal (a tie across the cut) and resolves those rows with a stable full
sort. faiss's flat indexes (what pytorch-metric-learning's ``AccuracyCalculator`` uses through
``FaissKNN``) order ties the same way (lower id first, checked in ``tests/test_knn.py``), so on
tied data the two agree wherever both compute bit-identical scores. They can still differ on
*near* ties: PML ranks by faiss's float32 ``|q|² + |r|² - 2 q·r`` and we by ``q·r``, and two
scores that are equal in exact arithmetic can round differently. That only matters for
embeddings whose neighbour scores differ by ~1e-7; the tests use tie-free random data and
exactly representable tied data (small integers, symmetric angles).

**Self exclusion.** When the reference set is the query set (``reference=None``), query ``i``
never returns reference ``i`` (by index, so duplicates of ``i`` are still returned). With a
separate reference set, ``exclude[i]`` names one reference position to skip for query ``i``
(``-1``: none), for query/gallery splits that overlap.

**Backends.** ``"torch"`` runs on whatever device the tensors are on: one ``[chunk, M]``
similarity block per query chunk, then an exact top-k. When the query set is the reference set,
on CPU, it computes each similarity once instead (``symmetric``, automatic from
``SYMMETRIC_MIN_N`` queries): square tiles on and above the diagonal, each offered to the
neighbour lists of its rows and of its columns by numba kernels that keep a per-query reservoir
of candidates behind a rising bar (:mod:`dmlbench.evaluation._selfknn_kernels`). That halves the
matmul and replaces ``torch.topk`` with a mostly branch-free scan. ``"faiss"`` uses
``IndexFlatIP`` / ``IndexFlatL2`` (on GPU when the tensors are on CUDA and faiss was built with
GPU support); when faiss cannot be imported it warns once and uses torch. ``"auto"`` is torch.
Timings: ``docs/evaluation.md``.
"""

from __future__ import annotations

import functools
import importlib
import math
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

Distance = Literal["cosine", "euclidean"]
Backend = Literal["auto", "torch", "faiss"]
DISTANCES: tuple[str, ...] = ("cosine", "euclidean")
BACKENDS: tuple[str, ...] = ("auto", "torch", "faiss")
FAISS_GPU_MAX_K = 2048  # faiss GPU's largest k (faiss/gpu/utils/DeviceDefs.cuh)
SYMMETRIC_MIN_N = 8192  # auto: the symmetric CPU path from this many queries on (its kernels compile once)
_TILE = 1024  # side of the symmetric path's square tiles
_SAMPLE = 1024  # items per row that set the symmetric path's first bars
_MAX_IDS = 2**31 - 1  # the symmetric path keeps int32 ids (and n as a placeholder)


@dataclass(frozen=True)
class KnnChunk:
    """Neighbours of the queries ``start:stop``.

    Attributes:
        start: first query of the chunk.
        stop: one past the last query of the chunk.
        scores: ``[stop - start, k]`` similarities, highest first.
        indices: ``[stop - start, k]`` reference positions (int64), ties by lower position.
    """

    start: int
    stop: int
    scores: Tensor
    indices: Tensor


@dataclass(frozen=True)
class KnnResult:
    """Neighbours of every query: ``scores`` and ``indices`` are ``[Q, k]``, best first."""

    scores: Tensor
    indices: Tensor


# --------------------------------------------------------------------------------------------
# exact top-k with deterministic ties
# --------------------------------------------------------------------------------------------


def sort_pairs_desc(scores: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by score (descending), equal scores by id (ascending).

    Args:
        scores: ``[B, m]`` scores.
        ids: ``[B, m]`` integer ids.

    Returns:
        ``(scores, ids)`` reordered per row.

    Example:
        >>> s, i = sort_pairs_desc(torch.tensor([[0.5, 0.75, 0.5]]), torch.tensor([[7, 3, 2]]))
        >>> s.tolist(), i.tolist()
        ([[0.75, 0.5, 0.5]], [[3, 2, 7]])
    """
    by_id = torch.argsort(ids, dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return scores.gather(1, by_score), ids.gather(1, by_score)


def _order_ties(values: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Rows already sorted by score (desc): order runs of equal scores by id (asc).

    Only rows with a tie are touched; each gets one sort of the key ``run · (max id + 1) + id``,
    where ``run`` numbers the runs of equal scores (ids in a row are distinct, so keys are too).
    """
    if values.shape[1] < 2:
        return values, ids
    new_run = values[:, 1:] != values[:, :-1]
    tied = ~new_run.all(dim=1)
    if not bool(tied.any()):
        return values, ids
    rows = torch.nonzero(tied).squeeze(1)
    run = torch.zeros((len(rows), values.shape[1]), dtype=torch.long, device=values.device)
    run[:, 1:] = torch.cumsum(new_run[rows], dim=1)
    sub_ids = ids[rows]
    order = torch.argsort(run * (int(sub_ids.max()) + 1) + sub_ids, dim=1)
    values, ids = values.clone(), ids.clone()
    values[rows] = values[rows].gather(1, order)
    ids[rows] = sub_ids.gather(1, order)
    return values, ids


def topk_desc(scores: Tensor, k: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` of each row: highest score first, equal scores by lower column first.

    ``torch.topk`` leaves the order of equal values unspecified; this asks it for ``k + 1``
    values. In rows whose k-th and (k+1)-th values tie (a tie across the cut) it keeps the items
    above the k-th value plus the lowest columns equal to it; then it orders ties inside the kept
    ``k`` by column.

    Args:
        scores: ``[B, m]`` scores (NaN-free).
        k: how many to keep, ``0 <= k <= m``.
        offset: added to the returned column indices (the block's first reference position).

    Returns:
        ``(values, indices)``, both ``[B, k]``; indices are int64 columns plus ``offset``.

    Example:
        >>> v, i = topk_desc(torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]]), 2, offset=10)
        >>> v.tolist(), i.tolist()
        ([[3.0, 3.0]], [[11, 12]])
    """
    m = scores.shape[1]
    if not 0 <= k <= m:
        raise ValueError(f"k must be in [0, {m}], got {k}")
    if k == 0:
        empty = scores.new_empty((scores.shape[0], 0))
        return empty, torch.empty((scores.shape[0], 0), dtype=torch.long, device=scores.device)
    kk = min(k + 1, m)
    values, indices = torch.topk(scores, kk, dim=1, largest=True, sorted=True)
    if kk > k:
        across_cut = values[:, k - 1] == values[:, k]
        values, indices = values[:, :k], indices[:, :k]
        if bool(across_cut.any()):
            rows = torch.nonzero(across_cut).squeeze(1)
            values, indices = values.clone(), indices.clone()
            vk = values[rows, k - 1]
            above = (values[rows] > vk[:, None]).sum(dim=1)  # these are certainly kept
            equal = scores[rows] == vk[:, None]
            rank = torch.cumsum(equal, dim=1)  # 1-based rank among the tied columns
            take = equal & (rank <= (k - above)[:, None])
            r_local, cols = torch.nonzero(take, as_tuple=True)
            pos = above[r_local] + rank[r_local, cols] - 1
            indices[rows[r_local], pos] = cols
            # slots before `above` keep topk's items (all > vk); tied slots now hold the lowest columns
    values, indices = _order_ties(values, indices)
    return values, indices + offset


def group_size(width: int, k: int) -> int:
    """Group size for :func:`topk_grouped` on rows of ``width`` scores, or 0 for a plain top-k.

    Grouping pays when rows are much wider than ``k``; the size balances the two selections it
    leaves, ``k`` of ``width / g`` group maxima and ``k`` of ``k · g`` candidates.

    Example:
        >>> group_size(20_000, 199), group_size(1_000, 199)
        (10, 0)
    """
    if k < 1 or width < 16 * (k + 1):
        return 0
    return max(2, round(math.sqrt(width / (k + 1))))


def topk_grouped(scores: Tensor, k: int, group: int) -> tuple[Tensor, Tensor]:
    """:func:`topk_desc` of each row, computed from the maxima of column groups.

    Column ``c`` of a row of width ``W = G · group`` belongs to group ``c mod G``. The ``k``
    groups with the largest maxima hold every score at or above the ``k``-th largest maximum
    ``t``, and at least ``k`` scores are ``>= t``; when the ``k``-th and ``(k+1)``-th maxima
    differ, these ``k · group`` candidates therefore hold the top-``k`` and every score tied
    with its last one, and their top-``k`` (kept in column order, so ties still go to the
    lower column) is exact. Rows where those maxima tie use :func:`topk_desc` on the whole row.
    On CPU this does two selections of about ``sqrt(W · k)`` scores instead of one of ``W``.

    Args:
        scores: ``[B, W]`` NaN-free scores, ``W`` a multiple of ``group``, ``W / group > k``.
        k: how many to keep, ``k >= 1``.
        group: group size (see :func:`group_size`).

    Returns:
        ``(values, indices)`` as :func:`topk_desc` with ``offset=0``.

    Example:
        >>> s = torch.tensor([[0.0, 5.0, 1.0, 5.0, 2.0, 3.0, 4.0, 0.5]])
        >>> v, i = topk_grouped(s, 2, 2)
        >>> v.tolist(), i.tolist()
        ([[5.0, 5.0]], [[1, 3]])
    """
    b, w = scores.shape
    if group < 1 or w % group or w // group <= k or k < 1:
        raise ValueError(f"topk_grouped needs k >= 1 and a width ({w}) that is a multiple of the "
                         f"group size ({group}) with more than k={k} groups")
    g_count = w // group
    maxima = scores.view(b, group, g_count).amax(dim=1)  # maxima[:, j] = max of columns j + m·G
    top, sel = torch.topk(maxima, k + 1, dim=1, largest=True, sorted=True)
    sel = sel[:, :k].sort(dim=1).values
    offsets = torch.arange(0, w, g_count, device=scores.device)
    cols = (sel[:, None, :] + offsets[None, :, None]).reshape(b, group * k)  # ascending per row
    values, pos = topk_desc(scores.gather(1, cols), k)
    indices = cols.gather(1, pos)
    redo = torch.nonzero(top[:, k - 1] == top[:, k]).squeeze(1)
    if len(redo) > 0:
        values[redo], indices[redo] = topk_desc(scores[redo], k)
    return values, indices


# --------------------------------------------------------------------------------------------
# similarities
# --------------------------------------------------------------------------------------------


def prepare(x: Tensor, distance: str) -> Tensor:
    """Float32 (float64 kept) embeddings, L2-normalised for ``"cosine"``."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; use one of {', '.join(DISTANCES)}")
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if distance == "cosine":
        x = torch.nn.functional.normalize(x, p=2, dim=1)
    return x


def similarity_block(q: Tensor, r: Tensor, distance: str, q_sq: Tensor | None = None,
                     r_sq: Tensor | None = None) -> Tensor:
    """Similarity matrix ``[len(q), len(r)]`` of already :func:`prepare`-d embeddings.

    Example:
        >>> similarity_block(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]), "euclidean")
        tensor([[-25.]])
    """
    s = q @ r.T
    if distance == "euclidean":
        q_sq = (q * q).sum(1) if q_sq is None else q_sq
        r_sq = (r * r).sum(1) if r_sq is None else r_sq
        s.mul_(2).sub_(q_sq[:, None]).sub_(r_sq[None, :])
    return s


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------


def _torch_chunks(q: Tensor, r: Tensor, k: int, distance: str, chunk_size: int,
                  exclude: Tensor | None) -> Iterator[KnnChunk]:
    """One ``[chunk, M]`` similarity block per query chunk, then an exact top-k of its rows.

    The block lives in one buffer reused by every chunk (a fresh ``[chunk, M]`` tensor per chunk
    cost more than a tenth of the matmul in page faults). For ``"euclidean"`` the matmul itself
    adds the reference term, ``2 q·r - |r|²`` (``addmm``), and the query's ``|q|²``, constant
    along a row, is subtracted from the ``k`` kept scores only. On CPU with rows much wider than
    ``k`` the top-k is :func:`topk_grouped`; the reference set is then padded to a multiple of
    the group size with columns that score ``-inf``.
    """
    m, dim = r.shape
    group = group_size(m, k) if q.device.type == "cpu" else 0
    width = -(-m // group) * group if group else m
    r_pad = r if width == m else torch.cat([r, r.new_zeros((width - m, dim))])
    bias = None
    if distance == "euclidean":
        bias = torch.full((width,), float("-inf"), dtype=r.dtype, device=r.device)
        bias[:m] = -(r * r).sum(1)
    buffer = torch.empty((min(chunk_size, q.shape[0]), width), dtype=q.dtype, device=q.device)
    for s in range(0, q.shape[0], chunk_size):
        e = min(s + chunk_size, q.shape[0])
        block = buffer[: e - s]
        if bias is None:
            torch.mm(q[s:e], r_pad.T, out=block)
            block[:, m:] = float("-inf")
        else:
            torch.addmm(bias.expand(e - s, width), q[s:e], r_pad.T, alpha=2, out=block)
        if exclude is not None:
            ex = exclude[s:e].to(block.device)
            rows = torch.nonzero(ex >= 0).squeeze(1)
            block[rows, ex[rows]] = float("-inf")
        values, indices = topk_grouped(block, k, group) if group else topk_desc(block, k)
        if bias is not None:
            values = values - (q[s:e] * q[s:e]).sum(1, keepdim=True)
        yield KnnChunk(s, e, values, indices)
    del buffer


# --------------------------------------------------------------------------------------------
# symmetric self k-NN (CPU, numba selection kernels)
# --------------------------------------------------------------------------------------------


def _import_or_warn(module: str, label: str, instead: str) -> Any | None:
    """``module`` imported, or None with a warning that ``label`` is missing and what happens instead."""
    try:
        return importlib.import_module(module)
    except Exception as err:
        warnings.warn(f"{label} cannot be imported ({err}); {instead}", RuntimeWarning, stacklevel=4)
        return None


@functools.lru_cache(maxsize=1)
def _kernels() -> Any | None:
    """The numba selection kernels, or None (with one warning per process) without numba."""
    return _import_or_warn("dmlbench.evaluation._selfknn_kernels", "numba",
                           "self k-NN on CPU forms every similarity twice instead of once (same results, "
                           "slower). Reinstall dmlbench's dependencies to fix it.")


def symmetric_available() -> bool:
    """Whether the symmetric CPU path can run (numba imports; warns once when it cannot)."""
    return _kernels() is not None


def sample_rank(k: int, candidates: int, sample: int) -> int:
    """Rank ``q`` in a random sample of ``sample`` of a row's ``candidates`` whose item is, but
    for about one row in a thousand, still no better than the row's ``k``-th best.

    The sampled items better than the ``k``-th best are hypergeometric with mean
    ``μ = k · sample / candidates`` (at most binomial spread); ``q = ⌈μ + 3σ⌉ + 1``.

    Example:
        >>> sample_rank(199, 19_999, 1024)
        21
    """
    p = k / candidates
    mu = sample * p
    return math.ceil(mu + 3 * math.sqrt(mu * (1 - p))) + 1


_Task = tuple[int, tuple[int, ...], Callable[[Tensor], None]]  # (stage, row blocks, work(buffer))


def _run_blockwise(tasks: list[_Task], buffers: list[Tensor]) -> None:
    """Run every task ``(stage, blocks, work)`` as ``work(buffer)``, on one thread per buffer.

    The symmetric path's work comes in tasks of a few milliseconds (one tile: its matmul and its
    selection). Spread over threads inside each task (an MKL product and numba parallel regions
    per tile), every thread waited at the end of each of a few hundred short regions for the
    slowest one; with two threads on a 2-core box and another process on one core that made the
    search slower than with one thread. Here each thread takes whole tasks from one shared list,
    with torch's matmul single-threaded in it: a thread slowed down by another process only gets
    through fewer tasks, and the others wait for it once, at the end.

    Rules: no two tasks that name one row block (``blocks``) run at once, since the kernels write
    a block's reservoirs without locks; a task starts only after every task of an earlier
    ``stage`` that names one of its blocks (bars before tiles, tiles before the final
    selection). Among the tasks that may start, a thread takes the first in list order. The first
    error of any task is raised once every thread has stopped.
    """
    if len(buffers) == 1:  # in list order, which lists the stages in order
        for _, _, work in tasks:
            work(buffers[0])
        return
    pending = list(tasks)
    left = Counter((block, stage) for stage, blocks, _ in tasks for block in blocks)
    busy: set[int] = set()
    errors: list[BaseException] = []
    lock = threading.Condition()

    def may_start(stage: int, blocks: tuple[int, ...]) -> bool:
        return busy.isdisjoint(blocks) and all(left[b, s] == 0 for b in blocks for s in range(stage))

    def worker(buffer: Tensor) -> None:
        torch.set_num_threads(1)  # this thread's matmuls; else each one starts its own team of threads
        while True:
            with lock:
                while True:
                    if errors or not pending:
                        return
                    pick = next((i for i, (stage, blocks, _) in enumerate(pending) if may_start(stage, blocks)), None)
                    if pick is not None:
                        break
                    lock.wait()
                stage, blocks, work = pending.pop(pick)
                busy.update(blocks)
            error = None
            try:
                work(buffer)
            except BaseException as err:
                error = err
            with lock:
                if error is not None:
                    errors.append(error)
                busy.difference_update(blocks)
                for b in blocks:
                    left[b, stage] -= 1
                lock.notify_all()

    threads = torch.get_num_threads()
    pool = [threading.Thread(target=worker, args=(buffer,)) for buffer in buffers]
    try:
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    finally:  # interrupted: the threads stop after their current task
        with lock:
            pending.clear()
        for thread in pool:
            if thread.ident is not None:
                thread.join()
        torch.set_num_threads(threads)  # the workers' set_num_threads(1) changed it for the process too
    if errors:
        raise errors[0]


def _symmetric_self(x: Tensor, k: int, distance: str, chunk_size: int, kern: Any) -> Iterator[KnnChunk]:
    """Query = reference on CPU, self excluded, each similarity computed once.

    1. **Bars from a sample.** Every row's bar starts at its ``q``-th best among ``_SAMPLE``
       random items (:func:`sample_rank`), so most candidates are rejected from the start.
    2. **Tiles.** The matrix is cut into square tiles of side ``min(chunk_size, 1024)``; only
       tiles on or above the diagonal are computed (``torch.mm``, raw dot products). Tile
       ``(i, j)`` is offered to its rows (queries of block ``i``, candidates of block ``j``) and,
       off the diagonal, to its columns (queries of block ``j``, candidates of block ``i``),
       without being transposed.
    3. **Finish.** Once every tile of a row block is done, each of its rows keeps its best ``k``,
       sorted, in its reservoir's first ``k`` slots. A row that collected fewer than ``k``
       candidates had a sample bar above its ``k``-th best (rare by construction) and is
       recomputed whole by the plain path (:func:`_torch_chunks`) when its block is yielded.

    The three steps run as tasks of one row block (bars, finish) or one tile, on
    ``torch.get_num_threads()`` threads, each task single-threaded (:func:`_run_blockwise`); the
    chunks are yielded after all of them. A row's ``k`` best are one set under a total order and
    each score is the same float32 number whoever computes its tile, so neither the order of the
    tiles nor the number of threads changes the result.

    See :mod:`dmlbench.evaluation._selfknn_kernels` for the reservoirs and bars.
    """
    n = x.shape[0]
    side = max(1, min(chunk_size, _TILE))
    if k == 0:
        for s in range(0, n, side):
            e = min(s + side, n)
            yield KnnChunk(s, e, x.new_empty((e - s, 0)), torch.empty((e - s, 0), dtype=torch.long))
        return
    x = x.detach().contiguous()
    sq = (x * x).sum(1)  # non-finite iff an embedding is (or its squared norm overflows)
    if not bool(torch.isfinite(sq).all()):
        raise ValueError("the embeddings are not finite (NaN or inf), or too large for float32 squared "
                         "norms; k-NN needs finite embeddings")
    if distance != "euclidean":
        sq = None
    bias = np.zeros(n, dtype=np.float32) if sq is None else sq.numpy()
    alpha = np.float32(2.0 if distance == "euclidean" else 1.0)
    cap = k + k // 2 + 16  # reservoir: every cap - k survivors cost one quickselect of cap
    bv = np.empty((n, cap), dtype=np.float32)
    bi = np.empty((n, cap), dtype=np.int32)
    cnt = np.zeros(n, dtype=np.int32)
    tv = np.full(n, -np.inf, dtype=np.float32)
    ti = np.full(n, n, dtype=np.int32)
    m = min(_SAMPLE, n - 1)
    q = sample_rank(k, n - 1, m)
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:m].sort().values
    xs, ids = x[sample], sample.to(torch.int32).numpy()
    spans = [(s, min(s + side, n)) for s in range(0, n, side)]

    def tile(buffer: Tensor, s: int, e: int, other: Tensor) -> np.ndarray:
        out = buffer[: (e - s) * len(other)].view(e - s, len(other))  # contiguous, whatever its shape
        torch.mm(x[s:e], other.T, out=out)
        return out.numpy()

    def bars(s: int, e: int) -> Callable[[Tensor], None]:
        return lambda buffer: kern.sample_bars(tile(buffer, s, e, xs), s, ids, bias, alpha, q, tv, ti)

    def push(s: int, e: int, t: int, u: int) -> Callable[[Tensor], None]:
        def work(buffer: Tensor) -> None:
            block = tile(buffer, s, e, x[t:u])
            kern.push_rows(block, s, t, bias, alpha, bv, bi, cnt, tv, ti, k)
            if t > s:
                kern.push_cols(block, s, t, bias, alpha, bv, bi, cnt, tv, ti, k)
        return work

    def finish(s: int, e: int) -> Callable[[Tensor], None]:
        def work(buffer: Tensor) -> None:
            kern.finish_rows(bv, bi, cnt, k, s, e)
            kern.sorted_rows(bv, bi, cnt, k, s, e, bv[s:e], bi[s:e])
        return work

    # q >= m: every sampled item would pass, no useful bar
    tasks: list[_Task] = [(0, (a,), bars(s, e)) for a, (s, e) in enumerate(spans)] if q < m else []
    tasks += [(1, (a, b), push(s, e, t, u)) for a, (s, e) in enumerate(spans)
              for b, (t, u) in enumerate(spans[a:], a)]
    tasks += [(2, (a,), finish(s, e)) for a, (s, e) in enumerate(spans)]
    workers = max(1, min(torch.get_num_threads(), len(spans)))
    _run_blockwise(tasks, [torch.empty(side * max(min(side, n), m), dtype=x.dtype) for _ in range(workers)])
    for s, e in spans:
        values = torch.from_numpy(bv[s:e, :k].copy())
        indices = torch.from_numpy(bi[s:e, :k].astype(np.int64))
        if sq is not None:
            values = values - sq[s:e, None]
        redo = torch.from_numpy(np.flatnonzero(cnt[s:e] < k))
        if len(redo):  # the sample bar was above the k-th best: the whole row, by the plain path
            rows = redo + s
            for part in _torch_chunks(x[rows], x, k, distance, chunk_size, rows):
                values[redo[part.start:part.stop]] = part.scores
                indices[redo[part.start:part.stop]] = part.indices
        yield KnnChunk(s, e, values, indices)


# --------------------------------------------------------------------------------------------
# faiss backend
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _faiss() -> Any | None:
    """The faiss module, or None (with one warning per process) when it cannot be imported."""
    return _import_or_warn("faiss", "faiss", "using torch for k-NN search instead.")


def faiss_available() -> bool:
    """Whether faiss can be imported (warns once when it cannot)."""
    return _faiss() is not None


def _faiss_chunks(q: Tensor, r: Tensor, k: int, distance: str, chunk_size: int,
                  exclude: Tensor | None, faiss: Any) -> Iterator[KnnChunk]:
    """faiss flat-index search, then the same exact order as :func:`topk_desc`.

    faiss's flat indexes keep the lowest ids on a tie across the cut in our checks, but
    ``IndexFlatIP`` returns tied ids in *descending* order, so every row is re-sorted by
    (score desc, id asc); rows whose k-th and (k+1)-th scores tie are recomputed with torch so
    that the kept set does not depend on faiss internals.
    """
    device = q.device
    qn = np.ascontiguousarray(q.detach().cpu().numpy(), dtype=np.float32)
    rn = np.ascontiguousarray(r.detach().cpu().numpy(), dtype=np.float32)
    index = (faiss.IndexFlatIP if distance == "cosine" else faiss.IndexFlatL2)(rn.shape[1])
    extra = 0 if exclude is None else 1
    kk = min(k + 1 + extra, rn.shape[0])  # one more than needed, to see ties across the cut
    if device.type == "cuda" and faiss.get_num_gpus() > 0 and kk <= FAISS_GPU_MAX_K:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(rn)
    r_sq = (r * r).sum(1) if distance == "euclidean" else None
    for s in range(0, qn.shape[0], chunk_size):
        e = min(s + chunk_size, qn.shape[0])
        dist, idx = index.search(qn[s:e], kk)
        scores = torch.from_numpy(dist if distance == "cosine" else -dist).to(q.dtype)
        ids = torch.from_numpy(idx).long()
        width = kk
        if exclude is not None:
            ex = exclude[s:e].cpu()
            drop = ids == ex[:, None]
            # rows whose excluded item is not among those found: drop the last one instead
            drop[:, -1] |= ~drop.any(1)
            width = kk - 1
            scores = scores[~drop].view(e - s, width)
            ids = ids[~drop].view(e - s, width)
        scores, ids = sort_pairs_desc(scores, ids)
        if width > k:
            redo = torch.nonzero(scores[:, k - 1] == scores[:, k]).squeeze(1) if k > 0 else None
            scores, ids = scores[:, :k].clone(), ids[:, :k].clone()
            if redo is not None and len(redo) > 0:
                rows = (redo + s).to(device)
                block = similarity_block(q[rows], r, distance, None, r_sq)
                if exclude is not None:
                    ex_rows = exclude[redo + s].to(device)
                    has = torch.nonzero(ex_rows >= 0).squeeze(1)
                    block[has, ex_rows[has]] = float("-inf")
                v, i = topk_desc(block, k)
                scores[redo], ids[redo] = v.cpu(), i.cpu()
        yield KnnChunk(s, e, scores.to(device), ids.to(device))


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def iter_knn(
    query: Tensor,
    reference: Tensor | None,
    k: int,
    *,
    distance: str = "cosine",
    exclude: Tensor | None = None,
    chunk_size: int = 4096,
    backend: str = "auto",
    symmetric: bool | None = None,
) -> Iterator[KnnChunk]:
    """Exact k-NN of each query, yielded chunk by chunk (in query order).

    Args:
        query: ``[Q, D]`` embeddings.
        reference: ``[M, D]`` embeddings, or None for "the queries themselves, each query
            excluded from its own neighbours".
        k: neighbours per query; at most the number of candidates (``M``, minus one when a
            query has an excluded item).
        distance: ``"cosine"`` or ``"euclidean"``.
        exclude: ``[Q]`` reference positions to skip per query (``-1``: none); only with an
            explicit ``reference``.
        chunk_size: queries per chunk; memory is ``O(chunk_size × M)``.
        backend: ``"auto"`` (= torch), ``"torch"`` or ``"faiss"``.
        symmetric: with ``reference=None`` on CPU, compute each similarity once (square tiles
            above the diagonal, numba selection kernels; see the module doc). ``None`` (default):
            when it pays, i.e. float32 embeddings, at least ``SYMMETRIC_MIN_N`` queries and not
            the faiss backend. ``True``: always (an error where it cannot run). ``False``: never.
            Chunks are then at most 1024 queries, and memory is ``8 · Q · (1.5k + 16)`` bytes of
            candidate reservoirs plus one tile (at most 4 MiB) per thread.

    Yields:
        :class:`KnnChunk` per block of queries, scores highest first, ties by lower position.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [3.0]])
        >>> [c.indices.tolist() for c in iter_knn(x, None, 1, distance="euclidean")]
        [[[1], [0], [1]]]
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-NN backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if query.ndim != 2:
        raise ValueError(f"query embeddings must be a 2-D [N, D] array, got shape {tuple(query.shape)}")
    self_mode = reference is None
    if self_mode and exclude is not None:
        raise ValueError("exclude is only for an explicit reference set")
    q = prepare(query, distance)
    r = q if reference is None else prepare(reference.to(q.device), distance)
    if r.ndim != 2 or r.shape[1] != q.shape[1]:
        raise ValueError(
            f"query and reference embeddings must have the same width, got {tuple(q.shape)} "
            f"and {tuple(r.shape)}"
        )
    if r.dtype != q.dtype:
        r = r.to(q.dtype)
    excludes_one = self_mode or (exclude is not None and bool((exclude >= 0).any()))
    available = r.shape[0] - (1 if excludes_one else 0)
    if not 0 <= k <= available:
        raise ValueError(f"k={k} but only {available} reference items can be neighbours")
    if exclude is not None and exclude.shape != (q.shape[0],):
        raise ValueError(f"exclude must have one entry per query ({q.shape[0]}), got {tuple(exclude.shape)}")

    if symmetric:
        where = ("a reference set was given" if not self_mode else "the embeddings are not on the CPU"
                 if q.device.type != "cpu" else "the faiss backend was asked for" if backend == "faiss"
                 else "the embeddings are float64" if q.dtype != torch.float32
                 else "there are 2³¹ or more of them" if q.shape[0] >= _MAX_IDS else None)
        if where is not None:
            raise ValueError(f"symmetric k-NN needs float32 CPU embeddings searched against themselves, but {where}; "
                             "pass symmetric=None to choose automatically")
        if not symmetric_available():
            raise ValueError("symmetric k-NN needs numba, which cannot be imported; install it (pip install numba)")
    elif symmetric is None:
        symmetric = (self_mode and backend != "faiss" and q.device.type == "cpu" and q.dtype == torch.float32
                     and SYMMETRIC_MIN_N <= q.shape[0] < _MAX_IDS and k > 0 and symmetric_available())
    faiss = _faiss() if backend == "faiss" else None
    if faiss is not None:
        ex = torch.arange(q.shape[0]) if self_mode else exclude
        yield from _faiss_chunks(q, r, k, distance, chunk_size, ex, faiss)
    elif symmetric:
        yield from _symmetric_self(q, k, distance, chunk_size, _kernels())
    elif self_mode:
        own = torch.arange(q.shape[0], device=q.device)
        yield from _torch_chunks(q, q, k, distance, chunk_size, own)
    else:
        yield from _torch_chunks(q, r, k, distance, chunk_size, exclude)


def knn(
    query: Tensor,
    reference: Tensor | None,
    k: int,
    *,
    distance: str = "cosine",
    exclude: Tensor | None = None,
    chunk_size: int = 4096,
    backend: str = "auto",
    symmetric: bool | None = None,
) -> KnnResult:
    """All neighbours at once (``[Q, k]``); see :func:`iter_knn` for the arguments.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
        >>> knn(x, None, 2).indices.tolist()
        [[2, 1], [2, 0], [0, 1]]
    """
    parts = list(iter_knn(query, reference, k, distance=distance, exclude=exclude,
                          chunk_size=chunk_size, backend=backend, symmetric=symmetric))
    if not parts:
        dev = query.device
        return KnnResult(torch.empty((0, k), device=dev), torch.empty((0, k), dtype=torch.long, device=dev))
    return KnnResult(torch.cat([p.scores for p in parts]), torch.cat([p.indices for p in parts]))
