"""Training losses (method.md, "Training (one round)")."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from dpal_core.config import WrongClass
from dpal_core.model import Scores


def wrong_classes(
    logits_pos: torch.Tensor, labels: torch.Tensor, mode: WrongClass, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one wrong class per sample.

    Args:
        logits_pos: [B, C] positive logits.
        labels: [B] true classes.
        mode: ``random`` (uniform over wrong classes) or ``hardest`` (largest l+ among wrong classes).
    Returns:
        [B] class indices, never equal to ``labels``.
    """
    n_classes = logits_pos.shape[1]
    if mode == WrongClass.HARDEST:
        masked = logits_pos.detach().clone()
        masked.scatter_(1, labels.unsqueeze(1), float("-inf"))
        return masked.argmax(dim=1)
    # Uniform over the C-1 wrong classes: draw in [0, C-1) and skip over the true label.
    draw = torch.randint(0, n_classes - 1, labels.shape, generator=generator, device="cpu").to(labels.device)
    return draw + (draw >= labels).long()


def negative_loss(diff: torch.Tensor, labels: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """``L_neg = mean(-log p_yes_y - log(1 - p_yes_ybar))`` from ``diff = sg(l+) - l-`` [B, C].

    ``log p_yes = logsigmoid(d)`` and ``log(1 - p_yes) = logsigmoid(-d)``: stable for saturated
    sigmoids. ``labels`` and ``wrong`` are [B] class indices.
    """
    d_true = diff.gather(1, labels.unsqueeze(1)).squeeze(1)
    d_wrong = diff.gather(1, wrong.unsqueeze(1)).squeeze(1)
    return (-F.logsigmoid(d_true) - F.logsigmoid(-d_wrong)).mean()


def anchor_loss(text_pos: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of t+ [C, D] to the hand prompt's text features ``anchor`` [C, D]."""
    return (text_pos - anchor).pow(2).sum(dim=-1).mean()


def dual_prompt_loss(
    scores: Scores,
    labels: torch.Tensor,
    neg_weight: float,
    mode: WrongClass,
    generator: torch.Generator | None = None,
    anchor: torch.Tensor | None = None,
    anchor_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L = L_cls + lambda * L_neg (+ anchor_weight * L_anchor)``.

    ``L_cls = CE(softmax(l+), y)`` trains P+ and h. ``L_neg = -log p_yes_y - log(1 - p_yes_ybar)``
    trains P- only (p_yes already stops the gradient into l+ and v). ``L_anchor`` is the mean
    squared distance of t+ ([C, D], ``scores.text_pos``) to ``anchor`` [C, D], the hand prompt's
    text features; it trains P+ only.
    Returns the loss and its parts as floats for logging.
    """
    assert scores.p_yes is not None, "dual_prompt_loss needs a DualPromptCLIP's scores"
    l_cls = F.cross_entropy(scores.logits_pos, labels)
    wrong = wrong_classes(scores.logits_pos, labels, mode, generator)
    l_neg = negative_loss(scores.logits_pos.detach() - scores.logits_neg, labels, wrong)
    loss = l_cls + neg_weight * l_neg
    l_anchor = torch.zeros(())
    if anchor_weight > 0:
        if scores.text_pos is None or anchor is None:
            raise ValueError("the anchor loss needs the pass's positive text features and the anchor")
        l_anchor = anchor_loss(scores.text_pos, anchor)
        loss = loss + anchor_weight * l_anchor
    return loss, {
        "loss": float(loss.detach()),
        "l_cls": float(l_cls.detach()),
        "l_neg": float(l_neg.detach()),
        "l_anchor": float(l_anchor.detach()),
    }
