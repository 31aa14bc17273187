"""Light-weight visual tuning ``h``: none (coop), a residual adapter, or deep visual prompts (vpt)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPModel

from dpal_core.config import Paradigm, PromptConfig


class FrozenVisual(nn.Module):
    """CoOp: the visual branch is frozen; ``h`` is the identity on the cached embedding."""

    needs_pixels = False

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, D]."""
        return features


class ResidualAdapter(nn.Module):
    """CLIP-Adapter: ``h(z) = (1-a) z + a MLP(z)`` on the image embedding (cached, so cheap)."""

    needs_pixels = False

    def __init__(self, dim: int, reduction: int, ratio: float) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim, bias=False),
            nn.ReLU(inplace=True),
        )
        self.ratio = ratio

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, D]."""
        return (1 - self.ratio) * features + self.ratio * self.mlp(features)


class DeepVisualPrompts(nn.Module):
    """VPT-deep: ``T`` learnable tokens inserted after [CLS] at every vision-transformer layer.

    The image encoder runs inside the training loop, so embeddings cannot be cached for training.
    """

    needs_pixels = True

    def __init__(self, clip: CLIPModel, n_tokens: int) -> None:
        super().__init__()
        vcfg = clip.config.vision_config
        self.n_tokens = n_tokens
        self.prompts = nn.Parameter(torch.randn(vcfg.num_hidden_layers, n_tokens, vcfg.hidden_size) * 0.02)

    def encode(self, clip: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image embedding with prompts. [B, 3, S, S] -> [B, D] (not normalised)."""
        vision = clip.vision_model
        x = vision.embeddings(pixel_values.to(clip.logit_scale.dtype))  # [B, 1+N, H]
        x = vision.pre_layrnorm(x)
        batch = x.shape[0]
        for i, layer in enumerate(vision.encoder.layers):
            prompt = self.prompts[i].unsqueeze(0).expand(batch, -1, -1).to(x.dtype)  # [B, T, H]
            patches = x[:, 1:] if i == 0 else x[:, 1 + self.n_tokens :]  # drop last layer's prompts
            x = torch.cat([x[:, :1], prompt, patches], dim=1)  # [B, 1+T+N, H]
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        pooled = vision.post_layernorm(x[:, 0])  # [B, H]
        return clip.visual_projection(pooled)


def build_visual(clip: CLIPModel, config: PromptConfig) -> nn.Module:
    """The visual tuner for ``config.paradigm``."""
    if config.paradigm == Paradigm.ADAPTER:
        return ResidualAdapter(
            int(clip.config.projection_dim), config.adapter_reduction, config.adapter_ratio
        )
    if config.paradigm == Paradigm.VPT:
        return DeepVisualPrompts(clip, config.vpt_tokens)
    return FrozenVisual()
