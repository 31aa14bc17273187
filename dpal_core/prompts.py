"""Learnable text prompts (CoOp style) and the text encoder they are injected into.

A prompt for class c is ``[SOS] ctx_1 .. ctx_M name_c . [EOS] [PAD]...``; only ``ctx`` learns.
The token embeddings around it are frozen buffers, never saved (house style: only what learns is a
Parameter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerBase
from transformers.masking_utils import create_causal_mask

from dpal_core.config import ContextInit, PromptConfig
from dpal_core.errors import ClassNamesError


def validate_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    """Refuse lists a classifier cannot be built from; returns the names as a tuple."""
    names = tuple(class_names)
    if not names:
        raise ClassNamesError("the class list is empty: a classifier needs at least 2 classes")
    if len(names) == 1:
        raise ClassNamesError(f"only one class ({names[0]!r}): a classifier needs at least 2 classes")
    blank = [i for i, n in enumerate(names) if not isinstance(n, str) or not n.strip()]
    if blank:
        raise ClassNamesError(f"class names at positions {blank} are empty or not strings")
    seen: dict[str, int] = {}
    for n in names:
        seen[n.strip().lower()] = seen.get(n.strip().lower(), 0) + 1
    dups = sorted(k for k, v in seen.items() if v > 1)
    if dups:
        raise ClassNamesError(f"duplicate class names (case-insensitive): {dups}")
    return names


def max_context_tokens(clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, names: Sequence[str]) -> int:
    """The most context vectors per prompt that leave room for every class name (may be <= 0).

    A prompt is ``[SOS] ctx x M  name . [EOS]`` and must fit the text encoder's positions; real
    CLIP has 77, small stand-ins (the benchmark's proxy) as few as 16.
    """
    max_len = int(clip.config.text_config.max_position_embeddings)
    longest = max(len(tokenizer(f"{n.strip()}.", add_special_tokens=False)["input_ids"]) for n in names)
    return max_len - 2 - longest


class PromptTokens(nn.Module):
    """Frozen token ids and embeddings around the learnable context, shared by both prompts.

    Buffers: ``prefix`` [C, 1, W] (SOS), ``suffix`` [C, L-1-M, W] (name, '.', EOS, padding),
    ``eos_pos`` [C] (index of EOS in the full sequence of length L).
    """

    def __init__(self, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, names: Sequence[str], n_ctx: int):
        super().__init__()
        max_len = int(clip.config.text_config.max_position_embeddings)
        sos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        rows, eos_pos = [], []
        for name in names:
            body = tokenizer(f"{name.strip()}.", add_special_tokens=False)["input_ids"]
            ids = [sos] + [pad] * n_ctx + list(body) + [eos]  # ctx slots are overwritten below
            if len(ids) > max_len:
                raise ClassNamesError(
                    f"class name {name!r} is too long: {len(body)} tokens + {n_ctx} context tokens "
                    f"exceed the text encoder's {max_len} positions"
                )
            eos_pos.append(len(ids) - 1)
            rows.append(ids + [pad] * (max_len - len(ids)))
        ids_t = torch.tensor(rows, dtype=torch.long)  # [C, L]
        with torch.no_grad():
            emb = clip.text_model.embeddings.token_embedding(ids_t.to(clip.logit_scale.device)).float()
        self.n_ctx = n_ctx
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # [C, 1, W]
        self.register_buffer("suffix", emb[:, 1 + n_ctx :].clone(), persistent=False)  # [C, L-1-M, W]
        self.register_buffer("eos_pos", torch.tensor(eos_pos), persistent=False)  # [C]


class PromptContext(nn.Module):
    """The learnable context vectors of one prompt (positive or negative)."""

    def __init__(
        self, n_classes: int, width: int, config: PromptConfig, word_init: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        shape = (n_classes, config.n_ctx, width) if config.class_specific else (config.n_ctx, width)
        ctx = torch.randn(shape) * 0.02
        if config.init == ContextInit.WORDS and word_init is not None:
            k = min(config.n_ctx, word_init.shape[0])
            # The init phrase sits right before the class name, as in "... a photo of a dog."
            ctx[..., config.n_ctx - k :, :] = word_init[-k:]
        self.ctx = nn.Parameter(ctx)

    def expand(self, n_classes: int) -> torch.Tensor:
        """Returns [C, M, W]."""
        return self.ctx if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(n_classes, -1, -1)


def word_init_embeddings(clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, words: str) -> torch.Tensor:
    """Token embeddings of ``words`` (no special tokens). Returns [K, W]."""
    ids = torch.tensor(tokenizer(words, add_special_tokens=False)["input_ids"], dtype=torch.long)
    with torch.no_grad():
        return clip.text_model.embeddings.token_embedding(ids.to(clip.logit_scale.device)).float().cpu()


def encode_prompts(clip: CLIPModel, tokens: PromptTokens, ctx: torch.Tensor) -> torch.Tensor:
    """Run CLIP's text transformer on prompts whose context is ``ctx``.

    Args:
        ctx: [P, M, W] context vectors for P prompts; prompt i uses class ``i % C``.
    Returns:
        [P, D] L2-normalised text embeddings.
    """
    n_classes = tokens.prefix.shape[0]
    reps = ctx.shape[0] // n_classes
    # Attention is causal, so positions after the last EOS never reach any EOS: cut them. Exact, and
    # 2-4x cheaper (an 8-token prompt in a 77-position encoder used to pay for 77).
    length = int(tokens.eos_pos.max()) + 1
    prefix = tokens.prefix.repeat(reps, 1, 1)  # [P, 1, W]
    suffix = tokens.suffix[:, : length - 1 - ctx.shape[1]].repeat(reps, 1, 1)  # [P, length-1-M, W]
    eos_pos = tokens.eos_pos.repeat(reps)  # [P]
    text = clip.text_model
    x = torch.cat([prefix, ctx.to(prefix.dtype), suffix], dim=1)  # [P, length, W]
    x = x + text.embeddings.position_embedding.weight[: x.shape[1]].unsqueeze(0)
    mask = create_causal_mask(config=text.config, inputs_embeds=x, attention_mask=None, cache=None)
    x = text.encoder(inputs_embeds=x, attention_mask=mask, is_causal=True).last_hidden_state
    x = text.final_layer_norm(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), eos_pos]  # [P, W]
    return nn.functional.normalize(clip.text_projection(pooled), dim=-1)
