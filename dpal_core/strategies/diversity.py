"""Diversity baselines: Core-Set (k-centre greedy) and BADGE (k-means++ on gradient embeddings).

Both are greedy loops that keep, for every pool sample, its squared distance to the nearest chosen
centre ([N] floats) and update it against one new centre per step, so memory is O(N + N*D input)
and never O(N^2). Only the labelled set can be many centres at once; it is handled in row chunks.
"""

from __future__ import annotations

import numpy as np

from dpal_core.strategies.base import SelectionInput, clamp_budget

# Size of one [rows, L] distance block when measuring the pool against labelled centres: 1M
# entries (8 MiB in float64) keeps peak memory in the tens of MiB with no measurable slowdown.
CHUNK_ELEMENTS = 1 << 20


def _sq_norms(x: np.ndarray) -> np.ndarray:
    """[N] float64 squared L2 norm of each row of ``x`` [N, D]."""
    return np.einsum("nd,nd->n", x, x, dtype=np.float64)


def _sq_dist_to_point(x: np.ndarray, x_sq: np.ndarray, i: int) -> np.ndarray:
    """[N] squared distance from every row of ``x`` [N, D] to row ``i``, via |a|^2 + |b|^2 - 2ab."""
    d = x_sq + x_sq[i] - 2.0 * (x @ x[i]).astype(np.float64)
    return np.maximum(d, 0.0)  # rounding can push near-zero distances below zero


def _min_sq_dist_to_set(x: np.ndarray, x_sq: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """[N] squared distance from each row of ``x`` [N, D] to its nearest row of ``centres`` [L, D].

    Works through ``x`` in row chunks so the [rows, L] block stays under ``CHUNK_ELEMENTS``.
    """
    c_sq = _sq_norms(centres)
    out = np.empty(x.shape[0], dtype=np.float64)
    rows = max(1, CHUNK_ELEMENTS // max(1, centres.shape[0]))
    for start in range(0, x.shape[0], rows):
        block = x[start : start + rows] @ centres.T  # [rows, L]
        d = x_sq[start : start + rows, None] + c_sq[None, :] - 2.0 * block
        out[start : start + rows] = np.maximum(d.min(axis=1), 0.0)
    return out


def coreset(inp: SelectionInput, budget: int, rng: np.random.Generator) -> np.ndarray:
    """k-centre greedy (Sener & Savarese, 2018) on the image embeddings.

    The labelled embeddings are the initial centres; each step picks the pool sample farthest from
    its nearest centre (ties: lower index). With nothing labelled, the first pick is drawn by ``rng``.

    Returns:
        [min(budget, N)] int64 indices in pick order.
    """
    k = clamp_budget(budget, inp.n_pool)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    x = inp.embeddings
    x_sq = _sq_norms(x)
    picks: list[int] = []
    if inp.labeled_embeddings.shape[0]:
        min_d = _min_sq_dist_to_set(x, x_sq, inp.labeled_embeddings)
    else:
        first = int(rng.integers(inp.n_pool))
        picks.append(first)
        min_d = _sq_dist_to_point(x, x_sq, first)
        min_d[first] = -1.0
    while len(picks) < k:
        i = int(np.argmax(min_d))
        picks.append(i)
        np.minimum(min_d, _sq_dist_to_point(x, x_sq, i), out=min_d)
        # Mark picked samples below any real distance so duplicates of them are still reachable.
        min_d[i] = -1.0
    return np.asarray(picks, dtype=np.int64)


def badge(inp: SelectionInput, budget: int, rng: np.random.Generator) -> np.ndarray:
    """BADGE (Ash et al., ICLR 2020): k-means++ seeding on last-layer gradient embeddings.

    Sample i's gradient embedding is g_i = a_i (x) v_i with a_i = onehot(yhat_i) - p_i [C] and
    v_i its image embedding [D]. The [N, C*D] matrix is never built:
    |g_i - g_j|^2 = |a_i|^2 |v_i|^2 + |a_j|^2 |v_j|^2 - 2 (a_i . a_j)(v_i . v_j).
    The first centre is the largest gradient norm (ties: lower index); each next one is drawn by
    ``rng`` with probability proportional to the squared distance to the nearest centre. Labelled
    samples are not centres, as in BADGE.

    Returns:
        [min(budget, N)] int64 indices in pick order.
    """
    k = clamp_budget(budget, inp.n_pool)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    p, v, yhat = inp.probs, inp.embeddings, inp.predicted
    rows = np.arange(inp.n_pool)
    # |a_i|^2 = 1 - 2 p_i[yhat_i] + |p_i|^2, so the one-hot difference is never materialised either.
    a_sq = 1.0 - 2.0 * p[rows, yhat] + np.einsum("nc,nc->n", p, p)
    g_sq = a_sq * _sq_norms(v)  # [N]
    picks = [int(np.argmax(g_sq))]
    min_d = np.full(inp.n_pool, np.inf)
    while True:
        c = picks[-1]
        a_c = -p[c]
        a_c[yhat[c]] += 1.0
        a_dot = a_c[yhat] - p @ a_c  # [N] a_i . a_c
        v_dot = (v @ v[c]).astype(np.float64)  # [N] v_i . v_c
        np.minimum(min_d, np.maximum(g_sq + g_sq[c] - 2.0 * a_dot * v_dot, 0.0), out=min_d)
        # A chosen centre must never be drawn again, whatever the rounding; earlier ones stay at 0.
        min_d[c] = 0.0
        if len(picks) == k:
            return np.asarray(picks, dtype=np.int64)
        picks.append(_draw_proportional(min_d, rng, picks))


def _draw_proportional(weights: np.ndarray, rng: np.random.Generator, taken: list[int]) -> int:
    """One index drawn with probability ``weights / weights.sum()`` ([N], non-negative).

    When every remaining weight is zero (duplicate gradient embeddings), falls back to a uniform draw
    among the indices not in ``taken``.
    """
    cum = np.cumsum(weights)
    total = cum[-1]
    if total > 0.0:
        i = int(np.searchsorted(cum, rng.random() * total, side="right"))
        # rng.random() * total can round up to total; the last positive weight is then the answer.
        return i if i < len(cum) and weights[i] > 0.0 else int(np.flatnonzero(weights)[-1])
    free = np.setdiff1d(np.arange(len(weights)), taken)
    return int(free[rng.integers(len(free))])
