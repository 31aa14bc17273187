"""Train one round's dual-prompt model and measure it on the test set.

``FitOptions`` holds the benchmark's method options that are not (yet) fields of
:class:`~dpal_core.config.TrainConfig` / :class:`~dpal_core.config.PromptConfig`; see
docs in benchmarks/results/animal-mnist/ABLATIONS.md for what each one did.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from dpal_core.backbone import Backbone
from dpal_core.bench.prepare import BenchData
from dpal_core.config import CrossfitConfig, PromptConfig, TrainConfig
from dpal_core.crossfit import train_crossfit
from dpal_core.metrics import accuracy, error_detection_auroc, expected_calibration_error
from dpal_core.model import DualPromptCLIP, ZeroShotCLIP, predict
from dpal_core.prompts import PromptContext, word_init_embeddings
from dpal_core.strategies import UNCERTAINTY_SIGNALS, SelectionInput, uncertainty_signal
from dpal_core.train import TrainData

# Strategies that rank by no per-sample score are judged, for error detection, by the score closest
# to what they use: PCB filters on entropy; the others fall back to the classifier's max softmax.
SIGNAL_FALLBACK = {"pcb": "entropy"}
DEFAULT_SIGNAL = "least_confidence"


@dataclass(frozen=True)
class FitOptions:
    """Benchmark-only training options (candidates for TrainConfig/PromptConfig), and cross-fitting."""

    crossfit: CrossfitConfig = CrossfitConfig()  # P- refined on real mistakes (dpal_core.crossfit)
    neg_class_specific: bool = False  # one negative context per class (P+ keeps PromptConfig's choice)
    balance_classes: bool = False  # repeat labelled samples of rare classes so every class counts equally

    def __post_init__(self) -> None:
        if isinstance(self.crossfit, dict):  # from a results file or config_with(fit={...})
            object.__setattr__(self, "crossfit", CrossfitConfig(**self.crossfit))


def signal_name(strategy: str) -> str:
    """The per-sample uncertainty used to score ``strategy``'s error detection."""
    if strategy in UNCERTAINTY_SIGNALS:
        return strategy
    return SIGNAL_FALLBACK.get(strategy, DEFAULT_SIGNAL)


def fit_round(
    backbone: Backbone,
    data: BenchData,
    labeled: np.ndarray,
    prompt: PromptConfig,
    train_config: TrainConfig,
    options: FitOptions,
    seed: int,
    previous: DualPromptCLIP | None = None,
) -> DualPromptCLIP:
    """A dual-prompt model trained on the pool samples ``labeled`` (fresh, or ``previous`` continued).

    With cross-fitting on, the rest of the pool (unlabelled) feeds its pool term.
    """
    torch.manual_seed(seed)  # the prompt initialisation
    if previous is not None:
        model = previous
    else:
        model = DualPromptCLIP(backbone, data.class_names, prompt)
        if options.neg_class_specific and not prompt.class_specific:
            words = word_init_embeddings(model.clip, backbone.tokenizer, prompt.init_words)
            width = model.prompt_neg.ctx.shape[-1]
            model.prompt_neg = PromptContext(
                model.n_classes, width, replace(prompt, class_specific=True), words
            )
    config = replace(train_config, seed=seed, progress=False)
    once = _train_data(model, data, labeled)
    train_data = (
        _train_data(model, data, balanced(labeled, data.pool_labels, seed))
        if options.balance_classes
        else once
    )
    unlabeled = np.setdiff1d(np.arange(len(data.pool_labels)), labeled)
    train_crossfit(model, once, config, options.crossfit, train_data, pool=data.pool_features[unlabeled])
    return model


def _train_data(model: DualPromptCLIP, data: BenchData, idx: np.ndarray) -> TrainData:
    labels = torch.as_tensor(data.pool_labels[idx])
    if model.needs_pixels:
        return TrainData(labels, pixel_values=data.pool_pixels[torch.as_tensor(idx)])
    return TrainData(labels, features=data.pool_features[torch.as_tensor(idx)])


def balanced(labeled: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """``labeled`` with samples of under-represented classes repeated up to the largest class's count.

    Equivalent to class-weighted cross-entropy, without touching the loss. Each class's samples are
    repeated whole, then a seeded random remainder is added.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[labeled], return_counts=True)
    target = counts.max()
    out = []
    for c in classes:
        members = labeled[labels[labeled] == c]
        reps, extra = divmod(int(target), len(members))
        out.append(np.concatenate([np.tile(members, reps), rng.choice(members, extra, replace=False)]))
    return np.concatenate(out)


def evaluate(
    model: DualPromptCLIP | ZeroShotCLIP,
    data: BenchData,
    strategy: str | None = None,
    features: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Test accuracy, error-detection AUROC of p_clean / max softmax / -entropy, and ECE.

    With ``strategy``, also ``auroc_signal``: the AUROC of that strategy's own uncertainty (see
    :func:`signal_name`) as a detector of the model's errors.
    """
    if isinstance(model, DualPromptCLIP) and model.needs_pixels:
        pred = predict(model, pixel_values=data.test_pixels)
    else:
        pred = predict(model, features=data.test_features if features is None else features)
    yhat, probs, p_clean = pred.pred.numpy(), pred.probs.numpy().astype(np.float64), pred.p_clean.numpy()
    correct = yhat == data.test_labels
    msp = probs.max(axis=1)
    neg_entropy = (probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
    out: dict[str, Any] = {
        "accuracy": accuracy(yhat, data.test_labels),
        "auroc_p_clean": error_detection_auroc(p_clean, correct),
        "auroc_max_softmax": error_detection_auroc(msp, correct),
        "auroc_neg_entropy": error_detection_auroc(neg_entropy, correct),
        "ece_p_clean": expected_calibration_error(p_clean, correct),
        "ece_max_softmax": expected_calibration_error(msp, correct),
    }
    if strategy is not None:
        inp = SelectionInput(
            probs=probs / probs.sum(axis=1, keepdims=True),
            p_clean=np.clip(p_clean, 0.0, 1.0),
            embeddings=data.test_features.numpy(),
            labeled_embeddings=np.zeros((0, data.test_features.shape[1]), dtype=np.float32),
            labeled_counts=np.zeros(probs.shape[1], dtype=np.int64),
        )
        name = signal_name(strategy)
        out["signal"] = name
        out["auroc_signal"] = error_detection_auroc(-uncertainty_signal(name, inp), correct)
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in out.items()}
