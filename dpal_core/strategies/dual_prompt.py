"""DPAL's own selection: most-doubted samples of the least-labelled predicted classes first.

The uncertainty is ``u = 1 - p_clean``, the model's own probability that its predicted label is
wrong (the negative prompt's verdict; see docs/method.md). Ranking by ``u`` alone would spend the
budget on the classes the model confuses most, which are often the already well-labelled ones, so
the budget is filled class-balanced over the *predicted* classes.
"""

from __future__ import annotations

import numpy as np

from dpal_core.strategies.base import SelectionInput, clamp_budget, class_balanced_pick, top_k


def dual_prompt_score(inp: SelectionInput) -> np.ndarray:
    """[N] u = 1 - p_clean, the probability that the predicted label is wrong."""
    return 1.0 - inp.p_clean


def dual_prompt(inp: SelectionInput, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Class-balanced pick of the most uncertain sample per predicted class. ``rng`` is unused.

    Repeatedly takes the predicted class with the fewest labels (``labeled_counts`` plus picks this
    round; ties go to the lower class index) that still has candidates, and picks its sample with the
    highest ``u``; ties in ``u`` go to the lower pool index. A class with no candidates left drops
    out, so the rest of the budget goes to the most uncertain samples of the remaining classes.

    Returns:
        [min(budget, N)] int64 indices in pick order.
    """
    k = clamp_budget(budget, inp.n_pool)
    # Rank on -p_clean, not 1 - p_clean: the subtraction would round tiny p_clean values to ties.
    order = top_k(-inp.p_clean, inp.n_pool)
    return class_balanced_pick(order, inp.predicted[order], inp.labeled_counts, k)
