import pytest
import torch

from dpal_core.config import CrossfitConfig, PromptConfig
from dpal_core.crossfit import out_of_fold_logits, train_crossfit
from dpal_core.errors import ConfigError, EmbeddingError
from dpal_core.metrics import error_detection_auroc
from dpal_core.model import DualPromptCLIP, predict
from dpal_core.train import TrainData, train
from tests.core.test_train import FAST, NAMES, separable_task

CFG = PromptConfig(n_ctx=4, class_specific=True)


def _fresh(backbone, seed: int = 0) -> DualPromptCLIP:
    torch.manual_seed(seed)
    return DualPromptCLIP(backbone, NAMES, CFG)


def test_crossfit_changes_only_the_negative_prompt(backbone):
    (xtr, ytr), (xte, _) = separable_task(backbone.embed_dim, 120, 200, noise=0.5)
    data = TrainData(ytr, features=xtr)
    plain, crossed = _fresh(backbone), _fresh(backbone)
    train(plain, data, FAST)
    neg_before = crossed.prompt_neg.ctx.detach().clone()
    train_crossfit(crossed, data, FAST, CrossfitConfig(folds=3, steps=20, pool_size=50), pool=xte)
    # Fold models start from and are reset to the initial prompts, so P+ trains exactly as plainly.
    torch.testing.assert_close(crossed.prompt_pos.ctx, plain.prompt_pos.ctx)
    p_plain, p_cross = predict(plain, xte), predict(crossed, xte)
    assert torch.equal(p_plain.pred, p_cross.pred)
    assert not torch.allclose(crossed.prompt_neg.ctx, plain.prompt_neg.ctx)
    assert not torch.allclose(crossed.prompt_neg.ctx, neg_before)


def test_crossfit_p_clean_detects_errors(backbone):
    (xtr, ytr), (xte, yte) = separable_task(backbone.embed_dim, 200, 600, noise=0.6, seed=3)
    model = _fresh(backbone)
    train_crossfit(model, TrainData(ytr, features=xtr), FAST, CrossfitConfig(folds=4, steps=40), pool=xte)
    p = predict(model, xte)
    correct = (p.pred == yte).numpy()
    assert 0.1 < correct.mean() < 0.95  # some errors to detect
    assert error_detection_auroc(p.p_clean.numpy(), correct) > 0.6


def test_out_of_fold_rows_and_pool_predictions(backbone):
    (xtr, ytr), (xte, _) = separable_task(backbone.embed_dim, 30, 40, noise=0.5)
    model = _fresh(backbone)
    start = model.prompt_pos.ctx.detach().clone()
    oof = out_of_fold_logits(model, TrainData(ytr, features=xtr), FAST, folds=3, steps=2, repeats=2, pool=xte)
    assert oof.logits.shape == (60, len(NAMES))  # every sample once per repeat
    assert sorted(oof.rows.tolist()) == sorted(list(range(30)) * 2)
    assert oof.pool_preds.shape == (6, 40)  # 3 folds x 2 repeats
    assert torch.equal(model.prompt_pos.ctx, start)  # restored


def test_fewer_samples_than_folds_still_trains(backbone):
    model = _fresh(backbone)
    x = torch.nn.functional.normalize(torch.randn(2, backbone.embed_dim), dim=-1)
    report = train_crossfit(model, TrainData(torch.tensor([0, 1]), features=x), FAST, CrossfitConfig(folds=5, steps=3))
    assert report.steps > 0


def test_crossfit_off_is_plain_training(backbone):
    (xtr, ytr), (xte, _) = separable_task(backbone.embed_dim, 40, 50, noise=0.5)
    a, b = _fresh(backbone), _fresh(backbone)
    train(a, TrainData(ytr, features=xtr), FAST)
    train_crossfit(b, TrainData(ytr, features=xtr), FAST, CrossfitConfig(folds=0), pool=xte)
    torch.testing.assert_close(predict(a, xte).p_clean, predict(b, xte).p_clean)


def test_bad_pool_and_config_are_refused(backbone):
    (xtr, ytr), _ = separable_task(backbone.embed_dim, 20, 5, noise=0.5)
    bad = torch.full((4, backbone.embed_dim), float("nan"))
    with pytest.raises(EmbeddingError, match="NaN"):
        train_crossfit(_fresh(backbone), TrainData(ytr, features=xtr), FAST, CrossfitConfig(steps=2), pool=bad)
    for kwargs in (dict(folds=1), dict(folds=-2), dict(steps=0), dict(pool_weight=-1.0), dict(repeats=0)):
        with pytest.raises(ConfigError):
            CrossfitConfig(**kwargs)
