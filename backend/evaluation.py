"""Evaluate a new version before publishing it (step 4 of the retrain job).

Few annotations (< ``kfold_below``): stratified k-fold; each fold trains a fresh model on the other
folds and predicts its own, giving out-of-fold predictions for every annotation. The published
model is then trained on all annotations, and the figures estimate that procedure.
Many annotations: one stratified held-out split; the published model is the one trained on the
rest, so the figures describe exactly the model that is served.

Figures: accuracy, the AUROC of ``p_clean`` for telling right from wrong predictions, the expected
calibration error of ``p_clean``, and zero-shot CLIP's accuracy on the same items as a reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from backend.training_defaults import JobOptions
from dpal_core.metrics import accuracy, error_detection_auroc, expected_calibration_error


@dataclass(frozen=True)
class EvalPlan:
    method: str  # "kfold", "holdout" or "none"
    folds: list[np.ndarray]  # held-out indices: one array per fold (holdout: one; none: empty)

    @property
    def name(self) -> str:
        return f"{len(self.folds)}-fold" if self.method == "kfold" else self.method

    def train_indices(self, n: int, fold: int = 0) -> np.ndarray:
        """Indices trained on when ``fold`` is held out (everything for ``none``)."""
        if not self.folds:
            return np.arange(n)
        mask = np.ones(n, dtype=bool)
        mask[self.folds[fold]] = False
        return np.flatnonzero(mask)


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Split indices into ``k`` folds with each class spread evenly over them."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    order = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        order.extend(rng.permutation(idx).tolist())
    folds: list[list[int]] = [[] for _ in range(k)]
    for pos, i in enumerate(order):
        folds[pos % k].append(i)
    return [np.array(sorted(f), dtype=np.int64) for f in folds if f]


def plan_evaluation(labels: Sequence[int], options: JobOptions, seed: int = 0) -> EvalPlan:
    n = len(labels)
    if n < options.min_eval_labels:
        return EvalPlan("none", [])
    labels = np.asarray(labels)
    if n < options.kfold_below:
        return EvalPlan("kfold", stratified_folds(labels, min(options.eval_folds, n), seed))
    k = max(2, round(1.0 / options.holdout_fraction))
    return EvalPlan("holdout", [stratified_folds(labels, k, seed)[0]])


def out_of_fold(
    plan: EvalPlan, n: int, fit_predict: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``fit_predict(train_idx, eval_idx) -> (pred, p_clean)`` for every fold of a k-fold plan.

    Returns:
        (eval indices [M], predictions [M], p_clean [M]) over all folds.
    """
    idx, preds, cleans = [], [], []
    for f, held in enumerate(plan.folds):
        pred, clean = fit_predict(plan.train_indices(n, f), held)
        idx.append(held)
        preds.append(np.asarray(pred))
        cleans.append(np.asarray(clean, dtype=np.float64))
    if not idx:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0)
    return np.concatenate(idx), np.concatenate(preds), np.concatenate(cleans)


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def compute_metrics(
    pred: np.ndarray, p_clean: np.ndarray, labels: np.ndarray, zero_shot_pred: np.ndarray | None = None
) -> dict[str, float | int | None]:
    """Accuracy, error-detection AUROC and ECE of ``p_clean`` on held-out items (NaN -> None)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    correct = pred == labels
    out = {
        "n_eval": int(len(labels)),
        "accuracy": _finite(accuracy(pred, labels)),
        "error_auroc": _finite(error_detection_auroc(p_clean, correct)),
        "ece": _finite(expected_calibration_error(p_clean, correct)),
    }
    if zero_shot_pred is not None:
        out["zero_shot_accuracy"] = _finite(accuracy(zero_shot_pred, labels))
    return out


def refusal_reason(new: dict, baseline: dict | None, baseline_name: str, options: JobOptions) -> str | None:
    """Why the new version must not be published, or None (rule in ``backend.training_defaults``)."""
    loss = new.get("final_loss")
    if loss is not None and not math.isfinite(loss):
        return f"training diverged (final loss {loss})"
    if baseline is None:
        return None
    acc, base = new.get("accuracy"), baseline.get("accuracy")
    n, n_base = new.get("n_eval") or 0, baseline.get("n_eval") or 0
    if acc is None or base is None or n < options.refuse_min_eval or n_base < options.refuse_min_eval:
        return None
    if acc < base - options.refuse_tolerance:
        return (
            f"held-out accuracy {acc:.3f} ({new.get('method')}, n={n}) is more than "
            f"{options.refuse_tolerance:.2f} below {baseline_name}'s {base:.3f} (n={n_base}); "
            "the served version is kept"
        )
    return None
