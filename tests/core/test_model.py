import pytest
import torch

from dpal_core.backbone import encode_texts
from dpal_core.config import PromptConfig, TrainConfig
from dpal_core.errors import ClassNamesError, ConfigError, EmbeddingError
from dpal_core.losses import dual_prompt_loss, wrong_classes
from dpal_core.model import DualPromptCLIP, ZeroShotCLIP, predict
from dpal_core.prompts import PromptTokens, encode_prompts

NAMES = ["bear", "cat", "dog"]


def test_prompt_injection_reproduces_clip_text_features(backbone):
    # Context = the embeddings of "a photo of a": the injected path must equal CLIP's own.
    tok = backbone.tokenizer
    ctx_ids = tok("a photo of a", add_special_tokens=False)["input_ids"]
    tokens = PromptTokens(backbone.model, tok, NAMES, len(ctx_ids))
    emb = backbone.model.text_model.embeddings.token_embedding(torch.tensor(ctx_ids))
    ours = encode_prompts(backbone.model, tokens, emb.unsqueeze(0).expand(len(NAMES), -1, -1))
    ref = encode_texts(backbone, [f"a photo of a {n}." for n in NAMES])
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("paradigm", ["coop", "adapter", "vpt"])
@pytest.mark.parametrize("class_specific", [False, True])
def test_scores_shapes_and_ranges(backbone, paradigm, class_specific):
    model = DualPromptCLIP(
        backbone, NAMES, PromptConfig(n_ctx=4, paradigm=paradigm, class_specific=class_specific)
    )
    feats = torch.nn.functional.normalize(torch.randn(5, backbone.embed_dim), dim=-1)
    pixels = torch.randn(5, 3, 32, 32)
    s = model(features=feats, pixel_values=pixels)
    assert s.logits_pos.shape == s.logits_neg.shape == s.p_yes.shape == (5, 3)
    assert ((s.p_yes > 0) & (s.p_yes < 1)).all()
    assert s.p_clean.shape == (5,)
    assert torch.equal(s.p_clean, s.p_yes[torch.arange(5), s.pred])


def test_word_init_puts_the_phrase_before_the_name(backbone):
    model = DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=6, init="words", init_words="a photo of a"))
    ids = backbone.tokenizer("a photo of a", add_special_tokens=False)["input_ids"]
    words = backbone.model.text_model.embeddings.token_embedding(torch.tensor(ids))
    assert torch.allclose(model.prompt_pos.ctx[-len(ids) :], words)
    assert torch.allclose(model.prompt_neg.ctx[-len(ids) :], words)


def test_only_prompts_and_tuner_are_trainable(backbone):
    model = DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4, paradigm="adapter"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"prompt_pos.ctx", "prompt_neg.ctx", "visual.mlp.0.weight", "visual.mlp.2.weight"}


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad is not None and p.grad.abs().sum().item() > 0) for n, p in model.named_parameters()}


@pytest.mark.parametrize("paradigm", ["adapter", "vpt"])
def test_negative_branch_sends_no_gradient_to_the_visual_side(backbone, paradigm):
    model = DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4, paradigm=paradigm))
    feats = torch.nn.functional.normalize(torch.randn(8, backbone.embed_dim), dim=-1)
    pixels = torch.randn(8, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    s = model(features=feats, pixel_values=pixels)
    _, parts = dual_prompt_loss(s, labels, 1.0, "hardest")
    # L_neg alone: only P- may receive gradient.
    diff = s.logits_pos.detach() - s.logits_neg
    l_neg = -torch.nn.functional.logsigmoid(diff[torch.arange(8), labels]).mean()
    g = _grads(model, l_neg)
    assert g["prompt_neg.ctx"]
    assert not g["prompt_pos.ctx"]
    assert not any(v for n, v in g.items() if n.startswith("visual."))
    assert not any(v for n, v in g.items() if n.startswith("clip."))
    # L_cls reaches P+ and h but never P-.
    s = model(features=feats, pixel_values=pixels)
    g = _grads(model, torch.nn.functional.cross_entropy(s.logits_pos, labels))
    assert g["prompt_pos.ctx"] and not g["prompt_neg.ctx"]
    assert any(v for n, v in g.items() if n.startswith("visual."))
    assert not any(v for n, v in g.items() if n.startswith("clip."))


def test_wrong_classes_are_never_the_label():
    logits = torch.tensor([[5.0, 4.0, 1.0], [0.0, 1.0, 9.0], [3.0, 2.0, 8.0]])
    labels = torch.tensor([0, 2, 1])
    assert wrong_classes(logits, labels, "hardest").tolist() == [1, 1, 2]
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (1000,))
    drawn = wrong_classes(torch.zeros(1000, 3), labels, "random", gen)
    assert (drawn != labels).all()
    assert set(drawn.tolist()) == {0, 1, 2}


def test_zero_shot_confidence_is_max_softmax(backbone):
    model = ZeroShotCLIP(backbone, NAMES)
    feats = torch.randn(6, backbone.embed_dim)
    p = predict(model, features=feats)
    assert torch.allclose(p.p_clean, p.probs.max(dim=1).values)
    assert p.pred.tolist() == p.probs.argmax(dim=1).tolist()


@pytest.mark.parametrize(
    "names, match",
    [([], "empty"), (["cat"], "only one class"), (["cat", "Cat"], "duplicate"), (["cat", " "], "empty")],
)
def test_bad_class_lists(backbone, names, match):
    with pytest.raises(ClassNamesError, match=match):
        DualPromptCLIP(backbone, names)
    with pytest.raises(ClassNamesError, match=match):
        ZeroShotCLIP(backbone, names)


def test_too_long_class_name(backbone):
    with pytest.raises(ClassNamesError, match="too long"):
        DualPromptCLIP(backbone, ["cat", "dog " * 40], PromptConfig(n_ctx=4))


def test_nan_and_misshapen_embeddings_are_refused(backbone):
    model = DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4))
    bad = torch.randn(4, backbone.embed_dim)
    bad[2, 3] = float("nan")
    with pytest.raises(EmbeddingError, match="NaN"):
        predict(model, features=bad)
    with pytest.raises(EmbeddingError, match="shape"):
        predict(model, features=torch.randn(4, backbone.embed_dim + 1))


def test_vpt_needs_pixels(backbone):
    model = DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4, paradigm="vpt"))
    with pytest.raises(EmbeddingError, match="vpt"):
        model(features=torch.randn(2, backbone.embed_dim))


@pytest.mark.parametrize(
    "kwargs",
    [dict(paradigm="lora"), dict(n_ctx=0), dict(init="zeros"), dict(adapter_ratio=1.5)],
)
def test_bad_prompt_config(kwargs):
    with pytest.raises(ConfigError):
        PromptConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [dict(optimizer="adam"), dict(lr=0), dict(wrong_class="easiest"), dict(mixed_precision="fp8")]
)
def test_bad_train_config(kwargs):
    with pytest.raises(ConfigError):
        TrainConfig(**kwargs)


def test_epochs_scale_with_the_labelled_set():
    cfg = TrainConfig(batch_size=32, target_steps=200, max_epochs=100)
    assert cfg.epochs_for(10) == 100  # 1 step/epoch, capped
    assert cfg.epochs_for(320) == 20  # 10 steps/epoch
    assert TrainConfig(epochs=7).epochs_for(5000) == 7
