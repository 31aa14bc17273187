"""Small, randomly initialised CLIP models built offline: for tests, demos and the proxy backbone.

The tokenizer is a real CLIP byte-level BPE tokenizer whose vocabulary is the 256 byte symbols
(so any text tokenizes) plus whole-word merges for the words given, so class names and prompt
words become single tokens. No download is involved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

SOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words every tiny model knows as single tokens: the hand prompt and common class names in tests.
DEFAULT_WORDS = (
    "a photo of the an x . , silhouette drawing picture small large "
    "bear bird cat cow dog elephant giraffe horse sheep zebra red green blue yellow circle square"
).split()


@dataclass(frozen=True)
class ClipSize:
    """Architecture of a locally built CLIP. Defaults are the test-sized model."""

    vision_hidden: int = 32  # width of the vision transformer
    vision_layers: int = 2
    image_size: int = 32  # input side in pixels
    patch_size: int = 8
    text_hidden: int = 32
    text_layers: int = 2
    heads: int = 2
    projection_dim: int = 32  # joint embedding size D
    max_text_len: int = 32


def build_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> CLIPTokenizer:
    """Byte-level CLIP tokenizer whose BPE merges make each of ``words`` (lower-cased) one token.

    The merges are learnt by the ``tokenizers`` BPE trainer on the word list, so they are
    consistent with each other (hand-written merges of different words collide).
    """
    alphabet = sorted(ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,
        min_frequency=1,
        show_progress=False,
        end_of_word_suffix="</w>",
        initial_alphabet=alphabet,
    )
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    corpus = sorted({w.strip().lower() for w in words if w.strip()})
    bpe.train_from_iterator(corpus, trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = {}
    # Every byte symbol, alone and word-final, so any text tokenizes.
    for s in alphabet + [a + "</w>" for a in alphabet] + sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(s, len(vocab))
    for special in (SOS, EOS):
        vocab.setdefault(special, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    return CLIPTokenizer(
        vocab=vocab, merges=merges, unk_token=EOS, bos_token=SOS, eos_token=EOS, pad_token=EOS
    )


def build_clip(
    out_dir: str | Path, size: ClipSize = ClipSize(), words: Iterable[str] = DEFAULT_WORDS, seed: int = 0
) -> Path:
    """Write a randomly initialised CLIP (model + tokenizer + image-processor config) to ``out_dir``.

    The folder loads with :func:`dpal_core.backbone.load_backbone` like any Hugging Face CLIP.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(words)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=size.text_hidden,
            intermediate_size=size.text_hidden * 4,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.heads,
            max_position_embeddings=size.max_text_len,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_hidden * 4,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.heads,
            image_size=size.image_size,
            patch_size=size.patch_size,
        ),
        projection_dim=size.projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    from dpal_core.images import write_preprocessor_config

    write_preprocessor_config(out, size.image_size)
    return out


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> tuple[Path, float]:
    """Build the test-sized CLIP in ``out_dir``. Returns (path, seconds taken)."""
    start = time.perf_counter()
    path = build_clip(out_dir, ClipSize(), DEFAULT_WORDS, seed)
    return path, time.perf_counter() - start
