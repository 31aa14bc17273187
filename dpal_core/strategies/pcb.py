"""PCB class balancing (Bang et al., CVPR 2024, "Active Prompt Learning in Vision Language Models").

PCB wraps a base strategy: the base first proposes its top 10% of the pool (at least ``budget``
samples) as candidates, then the budget is filled from those candidates by always serving the
predicted class with the fewest labels so far.

Differences from the reference code (kaist-dmlab/pcb), chosen so that runs are reproducible and
every registered strategy behaves the same way when a class is missing:

* within the served class it takes the base strategy's best-ranked candidate, where the reference
  shuffles that class's candidates and takes a random one;
* a class with no candidates left drops out (the next-fewest class is served), where the reference
  adds a random candidate instead.
"""

from __future__ import annotations

import numpy as np

from dpal_core.errors import ConfigError
from dpal_core.strategies.base import SelectionInput, Strategy, clamp_budget, class_balanced_pick

# Share of the pool the base strategy proposes as candidates (the reference uses len(pool) // 10).
CANDIDATE_FRACTION = 0.1


def candidate_count(
    n_pool: int, budget: int, fraction: float = CANDIDATE_FRACTION, max_per_query: int | None = None
) -> int:
    """How many candidates the base proposes: ``fraction`` of the pool, at least ``budget``, at most N
    (and at most ``max_per_query * budget`` when given)."""
    n = max(budget, int(n_pool * fraction))
    if max_per_query is not None:
        n = min(n, max(budget, max_per_query * budget))
    return min(n_pool, n)


def make_pcb(
    base_name: str, candidate_fraction: float = CANDIDATE_FRACTION, max_per_query: int | None = None
) -> Strategy:
    """Build the PCB strategy over the registered strategy ``base_name``.

    The base is looked up in the registry each time the strategy runs, so this factory can be used
    while the registry itself is being built.

    Args:
        base_name: a registered, non-PCB strategy name, e.g. ``"entropy"`` or ``"badge"``.
        candidate_fraction: share of the pool the base proposes (PCB uses 0.1). A greedy base such as
            BADGE costs O(fraction * N^2 * D), so large pools may want less.
        max_per_query: cap the candidates at this many per queried sample (greedy bases on large
            pools: BADGE over 10% of 100k candidates took 9 minutes on 2 CPU cores).
    Raises:
        ConfigError: ``base_name`` is a PCB strategy or ``candidate_fraction`` is not in (0, 1]
            (at build time), or ``base_name`` is not registered (at run time).
    """
    if base_name == "pcb" or base_name.startswith("pcb_"):
        raise ConfigError(
            f"PCB cannot wrap another PCB strategy ({base_name!r}); pick a base such as 'entropy'"
        )
    if not 0.0 < candidate_fraction <= 1.0:
        raise ConfigError(f"candidate_fraction is {candidate_fraction}; it must be in (0, 1]")

    def pcb(inp: SelectionInput, budget: int, rng: np.random.Generator) -> np.ndarray:
        # Imported here because the registry imports this module to register PCB itself.
        from dpal_core.strategies import get_strategy

        k = clamp_budget(budget, inp.n_pool)
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        base = get_strategy(base_name)
        candidates = np.asarray(
            base(inp, candidate_count(inp.n_pool, k, candidate_fraction, max_per_query), rng), dtype=np.int64
        )
        return class_balanced_pick(candidates, inp.predicted[candidates], inp.labeled_counts, k)

    pcb.__name__ = f"pcb_{base_name}"
    pcb.__qualname__ = pcb.__name__
    pcb.__doc__ = (
        f"PCB class balancing over the top {candidate_fraction:.0%} candidates of {base_name!r}.\n\n"
        "Returns:\n    [min(budget, N)] int64 indices in pick order."
    )
    return pcb
