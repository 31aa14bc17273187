"""Cross-fitting: teach the negative prompt from real mistakes on held-out labels.

Trained on its own labels, the positive prompt classifies them all correctly, so the plain negative
loss never shows P- what a wrong *prediction* looks like (method.md's ``p_clean`` models exactly the
event "the predicted label is right"). Cross-fitting makes such examples from the labels we have:

1. split the labelled set into K folds; for each fold, train a positive prompt (and visual tuner)
   on the other folds and record its positive logits ``l+`` on the held-out fold;
2. train the model as usual on all labels (``L_cls + lambda L_neg``);
3. refine P- on the out-of-fold predictions: ``p_yes`` of each held-out prediction ``y_hat``,
   ``sigmoid(l+_oof[y_hat] - l-_yhat(v))``, is fitted to whether ``y_hat`` was right (binary
   cross-entropy), together with the usual negative loss on the in-sample labels.

Only P- changes in step 3, so predictions (and accuracy) are exactly those of plain training.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch.nn import functional as F

from dpal_core.checkpoint import learned_state
from dpal_core.config import TrainConfig
from dpal_core.losses import wrong_classes
from dpal_core.model import DualPromptCLIP
from dpal_core.prompts import encode_prompts
from dpal_core.train import TrainData, TrainReport, train


def _inputs(model: DualPromptCLIP, data: TrainData) -> dict[str, torch.Tensor]:
    return {"pixel_values": data.pixel_values} if model.needs_pixels else {"features": data.features}


def _optimizer(params: list[torch.nn.Parameter], config: TrainConfig, steps: int):
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


def _positive_logits(model: DualPromptCLIP, v: torch.Tensor) -> torch.Tensor:
    """l+ [B, C] for visual features ``v`` [B, D]; runs the text encoder on the C positive prompts only."""
    t_pos = encode_prompts(model.clip, model.tokens, model.prompt_pos.expand(model.n_classes))  # [C, D]
    return model.clip.logit_scale.exp().float() * v @ t_pos.t()


def _negative_logits(model: DualPromptCLIP, v: torch.Tensor) -> torch.Tensor:
    """l- [B, C] for fixed visual features ``v`` [B, D]; the C negative prompts only."""
    t_neg = encode_prompts(model.clip, model.tokens, model.prompt_neg.expand(model.n_classes))  # [C, D]
    return model.clip.logit_scale.exp().float() * v.detach() @ t_neg.t()


def out_of_fold_logits(
    model: DualPromptCLIP, data: TrainData, config: TrainConfig, folds: int, steps: int
) -> torch.Tensor:
    """[N, C] positive logits of every labelled sample from a classifier that never saw it.

    Each fold's classifier starts from ``model``'s current (initial) prompts and trains P+ and the
    visual tuner with ``L_cls`` for ``steps`` full-batch steps; ``model`` is restored afterwards.
    """
    start = {k: v.clone() for k, v in learned_state(model).items()}
    n = len(data.labels)
    gen = torch.Generator().manual_seed(config.seed + 7919)
    fold = torch.empty(n, dtype=torch.long)
    fold[torch.randperm(n, generator=gen)] = torch.arange(n) % folds
    oof = torch.zeros(n, model.n_classes)
    inputs = _inputs(model, data)
    params = list(model.prompt_pos.parameters()) + list(model.visual.parameters())
    model.train()
    try:
        for k in range(folds):
            model.load_state_dict(start, strict=False)
            fit, held = (fold != k).nonzero().flatten(), (fold == k).nonzero().flatten()
            if len(fit) == 0 or len(held) == 0:
                continue
            x_fit = {key: x[fit] for key, x in inputs.items()}
            opt, sched = _optimizer(params, config, steps)
            for _ in range(steps):
                loss = F.cross_entropy(_positive_logits(model, model.visual_features(**x_fit)), data.labels[fit])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            with torch.no_grad():
                x_held = {key: x[held] for key, x in inputs.items()}
                oof[held] = _positive_logits(model, model.visual_features(**x_held)).float()
    finally:
        model.load_state_dict(start, strict=False)
        model.eval()
    return oof


def refine_negative(
    model: DualPromptCLIP, data: TrainData, oof_logits: torch.Tensor, config: TrainConfig, steps: int
) -> float:
    """Fit P- so that ``p_yes`` at each out-of-fold prediction says whether it was right.

    Loss: ``BCE(sigmoid(l+_oof[y_hat] - l-_yhat), [y_hat == y]) + L_neg`` (the in-sample negative
    loss with the configured wrong class keeps P- sensible for classes the folds never predicted).
    Returns the fraction of out-of-fold predictions that were right.
    """
    with torch.no_grad():
        v = model.visual_features(**_inputs(model, data))  # [N, D], fixed: P- never changes h
        l_pos = _positive_logits(model, v)  # [N, C] in-sample, for the usual negative loss
    y = data.labels
    y_hat = oof_logits.argmax(dim=1)
    right = (y_hat == y).float()
    lp_hat = oof_logits.gather(1, y_hat[:, None]).squeeze(1)  # [N]
    gen = torch.Generator().manual_seed(config.seed + 104729)
    opt, sched = _optimizer(list(model.prompt_neg.parameters()), config, steps)
    model.train()
    for _ in range(steps):
        l_neg = _negative_logits(model, v)  # [N, C]
        held_out = F.binary_cross_entropy_with_logits(lp_hat - l_neg.gather(1, y_hat[:, None]).squeeze(1), right)
        wrong = wrong_classes(l_pos, y, config.wrong_class, gen)
        diff = l_pos - l_neg
        in_sample = (
            -F.logsigmoid(diff.gather(1, y[:, None])) - F.logsigmoid(-diff.gather(1, wrong[:, None]))
        ).mean()
        loss = held_out + config.neg_weight * in_sample
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(right.mean())


def train_crossfit(
    model: DualPromptCLIP,
    data: TrainData,
    config: TrainConfig = TrainConfig(),
    folds: int = 2,
    steps: int = 100,
    train_data: TrainData | None = None,
) -> TrainReport:
    """Plain training on all labels, then P- refined on ``folds``-fold out-of-fold predictions.

    Args:
        model: freshly initialised (or warm-started) model; trained in place.
        data: the labelled samples, each once (folds must not share a sample).
        folds: K >= 2.
        steps: full-batch steps of each fold classifier and of the P- refinement.
        train_data: what the plain training sees instead of ``data`` (e.g. class-balanced by
            repeating samples).
    Returns:
        The plain training's report.
    """
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    fold_config = replace(config, progress=False)
    oof = out_of_fold_logits(model, data, fold_config, folds, steps)
    report = train(model, train_data if train_data is not None else data, config)
    refine_negative(model, data, oof, fold_config, steps)
    return report
