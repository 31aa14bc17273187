from dataclasses import replace

import numpy as np
import pytest
import torch

from dpal_core.config import PromptConfig, TrainConfig
from dpal_core.errors import ConfigError
from dpal_core.metrics import accuracy, error_detection_auroc
from dpal_core.model import DualPromptCLIP, predict
from dpal_core.train import TrainData, train

NAMES = ["bear", "cat", "dog", "cow"]


def separable_task(dim: int, n_train: int, n_test: int, noise: float, seed: int = 0):
    """Gaussian clusters around random unit centres: a task labels can solve, zero-shot cannot."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(len(NAMES), dim, generator=g), dim=-1)

    def draw(n):
        y = torch.randint(0, len(NAMES), (n,), generator=g)
        x = centres[y] + noise * torch.randn(n, dim, generator=g)
        return torch.nn.functional.normalize(x, dim=-1), y

    return draw(n_train), draw(n_test)


# No anchor: the tiny random CLIP's hand prompt knows nothing of these synthetic clusters.
FAST = TrainConfig(optimizer="adamw", lr=0.01, epochs=40, progress=False, anchor_weight=0.0)


@pytest.mark.parametrize("paradigm", ["coop", "adapter"])
def test_training_learns_and_p_clean_detects_errors(backbone, paradigm):
    (xtr, ytr), (xte, yte) = separable_task(backbone.embed_dim, 300, 600, noise=0.45)
    cfg = PromptConfig(n_ctx=4, paradigm=paradigm, class_specific=True)
    model = DualPromptCLIP(backbone, NAMES, cfg)
    before = accuracy(predict(model, xte).pred.numpy(), yte.numpy())
    report = train(model, TrainData(ytr, features=xtr), FAST)
    p = predict(model, xte)
    acc = accuracy(p.pred.numpy(), yte.numpy())
    correct = (p.pred == yte).numpy()
    assert acc > 0.6 and acc > before + 0.2, (before, acc)
    assert 0.05 < 1 - acc  # there must be errors to detect
    assert error_detection_auroc(p.p_clean.numpy(), correct) > 0.6
    assert report.history[-1]["loss"] < report.history[0]["loss"]


def test_vpt_trains_on_pixels(backbone):
    g = torch.Generator().manual_seed(0)
    # Two classes that differ in brightness: easy for pixels, needs the image encoder in the loop.
    y = torch.randint(0, 2, (64,), generator=g)
    pixels = torch.randn(64, 3, 32, 32, generator=g) * 0.3 + (y.float() * 2 - 1).view(-1, 1, 1, 1)
    model = DualPromptCLIP(backbone, ["bear", "cat"], PromptConfig(n_ctx=4, paradigm="vpt"))
    before = model.visual.prompts.detach().clone()
    train(
        model,
        TrainData(y, pixel_values=pixels),
        TrainConfig(optimizer="adamw", lr=0.02, epochs=15, progress=False),
    )
    assert not torch.equal(before, model.visual.prompts)
    acc = accuracy(predict(model, pixel_values=pixels).pred.numpy(), y.numpy())
    assert acc > 0.8


def test_training_is_deterministic_on_cpu(backbone):
    (xtr, ytr), (xte, _) = separable_task(backbone.embed_dim, 100, 50, noise=0.4)
    outs = []
    for _ in range(2):
        model = DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4, paradigm="adapter"))
        cfg = TrainConfig(optimizer="sgd", lr=0.01, epochs=3, seed=7, progress=False, wrong_class="random")
        torch.manual_seed(123)  # model init draws from the global RNG
        model = DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4, paradigm="adapter"))
        train(model, TrainData(ytr, features=xtr), cfg)
        outs.append(predict(model, xte).p_clean)
    assert torch.equal(outs[0], outs[1])


def test_bad_training_data(backbone):
    model = DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4))
    feats = torch.randn(4, backbone.embed_dim)
    with pytest.raises(ConfigError, match="at least one"):
        train(model, TrainData(torch.empty(0, dtype=torch.long), features=feats[:0]), FAST)
    with pytest.raises(ConfigError, match="class indices"):
        train(model, TrainData(torch.tensor([0, 1, 2, 9]), features=feats), FAST)
    with pytest.raises(ConfigError, match="labels"):
        train(model, TrainData(torch.tensor([0, 1]), features=feats), FAST)
    feats[1, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        train(model, TrainData(torch.tensor([0, 1, 2, 3]), features=feats), FAST)
    assert np.isinf(feats[1, 0].item())


def test_anchor_keeps_the_positive_prompt_near_the_hand_prompt(backbone):
    (xtr, ytr), _ = separable_task(backbone.embed_dim, 60, 10, noise=0.45)
    gaps = {}
    for weight in (0.0, 50.0):
        torch.manual_seed(0)
        model = DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4, init="words"))
        report = train(model, TrainData(ytr, features=xtr), replace(FAST, anchor_weight=weight))
        with torch.no_grad():
            t_pos, _ = model.text_features()
        gaps[weight] = float((t_pos - model.zero_shot_text).pow(2).sum(-1).mean())
        assert (report.history[-1]["l_anchor"] > 0) == (weight > 0)
    assert gaps[50.0] < 0.5 * gaps[0.0], gaps
