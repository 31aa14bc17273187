"""What every selection strategy takes and returns, plus the ranking code they share.

A strategy is one function ``strategy(inp, budget, rng) -> indices``: ``inp`` is a validated
:class:`SelectionInput`, ``budget`` how many samples to pick, ``rng`` the only source of
randomness. It returns ``min(budget, N)`` unique int64 pool indices, most wanted first.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

from dpal_core.errors import ConfigError

# Softmax rows that are off by more than this were not produced by a softmax (logits, say).
PROB_SUM_ATOL = 1e-3


# eq=False: array fields make generated __eq__/__hash__ meaningless; compare by identity instead.
@dataclass(frozen=True, eq=False)
class SelectionInput:
    """Model outputs over the unlabelled pool, and what is already labelled.

    Attributes:
        probs: [N, C] softmax of the classifier (positive prompt) logits, C >= 2.
        p_clean: [N] the model's probability, in [0, 1], that its predicted label is correct.
        embeddings: [N, D] float image embeddings of the pool (L2-normalised by the encoder).
        labeled_embeddings: [L, D] embeddings of labelled samples; L may be 0 (any empty array works).
        labeled_counts: [C] non-negative integer count of labels per class so far.
    Raises:
        ConfigError: a shape does not match, or a value is NaN, infinite or out of range.
    """

    probs: np.ndarray
    p_clean: np.ndarray
    embeddings: np.ndarray
    labeled_embeddings: np.ndarray
    labeled_counts: np.ndarray

    def __post_init__(self) -> None:
        probs = _as_float_array("probs", self.probs, ndim=2)
        n, c = probs.shape
        if c < 2:
            raise ConfigError(f"probs has {c} column(s); selection needs at least 2 classes")
        if probs.min(initial=0.0) < 0.0 or probs.max(initial=0.0) > 1.0:
            raise ConfigError("probs has values outside [0, 1]; pass softmax probabilities, not logits")
        if n and np.abs(probs.sum(axis=1) - 1.0).max() > PROB_SUM_ATOL:
            raise ConfigError("probs rows do not sum to 1; pass softmax probabilities, not logits")
        p_clean = _as_float_array("p_clean", self.p_clean, ndim=1)
        if p_clean.shape != (n,):
            raise ConfigError(f"p_clean has shape {p_clean.shape}, expected ({n},) to match probs")
        if p_clean.min(initial=0.0) < 0.0 or p_clean.max(initial=0.0) > 1.0:
            raise ConfigError("p_clean has values outside [0, 1]")
        # Embeddings can be large ([100k, 512]); keep their float dtype rather than copy them to float64.
        emb = _as_float_array("embeddings", self.embeddings, ndim=2, keep_dtype=True)
        if emb.shape[0] != n or emb.shape[1] == 0:
            raise ConfigError(f"embeddings has shape {emb.shape}, expected ({n}, D) with D >= 1")
        d = emb.shape[1]
        lab = np.asarray(self.labeled_embeddings)
        if lab.size == 0:
            # Callers with nothing labelled often pass np.empty(0); give it the right width.
            lab = np.zeros((0, d), dtype=emb.dtype)
        lab = _as_float_array("labeled_embeddings", lab, ndim=2, keep_dtype=True)
        if lab.shape[1] != d:
            raise ConfigError(f"labeled_embeddings has shape {lab.shape}, expected (L, {d}) like embeddings")
        counts = np.asarray(self.labeled_counts)
        if counts.shape != (c,):
            raise ConfigError(f"labeled_counts has shape {counts.shape}, expected ({c},) to match probs")
        if counts.size and (not np.all(np.isfinite(counts)) or np.any(counts < 0) or np.any(counts % 1)):
            raise ConfigError("labeled_counts must hold non-negative whole numbers")
        # Frozen dataclass: normalised arrays are stored through object.__setattr__.
        for name, value in (
            ("probs", probs),
            ("p_clean", p_clean),
            ("embeddings", emb),
            ("labeled_embeddings", lab),
            ("labeled_counts", counts.astype(np.int64)),
        ):
            object.__setattr__(self, name, value)

    @property
    def n_pool(self) -> int:
        """N, the number of unlabelled samples."""
        return int(self.probs.shape[0])

    @property
    def n_classes(self) -> int:
        """C, the number of classes."""
        return int(self.probs.shape[1])

    @property
    def predicted(self) -> np.ndarray:
        """[N] int64 predicted class, argmax of ``probs`` (ties go to the lower class index)."""
        return self.probs.argmax(axis=1).astype(np.int64)


Strategy: TypeAlias = Callable[[SelectionInput, int, np.random.Generator], np.ndarray]


def _as_float_array(name: str, value: np.ndarray, *, ndim: int, keep_dtype: bool = False) -> np.ndarray:
    """Return ``value`` as a finite float array with ``ndim`` dimensions, or raise ConfigError.

    Without ``keep_dtype`` the result is float64. With it, float32/float64 arrays pass through
    uncopied (embeddings can be hundreds of MiB) and anything else becomes float32.
    """
    arr = np.asarray(value)
    if arr.ndim != ndim:
        raise ConfigError(f"{name} has {arr.ndim} dimension(s) (shape {arr.shape}), expected {ndim}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError(f"{name} has dtype {arr.dtype}, expected a float array")
    if not keep_dtype:
        arr = arr.astype(np.float64, copy=False)
    elif arr.dtype not in (np.float32, np.float64):
        # float16 and integer matmuls are slow or overflow in numpy; float32 is what the encoder gives.
        arr = arr.astype(np.float32)
    # min/max propagate NaN and expose inf without allocating an [N, D] boolean mask.
    if arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        raise ConfigError(f"{name} contains NaN or infinite values")
    return arr


def clamp_budget(budget: int, n: int) -> int:
    """How many samples a strategy returns: ``min(budget, n)``; negative budgets are refused."""
    if budget < 0:
        raise ConfigError(f"budget is {budget}; it must be >= 0")
    return min(int(budget), n)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest ``scores`` [N], highest first; equal scores go to the lower index.

    Returns:
        [min(k, N)] int64 indices.
    """
    # A full stable sort (O(N log N), ~10 ms at N=100k) keeps ties in index order, which
    # argpartition does not guarantee at the cut-off.
    return np.argsort(-scores, kind="stable")[:k].astype(np.int64)


def class_balanced_pick(
    order: np.ndarray, classes: np.ndarray, labeled_counts: np.ndarray, budget: int
) -> np.ndarray:
    """Fill ``budget`` from ranked candidates, always serving the class with the fewest labels.

    Each step takes the class with the smallest ``labeled_counts + picked so far`` (ties: lower class
    index) that still has candidates, and picks its best-ranked remaining candidate. A class whose
    candidates run out drops out, so the budget is always filled while candidates remain.

    Args:
        order: [M] int pool indices, best first.
        classes: [M] int predicted class of each entry of ``order``.
        labeled_counts: [C] int labels per class before this round.
        budget: how many to pick; at most M are returned.
    Returns:
        [min(budget, M)] int64 pool indices in pick order.
    """
    order = np.asarray(order, dtype=np.int64)
    classes = np.asarray(classes, dtype=np.int64)
    # Group candidates by class while keeping each group in rank order.
    by_class = np.argsort(classes, kind="stable")
    grouped = order[by_class]
    starts = np.searchsorted(classes[by_class], np.arange(len(labeled_counts) + 1))
    heap = [(int(labeled_counts[c]), c) for c in range(len(labeled_counts)) if starts[c + 1] > starts[c]]
    heapq.heapify(heap)
    next_pos = starts[:-1].copy()
    picks: list[int] = []
    while heap and len(picks) < budget:
        count, c = heapq.heappop(heap)
        picks.append(int(grouped[next_pos[c]]))
        next_pos[c] += 1
        if next_pos[c] < starts[c + 1]:
            heapq.heappush(heap, (count + 1, c))
    return np.asarray(picks, dtype=np.int64)
