"""numba kernels for the symmetric self k-NN (driven by :func:`dmlbench.evaluation.knn._symmetric_self`).

Each query row ``g`` owns a *reservoir*: ``cap > k`` slots of (score, id) in ``bv[g]`` / ``bi[g]``,
``cnt[g]`` of them filled, and a *bar* ``(tv[g], ti[g])``. Candidates are ranked by a total order,
score descending then id ascending (``_better``), so the top-``k`` of a row is one exact set. A
candidate enters only if it beats the bar. When the reservoir is full, a quickselect moves its
best ``k`` to the front, drops the rest and raises the bar to the worst one kept: nothing that does
not beat that ``k``-th best can be in the final top-``k``. The bar starts at ``(-inf, n)``, which
every real candidate beats, or at a sampled item (``sample_bars``) that the caller expects to be
worse than the row's ``k``-th best; a row left with fewer than ``k`` candidates shows that this
expectation failed, and the caller recomputes it.

Scores are computed from a tile of raw dot products ``T`` as ``alpha · T - bias[neighbour]``
(cosine: ``alpha = 1``, ``bias = 0``; euclidean: ``alpha = 2``, ``bias = |x|²``), in float32, the
same way wherever a score is used, so a score is compared and kept bit for bit as computed.

Scanning a tile is branch-free: every column's index is written and the write position advances
only for a survivor, which compiles to straight-line code; only the survivors (a few percent once
the bars have risen) then take the scalar path.

The kernels are serial. The caller runs them on several threads at once, each on whole tiles, and
never two at once on one block of rows (``nogil``: the threads run them in parallel); numba's own
parallel regions, one per tile and kernel, made every thread wait at each region's end for the
slowest one, which on a core that another process also used stalled them all.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(inline="always")
def _better(a, ia, b, ib):  # type: ignore[no-untyped-def]
    return (a > b) | ((a == b) & (ia < ib))  # bitwise: no branch


@njit(nogil=True, cache=True)
def select_best(bv, bi, cnt, k):  # type: ignore[no-untyped-def]
    """Move the best ``k`` of ``bv[:cnt]`` (total order) to the front; return the worst kept.

    Quickselect with a median-of-three pivot; keys are distinct (ids are), so it cannot stall on
    equal keys.
    """
    lo = 0
    hi = cnt - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        # median of three to bv[hi]
        if _better(bv[mid], bi[mid], bv[lo], bi[lo]):
            v = bv[mid]; i = bi[mid]; bv[mid] = bv[lo]; bi[mid] = bi[lo]; bv[lo] = v; bi[lo] = i  # noqa: E702
        if _better(bv[hi], bi[hi], bv[lo], bi[lo]):
            v = bv[hi]; i = bi[hi]; bv[hi] = bv[lo]; bi[hi] = bi[lo]; bv[lo] = v; bi[lo] = i  # noqa: E702
        if _better(bv[mid], bi[mid], bv[hi], bi[hi]):
            v = bv[hi]; i = bi[hi]; bv[hi] = bv[mid]; bi[hi] = bi[mid]; bv[mid] = v; bi[mid] = i  # noqa: E702
        pv = bv[hi]
        pi = bi[hi]
        store = lo
        for t in range(lo, hi):  # branch-free Lomuto: always swap, advance only past a better one
            v = bv[t]
            i = bi[t]
            bv[t] = bv[store]
            bi[t] = bi[store]
            bv[store] = v
            bi[store] = i
            store += _better(v, i, pv, pi)
        bv[hi] = bv[store]
        bi[hi] = bi[store]
        bv[store] = pv
        bi[store] = pi
        if store == k - 1:
            break
        if store < k - 1:
            lo = store + 1
        else:
            hi = store - 1
    wv = bv[0]
    wi = bi[0]
    for t in range(1, k):
        if _better(wv, wi, bv[t], bi[t]):
            wv = bv[t]
            wi = bi[t]
    return wv, wi


@njit(nogil=True, cache=True)
def sample_bars(tile, row0, ids, bias, alpha, q, tv, ti):  # type: ignore[no-untyped-def]
    """Set the bar of rows ``row0:…`` to their ``q``-th best candidate among a sample.

    ``tile[r, c]`` is the dot product of row ``row0 + r`` with item ``ids[c]``; the row's own
    item is skipped. Rows with fewer than ``q`` sampled candidates keep their bar. The ``q``
    best are kept in a small sorted buffer (insertion), which is cheap for small ``q``.
    """
    br, m = tile.shape
    for r in range(br):
        g = row0 + r
        hv = np.empty(q, np.float32)
        hi = np.empty(q, np.int32)
        h = 0
        for c in range(m):
            j = ids[c]
            if j == g:
                continue
            s = alpha * tile[r, c] - bias[j]
            if h < q:
                p = h
                h += 1
            elif _better(s, j, hv[q - 1], hi[q - 1]):
                p = q - 1
            else:
                continue
            while p > 0 and _better(s, j, hv[p - 1], hi[p - 1]):
                hv[p] = hv[p - 1]
                hi[p] = hi[p - 1]
                p -= 1
            hv[p] = s
            hi[p] = j
        if h == q:
            tv[g] = hv[q - 1]
            ti[g] = hi[q - 1]


@njit(nogil=True, cache=True)
def push_rows(tile, row0, col0, bias, alpha, bv, bi, cnt, tv, ti, k):  # type: ignore[no-untyped-def]
    """Offer tile ``T = X[row0:…] X[col0:…]ᵀ`` to its rows: row ``row0 + r`` gets candidates ``col0 + c``.

    A row's own item (on a diagonal tile) is never a candidate.
    """
    br, bc = tile.shape
    cap = bv.shape[1]
    b = bias[col0:col0 + bc]
    for r in range(br):
        g = row0 + r
        v0 = tv[g]
        i0 = ti[g]
        n = cnt[g]
        row = tile[r]
        idx = np.empty(bc + 1, np.int32)
        h = 0
        for c in range(bc):  # branch-free: keep the index, advance only for a survivor
            idx[h] = c
            h += alpha * row[c] - b[c] >= v0
        for q in range(h):
            c = idx[q]
            s = alpha * row[c] - b[c]
            j = col0 + c
            if _better(s, j, v0, i0) and j != g:
                bv[g, n] = s
                bi[g, n] = j
                n += 1
                if n == cap:
                    v0, i0 = select_best(bv[g], bi[g], n, k)
                    n = k
        cnt[g] = n
        tv[g] = v0
        ti[g] = i0


@njit(nogil=True, cache=True)
def push_cols(tile, row0, col0, bias, alpha, bv, bi, cnt, tv, ti, k):  # type: ignore[no-untyped-def]
    """Offer the same tile to its columns: row ``col0 + c`` gets candidates ``row0 + r``.

    The tile is read row by row (no transpose), each of its rows scanned against the bars of all
    the columns.
    """
    br, bc = tile.shape
    cap = bv.shape[1]
    bars = tv[col0:col0 + bc]
    idx = np.empty(bc + 1, np.int32)
    for r in range(br):
        j = row0 + r
        bj = bias[j]
        row = tile[r]
        h = 0
        for c in range(bc):
            idx[h] = c
            h += alpha * row[c] - bj >= bars[c]
        for q in range(h):
            c = idx[q]
            g = col0 + c
            s = alpha * row[c] - bj
            if _better(s, j, tv[g], ti[g]):
                n = cnt[g]
                bv[g, n] = s
                bi[g, n] = j
                n += 1
                if n == cap:
                    wv, wi = select_best(bv[g], bi[g], n, k)
                    tv[g] = wv
                    ti[g] = wi
                    n = k
                cnt[g] = n


@njit(nogil=True, cache=True)
def finish_rows(bv, bi, cnt, k, lo, hi):  # type: ignore[no-untyped-def]
    """Reduce the reservoirs of rows ``lo:hi`` to their best ``k`` (in the first ``k`` slots)."""
    for g in range(lo, hi):
        if cnt[g] > k:
            select_best(bv[g], bi[g], cnt[g], k)
            cnt[g] = k


@njit(nogil=True, cache=True)
def sorted_rows(bv, bi, cnt, k, lo, hi, out_v, out_i):  # type: ignore[no-untyped-def]
    """Write the first ``k`` slots of rows ``lo:hi`` in order (score desc, id asc) to ``out_*``.

    Rows with fewer than ``k`` candidates (``cnt``) are left alone. ``out_*`` may be the rows'
    own reservoirs (``bv[lo:hi]``, ``bi[lo:hi]``): a row's keys are formed before it is written.

    One integer sort per row. A float's bits, with the sign bit flipped for positives and all
    bits flipped for negatives, order like the float; inverted, higher scores come first. That
    goes in a key's high 32 bits and the id in the low 32 bits.
    """
    low = np.uint64(0xFFFFFFFF)
    sign = np.uint32(0x80000000)
    for g in range(lo, hi):
        if cnt[g] < k:
            continue
        keys = np.empty(k, np.uint64)
        bits = np.empty(1, np.float32)
        ubits = bits.view(np.uint32)
        for t in range(k):
            bits[0] = bv[g, t] + np.float32(0.0)  # -0.0 becomes +0.0: equal scores, equal keys
            u = ubits[0]
            u = u ^ np.uint32(0xFFFFFFFF) if u & sign else u | sign  # ascending with the float
            keys[t] = (np.uint64(u ^ np.uint32(0xFFFFFFFF)) << np.uint64(32)) | np.uint64(bi[g, t])
        keys.sort()
        for t in range(k):
            u = np.uint32((keys[t] >> np.uint64(32)) ^ low)
            ubits[0] = u ^ sign if u & sign else u ^ np.uint32(0xFFFFFFFF)
            out_v[g - lo, t] = bits[0]
            out_i[g - lo, t] = np.int64(keys[t] & low)
