"""Selection strategies: one name -> function table shared by the benchmark and the server.

Every strategy has the signature ``strategy(inp, budget, rng) -> indices`` (see
:mod:`dpal_core.strategies.base`). Callers look one up by name and call it; nothing outside this
table switches on the kind of strategy.

Example:
    >>> picks = select("dual_prompt", SelectionInput(...), budget=10, rng=np.random.default_rng(0))
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral

import numpy as np

from dpal_core.errors import ConfigError
from dpal_core.strategies.base import SelectionInput, Strategy
from dpal_core.strategies.diversity import badge, coreset
from dpal_core.strategies.dual_prompt import dual_prompt, dual_prompt_score
from dpal_core.strategies.pcb import make_pcb
from dpal_core.strategies.uncertainty import (
    entropy,
    entropy_score,
    least_confidence,
    least_confidence_score,
    margin,
    margin_score,
    random_strategy,
)

__all__ = [
    "STRATEGIES",
    "UNCERTAINTY_SIGNALS",
    "SelectionInput",
    "Strategy",
    "get_strategy",
    "make_pcb",
    "select",
    "strategy_names",
    "uncertainty_signal",
]

STRATEGIES: dict[str, Strategy] = {
    "dual_prompt": dual_prompt,
    "random": random_strategy,
    "entropy": entropy,
    "margin": margin,
    "least_confidence": least_confidence,
    "coreset": coreset,
    "badge": badge,
    # "pcb" is PCB over entropy: the cheap base, so PCB stays fast on large pools.
    "pcb": make_pcb("entropy"),
    # PCB over BADGE is the combination the PCB paper reports; it runs k-means++ for 10% of the pool.
    # BADGE is greedy over its candidates: cap them at 10 per query so 100k pools stay fast.
    "pcb_badge": make_pcb("badge", max_per_query=10),
}

# Per-sample uncertainty ([N], higher = more uncertain) of the strategies that have one. Random,
# coreset, badge and the PCB variants rank by something other than a per-sample score.
UNCERTAINTY_SIGNALS: dict[str, Callable[[SelectionInput], np.ndarray]] = {
    "dual_prompt": dual_prompt_score,
    "entropy": entropy_score,
    "margin": margin_score,
    "least_confidence": least_confidence_score,
}


def strategy_names() -> list[str]:
    """Registered strategy names, in registration order (``dual_prompt`` first)."""
    return list(STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The strategy registered as ``name``.

    Raises:
        ConfigError: no strategy has that name; the message lists the available ones.
    """
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown selection strategy {name!r}; available: {', '.join(strategy_names())}"
        ) from None


def select(name: str, inp: SelectionInput, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Run strategy ``name`` on ``inp`` and check what it returns.

    Args:
        name: a key of :data:`STRATEGIES`.
        inp: the validated pool.
        budget: how many samples to pick (>= 0); more than the pool returns the whole pool.
        rng: the only source of randomness, so a seeded generator makes the pick reproducible.
    Returns:
        [min(budget, N)] unique int64 pool indices, most wanted first.
    Raises:
        ConfigError: unknown ``name``, or ``budget`` is not a non-negative integer.
    """
    strategy = get_strategy(name)
    if isinstance(budget, bool) or not isinstance(budget, Integral) or budget < 0:
        raise ConfigError(f"budget must be a non-negative integer, got {budget!r}")
    k = min(int(budget), inp.n_pool)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    picks = np.asarray(strategy(inp, k, rng), dtype=np.int64)
    # Cheap (O(k log k)) guard on the contract, so a faulty strategy fails here and not in a label queue.
    if picks.shape != (k,) or len(np.unique(picks)) != k or picks.min() < 0 or picks.max() >= inp.n_pool:
        raise RuntimeError(f"strategy {name!r} returned {picks.shape[0]} indices that break the contract")
    return picks


def uncertainty_signal(name: str, inp: SelectionInput) -> np.ndarray:
    """Strategy ``name``'s own per-sample uncertainty over the pool (higher = more uncertain).

    ``dual_prompt``: 1 - p_clean; ``entropy``: entropy; ``margin``: 1 - (p1 - p2);
    ``least_confidence``: 1 - max p. Used as the error-detection score in the benchmark.

    Returns:
        [N] float64.
    Raises:
        ConfigError: ``name`` is unknown, or ranks by something other than a per-sample score
            (random, coreset, badge, pcb, pcb_badge).
    """
    get_strategy(name)
    if name not in UNCERTAINTY_SIGNALS:
        raise ConfigError(
            f"strategy {name!r} has no per-sample uncertainty; use one of: {', '.join(UNCERTAINTY_SIGNALS)}"
        )
    return UNCERTAINTY_SIGNALS[name](inp)
