"""Cross-fitting: teach the negative prompt from real mistakes, on held-out labels and on the pool.

Trained on its own labels, the positive prompt classifies them all correctly, so the plain negative
loss never shows P- what a wrong *prediction* looks like (method.md's ``p_clean`` models exactly the
event "the predicted label is right"). Cross-fitting makes such examples from the labels we have:

1. split the labelled set into K folds; for each fold, train a positive prompt (and visual tuner)
   on the other folds and record its positive logits ``l+`` on the held-out fold, and its
   prediction on a sample of unlabelled pool images;
2. train the model as usual on all labels (``L_cls + lambda L_neg``);
3. refine P- so that ``p_yes`` at a prediction says whether it is right:
   - held-out labels: ``sigmoid(l+_oof[y_hat] - l-_yhat(v))`` fitted to ``[y_hat == y]``;
   - pool images: ``sigmoid(l+[y_hat] - l-_yhat(v))`` of the trained model fitted to the share of
     the K fold models that predict the same ``y_hat`` (their disagreement is how often a model
     trained on slightly other labels would decide otherwise: a label-free error estimate, and
     there are thousands of pool images against a few dozen labels);
   - the usual in-sample negative loss, which keeps P- sensible for classes the folds never predict.

Only P- changes in step 3, so predictions (and accuracy) are exactly those of plain training.
The pool term needs cached embeddings, so the ``vpt`` paradigm uses the labelled terms only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from dpal_core.checkpoint import learned_state
from dpal_core.config import CrossfitConfig, TrainConfig
from dpal_core.losses import anchor_loss, negative_loss, wrong_classes
from dpal_core.model import DualPromptCLIP, check_features
from dpal_core.prompts import encode_prompts
from dpal_core.train import TrainData, TrainReport, make_optimizer, train


@dataclass(frozen=True)
class OutOfFold:
    """What the fold classifiers saw of samples they were not trained on."""

    logits: torch.Tensor  # [R, C] out-of-fold l+, one row per (split, labelled sample)
    rows: torch.Tensor  # [R] labelled-sample index of each row
    pool_preds: torch.Tensor | None  # [F, U] class predicted by each fold model for each pool image


def _on(data: TrainData, device: torch.device) -> TrainData:
    """``data`` on ``device`` (the fold models and the refinement run outside Accelerate)."""
    move = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return TrainData(data.labels.to(device), move(data.features), move(data.pixel_values))


def _inputs(model: DualPromptCLIP, data: TrainData) -> dict[str, torch.Tensor]:
    return {"pixel_values": data.pixel_values} if model.needs_pixels else {"features": data.features}


def _text(model: DualPromptCLIP, prompt: torch.nn.Module) -> torch.Tensor:
    """[C, D] text features of ``prompt`` (P+ or P-) over every class: C prompts, not 2C."""
    return encode_prompts(model.clip, model.tokens, prompt.expand(model.n_classes))


def _positive_logits(model: DualPromptCLIP, v: torch.Tensor) -> torch.Tensor:
    """l+ [B, C] for visual features ``v`` [B, D]."""
    return model.clip.logit_scale.exp().float() * v @ _text(model, model.prompt_pos).t()


def out_of_fold_logits(
    model: DualPromptCLIP,
    data: TrainData,
    config: TrainConfig,
    folds: int,
    steps: int,
    repeats: int = 1,
    pool: torch.Tensor | None = None,
) -> OutOfFold:
    """Positive logits of labelled samples from classifiers that never saw them.

    Each fold's classifier starts from ``model``'s current (initial) prompts and trains P+ and the
    visual tuner with ``L_cls`` for ``steps`` full-batch steps; ``model`` is restored afterwards.
    ``repeats`` > 1 repeats the whole K-fold split with other fold assignments.

    Args:
        pool: [U, D] cached embeddings of unlabelled images; each fold model's predictions on them
            are returned too (not for ``vpt``, which needs pixels).
    """
    start = {k: v.clone() for k, v in learned_state(model).items()}
    n = len(data.labels)
    gen = torch.Generator().manual_seed(config.seed + 7919)
    inputs = _inputs(model, data)
    params = list(model.prompt_pos.parameters()) + list(model.visual.parameters())
    logits, rows, pool_preds = [], [], []
    model.train()
    try:
        for _ in range(repeats):
            fold = torch.empty(n, dtype=torch.long)
            fold[torch.randperm(n, generator=gen)] = torch.arange(n) % folds
            fold = fold.to(data.labels.device)
            for k in range(folds):
                fit, held = (fold != k).nonzero().flatten(), (fold == k).nonzero().flatten()
                if len(fit) == 0 or len(held) == 0:
                    continue  # fewer samples than folds: this fold has nothing to fit on or to score
                model.load_state_dict(start, strict=False)
                x_fit = {key: x[fit] for key, x in inputs.items()}
                opt, sched = make_optimizer(params, config, steps)
                for _ in range(steps):
                    v = model.visual_features(**x_fit)
                    t_pos = _text(model, model.prompt_pos)  # [C, D]
                    l_pos = model.clip.logit_scale.exp().float() * v @ t_pos.t()  # [B, C]
                    loss = F.cross_entropy(l_pos, data.labels[fit])
                    if config.anchor_weight > 0:  # fold models train like the final one
                        loss = loss + config.anchor_weight * anchor_loss(t_pos, model.zero_shot_text)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                with torch.no_grad():
                    x_held = {key: x[held] for key, x in inputs.items()}
                    logits.append(_positive_logits(model, model.visual_features(**x_held)).float())
                    rows.append(held)
                    if pool is not None:
                        pool_preds.append(_positive_logits(model, model.visual_features(pool)).argmax(1))
    finally:
        model.load_state_dict(start, strict=False)
        model.zero_grad(set_to_none=True)
        model.eval()
    return OutOfFold(
        torch.cat(logits) if logits else torch.empty(0, model.n_classes, device=data.labels.device),
        torch.cat(rows) if rows else torch.empty(0, dtype=torch.long, device=data.labels.device),
        torch.stack(pool_preds) if pool_preds else None,
    )


def refine_negative(
    model: DualPromptCLIP,
    data: TrainData,
    oof: OutOfFold,
    config: TrainConfig,
    steps: int,
    pool: torch.Tensor | None = None,
    pool_weight: float = 0.0,
) -> float:
    """Fit P- so that ``p_yes`` at a prediction says whether it is right (module docstring, step 3).

    Loss: ``BCE(held-out) + pool_weight * BCE(pool agreement) + neg_weight * L_neg(in-sample)``.
    Returns the fraction of out-of-fold predictions that were right.
    """
    scale = model.clip.logit_scale.exp().float()
    with torch.no_grad():
        v = model.visual_features(**_inputs(model, data))  # [N, D], fixed: P- never changes h
        l_pos = _positive_logits(model, v)  # [N, C] in-sample, for the usual negative loss
        use_pool = pool is not None and oof.pool_preds is not None and pool_weight > 0
        if use_pool:
            v_pool = model.visual_features(pool)  # [U, D]
            l_pool = _positive_logits(model, v_pool)  # [U, C]
            y_pool = l_pool.argmax(1)
            agree = (oof.pool_preds == y_pool[None]).float().mean(0)  # [U] share of fold models agreeing
            lp_pool = l_pool.gather(1, y_pool[:, None]).squeeze(1)  # [U]
    y = data.labels
    v_oof = v[oof.rows]  # [R, D]
    y_hat = oof.logits.argmax(dim=1)  # [R]
    right = (y_hat == y[oof.rows]).float()
    lp_hat = oof.logits.gather(1, y_hat[:, None]).squeeze(1)  # [R]
    gen = torch.Generator().manual_seed(config.seed + 104729)
    opt, sched = make_optimizer(list(model.prompt_neg.parameters()), config, steps)
    model.train()
    for _ in range(steps):
        t_neg = _text(model, model.prompt_neg)  # [C, D]
        loss = torch.zeros((), device=v.device)
        if len(y_hat):
            l_neg_oof = scale * v_oof @ t_neg.t()  # [R, C]
            d_hat = lp_hat - l_neg_oof.gather(1, y_hat[:, None]).squeeze(1)
            loss = loss + F.binary_cross_entropy_with_logits(d_hat, right)
        if use_pool:
            d_pool = lp_pool - (scale * v_pool @ t_neg.t()).gather(1, y_pool[:, None]).squeeze(1)
            loss = loss + pool_weight * F.binary_cross_entropy_with_logits(d_pool, agree)
        diff = l_pos - scale * v @ t_neg.t()  # [N, C]
        wrong = wrong_classes(l_pos, y, config.wrong_class, gen)
        in_sample = negative_loss(diff, y, wrong)
        loss = loss + config.neg_weight * in_sample
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return float(right.mean()) if len(right) else float("nan")


def train_crossfit(
    model: DualPromptCLIP,
    data: TrainData,
    config: TrainConfig = TrainConfig(),
    crossfit: CrossfitConfig = CrossfitConfig(),
    train_data: TrainData | None = None,
    pool: torch.Tensor | None = None,
) -> TrainReport:
    """Plain training on all labels, then P- refined on out-of-fold predictions (module docstring).

    Args:
        model: freshly initialised (or warm-started) model; trained in place.
        data: the labelled samples, each once (folds must not share a sample).
        crossfit: folds, steps, repeats and the pool term; ``folds=0`` is plain :func:`train`.
        train_data: what the plain training sees instead of ``data`` (e.g. class-balanced by
            repeating samples).
        pool: [U, D] cached, normalised embeddings of unlabelled images; at most
            ``crossfit.pool_size`` of them (a seeded sample) are used. Ignored for ``vpt``.
    Returns:
        The plain training's report.
    """
    if not crossfit.enabled:
        return train(model, train_data if train_data is not None else data, config)
    if pool is not None and (model.needs_pixels or crossfit.pool_weight == 0 or crossfit.pool_size == 0):
        pool = None
    if pool is not None:
        check_features(pool, model.embed_dim)
        if len(pool) > crossfit.pool_size:
            gen = torch.Generator().manual_seed(config.seed + 31337)
            pool = pool[torch.randperm(len(pool), generator=gen)[: crossfit.pool_size]]
        pool = pool.to(model.clip.logit_scale.device).float()
        if len(pool) == 0:
            pool = None
    device = model.clip.logit_scale.device
    data = _on(data, device)
    fold_config = replace(config, progress=False)
    oof = out_of_fold_logits(model, data, fold_config, crossfit.folds, crossfit.steps, crossfit.repeats, pool)
    report = train(model, train_data if train_data is not None else data, config)
    refine_negative(model, data, oof, fold_config, crossfit.steps, pool, crossfit.pool_weight)
    return report
