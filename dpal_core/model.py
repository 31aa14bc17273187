"""The dual-prompt CLIP classifier and the zero-shot version 0 (method.md, "Scores").

For an image with visual embedding ``v = normalize(h(E_I(x)))``:
    l+_c = s <v, t+_c>                      (classifier)
    l-_c = s <sg(v), t-_c>                  (negative branch sends no gradient into the visual side)
    p_yes_c = sigmoid(sg(l+_c) - l-_c)      (probability that c is the right label)
    p_clean = p_yes at argmax l+            (explicit confidence; uncertainty = 1 - p_clean)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dpal_core.backbone import Backbone, encode_images, encode_texts
from dpal_core.config import PromptConfig
from dpal_core.errors import EmbeddingError
from dpal_core.prompts import (
    PromptContext,
    PromptTokens,
    encode_prompts,
    validate_class_names,
    word_init_embeddings,
)
from dpal_core.visual import build_visual

ZERO_SHOT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class Scores:
    """Outputs for a batch of B images over C classes."""

    logits_pos: torch.Tensor  # [B, C] l+
    logits_neg: torch.Tensor | None  # [B, C] l- (None for zero-shot)
    p_yes: torch.Tensor | None  # [B, C] in (0, 1) (None for zero-shot)
    text_pos: torch.Tensor | None = None  # [C, D] t+ of this pass (training's anchor loss uses it)

    @property
    def pred(self) -> torch.Tensor:
        """[B] predicted class index."""
        return self.logits_pos.argmax(dim=-1)

    @property
    def probs(self) -> torch.Tensor:
        """[B, C] softmax of the positive logits."""
        return self.logits_pos.softmax(dim=-1)

    @property
    def p_clean(self) -> torch.Tensor:
        """[B] confidence that the prediction is right: p_yes of the prediction, or max softmax."""
        if self.p_yes is None:
            return self.probs.max(dim=-1).values
        return self.p_yes.gather(1, self.pred.unsqueeze(1)).squeeze(1)


def check_features(features: torch.Tensor, dim: int) -> None:
    """Refuse embeddings a model cannot score, with the reason."""
    if features.dim() != 2 or features.shape[1] != dim:
        raise EmbeddingError(f"expected image embeddings of shape [N, {dim}], got {list(features.shape)}")
    if not torch.isfinite(features).all():
        bad = (~torch.isfinite(features)).any(dim=1).nonzero().flatten().tolist()
        raise EmbeddingError(f"image embeddings contain NaN or infinite values at rows {bad[:10]}")


class DualPromptCLIP(nn.Module):
    """Frozen CLIP + positive prompt P+ + negative prompt P- + visual tuner h.

    Only ``prompt_pos``, ``prompt_neg`` and ``visual`` hold parameters that learn.
    """

    def __init__(self, backbone: Backbone, class_names: Sequence[str], config: PromptConfig = PromptConfig()):
        super().__init__()
        self.class_names = validate_class_names(class_names)
        self.config = config
        self.backbone_id = backbone.backbone_id
        self.clip = backbone.model  # frozen; excluded from checkpoints
        self.clip.requires_grad_(False)
        width = int(self.clip.config.text_config.hidden_size)
        n = len(self.class_names)
        self.tokens = PromptTokens(self.clip, backbone.tokenizer, self.class_names, config.n_ctx)
        words = word_init_embeddings(self.clip, backbone.tokenizer, config.init_words)
        self.prompt_pos = PromptContext(n, width, config, words)
        self.prompt_neg = PromptContext(n, width, config, words)
        self.visual = build_visual(self.clip, config).to(self.clip.logit_scale.device)
        # t of the hand prompt, [C, D]: what the anchor loss keeps t+ close to (not saved: derived).
        zero_shot = encode_texts(backbone, [ZERO_SHOT_TEMPLATE.format(c) for c in self.class_names])
        self.register_buffer("zero_shot_text", zero_shot, persistent=False)
        self.to(self.clip.logit_scale.device)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def needs_pixels(self) -> bool:
        """True when scoring needs raw pixels (vpt) rather than cached embeddings."""
        return bool(self.visual.needs_pixels)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.config.projection_dim)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(t+, t-), each [C, D], L2-normalised; one text-encoder pass over 2C prompts."""
        n = self.n_classes
        ctx = torch.cat([self.prompt_pos.expand(n), self.prompt_neg.expand(n)])  # [2C, M, W]
        text = encode_prompts(self.clip, self.tokens, ctx)  # [2C, D]
        return text[:n], text[n:]

    def visual_features(
        self, features: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """v = normalize(h(E_I(x))), [B, D]. Give cached ``features`` [B, D] or ``pixel_values``."""
        if self.needs_pixels:
            if pixel_values is None:
                raise EmbeddingError("the vpt paradigm scores raw pixels; cached embeddings are not enough")
            z = self.visual.encode(self.clip, pixel_values)
        else:
            if features is None:
                if pixel_values is None:
                    raise EmbeddingError("give image embeddings or pixel values")
                features = encode_images(self._backbone_view(), pixel_values, normalize=True)
            z = self.visual(features.float())
        return nn.functional.normalize(z.float(), dim=-1)

    def forward(
        self, features: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None
    ) -> Scores:
        v = self.visual_features(features, pixel_values)  # [B, D]
        t_pos, t_neg = self.text_features()  # [C, D] each
        scale = self.clip.logit_scale.exp().float()
        logits_pos = scale * v @ t_pos.t()  # [B, C]
        logits_neg = scale * v.detach() @ t_neg.t()  # [B, C]; sg(v): no gradient into h
        p_yes = torch.sigmoid(logits_pos.detach() - logits_neg)  # [B, C]; sg(l+): trains P- only
        return Scores(logits_pos, logits_neg, p_yes, t_pos)

    def _backbone_view(self) -> Backbone:
        # encode_images needs only the model; tokenizer/preprocess are unused there.
        return Backbone(self.clip, None, None, self.backbone_id)  # type: ignore[arg-type]


class ZeroShotCLIP(nn.Module):
    """Version 0: CLIP with the hand prompt "a photo of a {label}."; confidence = max softmax."""

    needs_pixels = False

    def __init__(self, backbone: Backbone, class_names: Sequence[str], template: str = ZERO_SHOT_TEMPLATE):
        super().__init__()
        self.class_names = validate_class_names(class_names)
        self.backbone_id = backbone.backbone_id
        self.clip = backbone.model
        self.register_buffer("text", encode_texts(backbone, [template.format(c) for c in self.class_names]))

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.config.projection_dim)

    def forward(
        self, features: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None
    ) -> Scores:
        if features is None:
            if pixel_values is None:
                raise EmbeddingError("give image embeddings or pixel values")
            features = encode_images(Backbone(self.clip, None, None, self.backbone_id), pixel_values)  # type: ignore[arg-type]
        v = nn.functional.normalize(features.float(), dim=-1)
        return Scores(self.clip.logit_scale.exp().float() * v @ self.text.t(), None, None)


@dataclass(frozen=True)
class Prediction:
    """Predictions for N images (CPU tensors)."""

    pred: torch.Tensor  # [N] class index
    p_clean: torch.Tensor  # [N] confidence in (0, 1)
    probs: torch.Tensor  # [N, C] softmax of positive logits


@torch.no_grad()
def predict(
    model: DualPromptCLIP | ZeroShotCLIP,
    features: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    batch_size: int = 4096,
    scorer: Callable[..., Scores] | None = None,
) -> Prediction:
    """Score images in batches. Text features are computed once, not once per batch.

    Args:
        features: [N, D] cached embeddings (coop, adapter, zero-shot).
        pixel_values: [N, 3, S, S] (vpt, or when no embeddings are cached).
        scorer: from :func:`make_scorer`; a server keeps one per loaded model so the text encoder
            does not run on every request (seconds at ViT-B size).
    """
    was_training = model.training
    model.eval()
    try:
        source = features if features is not None else pixel_values
        if source is None:
            raise EmbeddingError("give image embeddings or pixel values")
        if features is not None:
            check_features(features, model.embed_dim)
        scorer = scorer or make_scorer(model)
        preds, cleans, probs = [], [], []
        device = model.clip.logit_scale.device
        for start in range(0, source.shape[0], batch_size):
            chunk = source[start : start + batch_size].to(device)
            s = scorer(chunk) if features is not None else scorer(None, chunk)
            preds.append(s.pred.cpu())
            cleans.append(s.p_clean.cpu())
            probs.append(s.probs.cpu())
        n = model.n_classes
        if not preds:
            return Prediction(torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0, n))
        return Prediction(torch.cat(preds), torch.cat(cleans), torch.cat(probs))
    finally:
        model.train(was_training)


@torch.no_grad()
def make_scorer(model: DualPromptCLIP | ZeroShotCLIP) -> Callable[..., Scores]:
    """A scoring function ``(features, pixel_values=None) -> Scores`` over one text-encoder pass.

    Valid until the model's prompts change (training); inference-only servers keep it per version.
    """
    if isinstance(model, ZeroShotCLIP):
        return model  # its text features are a buffer already
    t_pos, t_neg = model.text_features()
    scale = model.clip.logit_scale.exp().float()

    def score(features: torch.Tensor | None, pixel_values: torch.Tensor | None = None) -> Scores:
        v = model.visual_features(features, pixel_values)
        lp, ln = scale * v @ t_pos.t(), scale * v @ t_neg.t()
        return Scores(lp, ln, torch.sigmoid(lp - ln))

    return score
