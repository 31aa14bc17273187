"""Selection strategies on hand-built pools whose answers are known, asserting exact pick orders."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from dpal_core.errors import ConfigError
from dpal_core.strategies import (
    STRATEGIES,
    SelectionInput,
    get_strategy,
    make_pcb,
    select,
    strategy_names,
    uncertainty_signal,
)
from dpal_core.strategies.base import class_balanced_pick
from dpal_core.strategies.pcb import candidate_count

ALL = strategy_names()


def make_input(
    probs: np.ndarray,
    p_clean: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    labeled_embeddings: np.ndarray | None = None,
    labeled_counts: np.ndarray | None = None,
) -> SelectionInput:
    """A SelectionInput with harmless defaults for the fields a test does not care about."""
    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    rng = np.random.default_rng(123)
    if embeddings is None:
        embeddings = rng.normal(size=(n, 4)).astype(np.float32)
    return SelectionInput(
        probs=probs,
        p_clean=np.full(n, 0.5) if p_clean is None else np.asarray(p_clean, dtype=np.float64),
        embeddings=embeddings,
        labeled_embeddings=np.zeros((0, embeddings.shape[1]), np.float32)
        if labeled_embeddings is None
        else labeled_embeddings,
        labeled_counts=np.zeros(c, np.int64) if labeled_counts is None else np.asarray(labeled_counts),
    )


def random_input(n: int, c: int = 4, d: int = 8, labelled: int = 3, seed: int = 0) -> SelectionInput:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    emb = rng.normal(size=(n + labelled, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return SelectionInput(probs, rng.random(n), emb[:n], emb[n:], rng.integers(0, 3, size=c))


def one_hotish(classes: list[int], c: int, top: float = 0.7) -> np.ndarray:
    """[N, c] rows with ``top`` on the given class and the rest spread evenly."""
    probs = np.full((len(classes), c), (1.0 - top) / (c - 1))
    probs[np.arange(len(classes)), classes] = top
    return probs


# Rows chosen so entropy, margin and least confidence all disagree. Rows 1 and 5 are permutations
# of each other (equal entropy), so they must tie-break by index.
PROBS = np.array(
    [
        [1.0, 0.0, 0.0],  # H=0        gap=1     max=1
        [0.5, 0.5, 0.0],  # H=ln2      gap=0     max=.5
        [1 / 3, 1 / 3, 1 / 3],  # H=ln3  gap=0     max=1/3
        [0.8, 0.1, 0.1],  # H=0.639    gap=.7    max=.8
        [0.5, 0.25, 0.25],  # H=1.040  gap=.25   max=.5
        [0.0, 0.5, 0.5],  # H=ln2      gap=0     max=.5
    ]
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("entropy", [2, 4, 1, 5, 3, 0]),
        ("margin", [1, 2, 5, 4, 3, 0]),
        ("least_confidence", [2, 1, 4, 5, 3, 0]),
    ],
)
def test_uncertainty_orders(name: str, expected: list[int]) -> None:
    picks = select(name, make_input(PROBS), 6, np.random.default_rng(0))
    assert picks.tolist() == expected
    assert picks.dtype == np.int64
    assert select(name, make_input(PROBS), 2, np.random.default_rng(0)).tolist() == expected[:2]


def test_uncertainty_signals() -> None:
    inp = make_input(PROBS, p_clean=np.linspace(0.0, 1.0, 6))
    np.testing.assert_allclose(uncertainty_signal("dual_prompt", inp), 1.0 - np.linspace(0.0, 1.0, 6))
    ln2, ln3 = np.log(2), np.log(3)
    entropy = [0, ln2, ln3, -(0.8 * np.log(0.8) + 0.2 * np.log(0.1)), 0.5 * ln2 + 0.5 * np.log(4), ln2]
    np.testing.assert_allclose(uncertainty_signal("entropy", inp), entropy)
    np.testing.assert_allclose(uncertainty_signal("margin", inp), [0, 1, 1, 0.3, 0.75, 1], atol=1e-12)
    np.testing.assert_allclose(uncertainty_signal("least_confidence", inp), [0, 0.5, 2 / 3, 0.2, 0.5, 0.5])
    for name in ("random", "coreset", "badge", "pcb", "pcb_badge"):
        with pytest.raises(ConfigError, match="no per-sample uncertainty"):
            uncertainty_signal(name, inp)


def test_random_is_a_seeded_permutation() -> None:
    inp = make_input(PROBS)
    picks = select("random", inp, 4, np.random.default_rng(7))
    assert picks.tolist() == np.random.default_rng(7).permutation(6)[:4].tolist()


def test_dual_prompt_class_balanced_order() -> None:
    # Predicted classes 0..2; class 3 has the fewest labels but no predicted samples, so it is skipped.
    classes = [0, 0, 1, 1, 2, 2, 0, 1]
    p_clean = [0.9, 0.2, 0.5, 0.1, 0.3, 0.3, 0.6, 0.95]  # 4 and 5 tie: lower index first
    inp = make_input(one_hotish(classes, 4), p_clean=p_clean, labeled_counts=[0, 2, 1, 0])
    # counts [0,2,1]: c0->1; [1,2,1]: c0->6 (tie with c2, lower class); [2,2,1]: c2->4;
    # [2,2,2]: c0->0 (c0 now empty); [-,2,2]: c1->3; [-,3,2]: c2->5 (c2 empty); then c1: 2, 7.
    assert select("dual_prompt", inp, 8, np.random.default_rng(0)).tolist() == [1, 6, 4, 0, 3, 5, 2, 7]
    assert select("dual_prompt", inp, 3, np.random.default_rng(0)).tolist() == [1, 6, 4]


def test_dual_prompt_ignores_rng_and_ranks_tiny_p_clean_exactly() -> None:
    # 1 - 1e-20 and 1 - 2e-20 both round to 1.0; ranking must still prefer the smaller p_clean.
    inp = make_input(one_hotish([0, 0], 2), p_clean=[2e-20, 1e-20])
    assert select("dual_prompt", inp, 2, np.random.default_rng(0)).tolist() == [1, 0]
    assert select("dual_prompt", inp, 2, np.random.default_rng(99)).tolist() == [1, 0]


def test_class_balanced_pick_stops_when_candidates_run_out() -> None:
    picks = class_balanced_pick(np.array([5, 3, 9]), np.array([1, 1, 0]), np.array([4, 0]), budget=10)
    assert picks.tolist() == [5, 3, 9]


LINE = np.array([[0, 0], [1, 0], [4, 0], [7, 0], [10, 0]], dtype=np.float32)


def test_coreset_farthest_first_from_labelled() -> None:
    inp = make_input(np.full((5, 2), 0.5), embeddings=LINE, labeled_embeddings=np.zeros((1, 2), np.float32))
    # Squared distances to the labelled 0: 10 is farthest; then 4 (16 from 0, vs 7 at 9 from 10),
    # then 7, then 1, and last the pool copy of the labelled point.
    assert select("coreset", inp, 5, np.random.default_rng(0)).tolist() == [4, 2, 3, 1, 0]


def test_coreset_without_labels_starts_at_rng_point() -> None:
    inp = make_input(np.full((5, 2), 0.5), embeddings=LINE)
    assert int(np.random.default_rng(1).integers(5)) == 2
    assert select("coreset", inp, 5, np.random.default_rng(1)).tolist() == [2, 4, 0, 3, 1]


def badge_reference(inp: SelectionInput, k: int, rng: np.random.Generator) -> list[int]:
    """BADGE with the [N, C*D] gradient embeddings built explicitly, same draw protocol."""
    yhat = inp.probs.argmax(axis=1)
    a = np.eye(inp.n_classes)[yhat] - inp.probs
    g = np.einsum("nc,nd->ncd", a, inp.embeddings.astype(np.float64)).reshape(inp.n_pool, -1)
    picks = [int(np.argmax((g**2).sum(axis=1)))]
    while len(picks) < k:
        d2 = (((g[:, None, :] - g[None, picks, :]) ** 2).sum(axis=2)).min(axis=1)
        d2[picks] = 0.0
        cum = np.cumsum(d2)
        picks.append(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")))
    return picks


def test_badge_first_pick_is_largest_gradient_norm() -> None:
    # |g|^2 = 2 (1 - q)^2 |v|^2 for two classes: row 2 (q=.6, |v|=2) beats the most uncertain row 0.
    q = np.array([0.55, 0.9, 0.6, 0.7])
    emb = np.array([[1, 0], [0, 1], [0, 2], [-1, 0]], dtype=np.float32)
    inp = make_input(np.stack([q, 1 - q], axis=1), embeddings=emb)
    for seed in range(3):
        picks = select("badge", inp, 4, np.random.default_rng(seed))
        assert picks[0] == 2
        assert sorted(picks.tolist()) == [0, 1, 2, 3]


def test_badge_matches_explicit_gradient_embeddings() -> None:
    inp = random_input(30, c=3, d=5, seed=4)
    expected = badge_reference(inp, 12, np.random.default_rng(5))
    assert select("badge", inp, 12, np.random.default_rng(5)).tolist() == expected


@pytest.mark.parametrize("name", ["coreset", "badge"])
def test_diversity_handles_duplicate_points(name: str) -> None:
    inp = make_input(np.full((6, 2), 0.5) + [0.1, -0.1], embeddings=np.ones((6, 3), np.float32))
    picks = select(name, inp, 6, np.random.default_rng(0))
    assert sorted(picks.tolist()) == list(range(6))


def pcb_pool() -> SelectionInput:
    # Rows 0..5 are the 6 most uncertain of 60 (entropy falls as q rises), i.e. the 10% candidates.
    q = [0.40, 0.42, 0.44, 0.46, 0.48, 0.50] + [0.9] * 54
    classes = [0, 0, 0, 1, 1, 2] + [2] * 54
    probs = np.vstack([one_hotish([c], 3, top=t) for c, t in zip(classes, q, strict=True)])
    return make_input(probs, labeled_counts=[1, 0, 0])


def test_pcb_balances_entropy_candidates() -> None:
    inp = pcb_pool()
    assert select("entropy", inp, 4, np.random.default_rng(0)).tolist() == [0, 1, 2, 3]
    # [1,0,0]: c1->3; [1,1,0]: c2->5 (its only candidate); [1,1,1]: c0->0; [2,1,-]: c1->4; then c0->1.
    # Class-2 rows 6.. are never taken: they are not among the candidates.
    assert select("pcb", inp, 5, np.random.default_rng(0)).tolist() == [3, 5, 0, 4, 1]


def test_pcb_with_budget_over_ten_percent_keeps_base_set() -> None:
    inp = pcb_pool()
    picks = select("pcb", inp, 20, np.random.default_rng(0))
    assert set(picks.tolist()) == set(select("entropy", inp, 20, np.random.default_rng(0)).tolist())


def test_pcb_badge_is_class_balanced_badge_candidates() -> None:
    inp = random_input(200, c=4, seed=2)
    cands = select("badge", inp, candidate_count(200, 5), np.random.default_rng(3))
    expected = class_balanced_pick(cands, inp.predicted[cands], inp.labeled_counts, 5)
    assert select("pcb_badge", inp, 5, np.random.default_rng(3)).tolist() == expected.tolist()


def test_make_pcb_refuses_pcb_base_and_unknown_base() -> None:
    with pytest.raises(ConfigError, match="cannot wrap"):
        make_pcb("pcb_badge")
    with pytest.raises(ConfigError, match="unknown selection strategy 'nope'"):
        make_pcb("nope")(random_input(20), 2, np.random.default_rng(0))


def test_registry_names_and_unknown_name() -> None:
    assert ALL == [
        "dual_prompt", "random", "entropy", "margin", "least_confidence", "coreset", "badge", "pcb", "pcb_badge"
    ]  # fmt: skip
    assert get_strategy("entropy") is STRATEGIES["entropy"]
    with pytest.raises(
        ConfigError, match="unknown selection strategy 'bald'; available: dual_prompt, random"
    ):
        select("bald", random_input(5), 1, np.random.default_rng(0))


@pytest.mark.parametrize("name", ALL)
def test_contract_budget_over_pool_zero_and_seeded(name: str) -> None:
    inp = random_input(15)
    picks = select(name, inp, 40, np.random.default_rng(0))
    assert picks.dtype == np.int64 and sorted(picks.tolist()) == list(range(15))
    assert select(name, inp, 0, np.random.default_rng(0)).shape == (0,)
    again = select(name, inp, 6, np.random.default_rng(1)).tolist()
    assert again == select(name, inp, 6, np.random.default_rng(1)).tolist()
    assert len(set(again)) == 6
    empty = random_input(0)
    assert select(name, empty, 5, np.random.default_rng(0)).shape == (0,)


@pytest.mark.parametrize("budget", [-1, 2.5, True, "3"])
def test_bad_budget(budget: object) -> None:
    with pytest.raises(ConfigError, match="budget"):
        select("entropy", random_input(5), budget, np.random.default_rng(0))  # type: ignore[arg-type]


def _fields(**changes: object) -> dict[str, object]:
    good = random_input(6, c=3, d=4)
    fields = {
        k: getattr(good, k)
        for k in ("probs", "p_clean", "embeddings", "labeled_embeddings", "labeled_counts")
    }
    fields.update(changes)
    return fields


NAN_PROBS = np.full((6, 3), 1 / 3)
NAN_PROBS[2, 1] = np.nan
NAN_EMB = np.ones((6, 4), np.float32)
NAN_EMB[5, 0] = np.nan


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"probs": np.full(6, 0.5)}, "probs has 1 dimension"),
        ({"probs": np.ones((6, 1))}, "at least 2 classes"),
        ({"probs": NAN_PROBS}, "probs contains NaN"),
        ({"probs": np.full((6, 3), 2.0)}, "outside"),
        ({"probs": np.full((6, 3), 0.2)}, "do not sum to 1"),
        ({"p_clean": np.full(5, 0.5)}, r"p_clean has shape \(5,\), expected \(6,\)"),
        ({"p_clean": np.array([0.5] * 5 + [np.inf])}, "p_clean contains NaN or infinite"),
        ({"p_clean": np.full(6, 1.5)}, "p_clean has values outside"),
        ({"embeddings": np.ones((5, 4), np.float32)}, r"embeddings has shape \(5, 4\)"),
        ({"embeddings": NAN_EMB}, "embeddings contains NaN"),
        ({"labeled_embeddings": np.ones((2, 3), np.float32)}, r"expected \(L, 4\)"),
        ({"labeled_counts": np.zeros(4, int)}, r"labeled_counts has shape \(4,\)"),
        ({"labeled_counts": np.array([1, -1, 0])}, "non-negative whole numbers"),
    ],
)
def test_invalid_inputs(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SelectionInput(**_fields(**changes))  # type: ignore[arg-type]


def test_empty_labeled_embeddings_of_any_shape_are_accepted() -> None:
    inp = SelectionInput(**_fields(labeled_embeddings=np.empty(0)))  # type: ignore[arg-type]
    assert inp.labeled_embeddings.shape == (0, 4)


@pytest.mark.parametrize("name", ["coreset", "badge"])
def test_diversity_memory_stays_linear(name: str) -> None:
    # An N x N float64 distance matrix here would be 3.2 GB; the budget below allows O(N * D) only.
    rng = np.random.default_rng(0)
    n, c, d = 20_000, 10, 64
    logits = rng.normal(size=(n, c))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    emb = rng.normal(size=(n + 500, d)).astype(np.float32)
    inp = SelectionInput(probs, rng.random(n), emb[:n], emb[n:], np.zeros(c, np.int64))
    tracemalloc.start()
    try:
        picks = select(name, inp, 30, np.random.default_rng(0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(np.unique(picks)) == 30
    assert peak < 200 * 2**20
