"""Classic single-model baselines: random, entropy, margin and least-confidence sampling.

Each ``*_score`` function is the strategy's own uncertainty (higher = more uncertain, [N]); the
benchmark uses it for error-detection AUROC. The strategies rank on an order-equivalent quantity
that is exact in floating point (``-max p`` rather than ``1 - max p``), so near-certain samples are
not tied by rounding.
"""

from __future__ import annotations

import numpy as np

from dpal_core.strategies.base import SelectionInput, clamp_budget, top_k


def _sorted_probs(inp: SelectionInput) -> np.ndarray:
    """[N, C] each row of ``probs`` sorted ascending.

    Sorting first makes every score depend only on the multiset of a row's probabilities, so two
    rows that are permutations of each other score bit-for-bit equal and tie-break by index.
    """
    return np.sort(inp.probs, axis=1)


def entropy_score(inp: SelectionInput) -> np.ndarray:
    """[N] Shannon entropy (nats) of each predicted distribution, with 0 log 0 = 0."""
    p = _sorted_probs(inp)
    return -(p * np.log(np.where(p > 0.0, p, 1.0))).sum(axis=1)


def _top_gap(inp: SelectionInput) -> np.ndarray:
    """[N] p1 - p2, the gap between the two largest probabilities of each row."""
    p = _sorted_probs(inp)
    return p[:, -1] - p[:, -2]


def margin_score(inp: SelectionInput) -> np.ndarray:
    """[N] 1 - (p1 - p2): high when the two most likely classes are close."""
    return 1.0 - _top_gap(inp)


def least_confidence_score(inp: SelectionInput) -> np.ndarray:
    """[N] 1 - max p."""
    return 1.0 - inp.probs.max(axis=1)


def random_strategy(inp: SelectionInput, budget: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random subset of the pool, in random order.

    Returns:
        [min(budget, N)] int64 indices.
    """
    k = clamp_budget(budget, inp.n_pool)
    return rng.permutation(inp.n_pool)[:k].astype(np.int64)


def entropy(inp: SelectionInput, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Highest predictive entropy first; ties go to the lower index. ``rng`` is unused.

    Returns:
        [min(budget, N)] int64 indices.
    """
    return top_k(entropy_score(inp), clamp_budget(budget, inp.n_pool))


def margin(inp: SelectionInput, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Smallest gap p1 - p2 first; ties go to the lower index. ``rng`` is unused.

    Returns:
        [min(budget, N)] int64 indices.
    """
    return top_k(-_top_gap(inp), clamp_budget(budget, inp.n_pool))


def least_confidence(inp: SelectionInput, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Smallest max p first; ties go to the lower index. ``rng`` is unused.

    Returns:
        [min(budget, N)] int64 indices.
    """
    return top_k(-inp.probs.max(axis=1), clamp_budget(budget, inp.n_pool))
