"""Configuration as frozen dataclasses, one per concern. Modes are string enums.

Strings are accepted for enum fields (``PromptConfig(paradigm="adapter")``) so that JSON round-trips
and environment values need no special handling; ``__post_init__`` converts and validates them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from dpal_core.errors import ConfigError


class Paradigm(str, Enum):
    """Light-weight visual tuning (method.md, "Parts")."""

    COOP = "coop"  # visual branch frozen; trains on cached embeddings
    ADAPTER = "adapter"  # residual bottleneck MLP on the cached embedding
    VPT = "vpt"  # deep visual prompt tokens; runs the image encoder while training


class ContextInit(str, Enum):
    RANDOM = "random"  # N(0, 0.02^2)
    WORDS = "words"  # token embeddings of `init_words`, right before the class name


class WrongClass(str, Enum):
    RANDOM = "random"  # a uniformly drawn wrong class
    HARDEST = "hardest"  # the wrong class with the largest positive logit


def _coerce(obj: Any, name: str, enum: type[Enum]) -> None:
    value = getattr(obj, name)
    try:
        object.__setattr__(obj, name, enum(value))
    except ValueError:
        choices = ", ".join(e.value for e in enum)
        raise ConfigError(f"{name}={value!r} is not one of: {choices}") from None


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(obj, name)!r}")


@dataclass(frozen=True)
class PromptConfig:
    """What the dual prompts and the visual tuner look like. Saved with every checkpoint."""

    n_ctx: int = 16  # learnable context vectors per prompt (M)
    class_specific: bool = False  # one context per class instead of one shared context
    init: ContextInit = ContextInit.RANDOM  # how context vectors start
    init_words: str = "a photo of a"  # used when init == "words"
    paradigm: Paradigm = Paradigm.COOP  # visual tuning
    adapter_ratio: float = 0.2  # residual mix `a` of the adapter
    adapter_reduction: int = 4  # bottleneck width = D / reduction
    vpt_tokens: int = 4  # visual prompt tokens per layer (vpt)

    def __post_init__(self) -> None:
        _coerce(self, "init", ContextInit)
        _coerce(self, "paradigm", Paradigm)
        _positive(self, "n_ctx", "adapter_reduction", "vpt_tokens")
        if not 0.0 < self.adapter_ratio <= 1.0:
            raise ConfigError(f"adapter_ratio must be in (0, 1], got {self.adapter_ratio!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown PromptConfig fields: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig:
    """One training round. Defaults follow the CoOp/PCB protocol (SGD 0.002, cosine, batch 32)."""

    optimizer: str = "sgd"  # "sgd" or "adamw"
    lr: float = 0.002
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4
    batch_size: int = 32
    epochs: int = 0  # 0 = scale with the labelled-set size to about `target_steps`
    target_steps: int = 200  # optimiser steps aimed at when epochs == 0
    max_epochs: int = 200  # cap for the automatic epoch count
    neg_weight: float = 1.0  # lambda in L = L_cls + lambda * L_neg
    # Anchor: + anchor_weight * mean_c ||t+_c - t_zs_c||^2, t_zs = the hand prompt's text feature
    # (KgCoOp, Yao et al. 2023). Keeps few-label prompts from forgetting what zero-shot CLIP knew.
    anchor_weight: float = 2.0
    # random, not hardest: with cross-fitting it gives the better error detector
    # (benchmarks/results/animal-mnist/ABLATIONS.md); predictions do not depend on it.
    wrong_class: WrongClass = WrongClass.RANDOM
    seed: int = 0
    mixed_precision: str | None = None  # "no", "fp16", "bf16"; None: Accelerate's env/config decides
    device: str = "auto"  # "auto", "cpu", "cuda"
    progress: bool | None = None  # None: show a progress bar when stderr is a terminal

    def __post_init__(self) -> None:
        _coerce(self, "wrong_class", WrongClass)
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer={self.optimizer!r} is not one of: sgd, adamw")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision={self.mixed_precision!r} is not one of: no, fp16, bf16")
        _positive(self, "lr", "batch_size", "target_steps", "max_epochs")
        if self.epochs < 0 or self.neg_weight < 0 or self.weight_decay < 0 or self.anchor_weight < 0:
            raise ConfigError("epochs, neg_weight, anchor_weight and weight_decay must be >= 0")

    def epochs_for(self, n_samples: int) -> int:
        """Epochs for a labelled set of ``n_samples``: fixed, or enough for ~target_steps steps."""
        if self.epochs:
            return self.epochs
        steps_per_epoch = max(1, -(-n_samples // self.batch_size))
        return int(min(self.max_epochs, max(1, -(-self.target_steps // steps_per_epoch))))


@dataclass(frozen=True)
class CrossfitConfig:
    """How the negative prompt learns from real mistakes (:mod:`dpal_core.crossfit`)."""

    folds: int = 4  # K of the K-fold split whose out-of-fold predictions teach P-; 0 = plain training
    steps: int = 100  # full-batch optimiser steps of each fold classifier and of the P- refinement
    repeats: int = 1  # K-fold splits; each gives every labelled sample one out-of-fold prediction
    pool_weight: float = 10.0  # weight of the unlabelled-pool term (fold models' agreement); 0 = off
    pool_size: int = 2000  # unlabelled images sampled for that term

    def __post_init__(self) -> None:
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"crossfit folds must be 0 (off) or >= 2, got {self.folds!r}")
        _positive(self, "steps", "repeats")
        if self.pool_weight < 0 or self.pool_size < 0:
            raise ConfigError("crossfit pool_weight and pool_size must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.folds >= 2
