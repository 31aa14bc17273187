"""One training round of the dual prompts, on Hugging Face Accelerate.

Order follows Accelerate's examples: seed -> build -> one ``prepare`` -> backward -> step.
Device placement and mixed precision come from Accelerate, so the same code runs on CPU here, on a
GPU when present, and on several GPUs under ``accelerate launch``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from dpal_core.config import TrainConfig
from dpal_core.errors import ConfigError, EmbeddingError
from dpal_core.losses import dual_prompt_loss
from dpal_core.model import DualPromptCLIP, check_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainData:
    """Labelled training pairs. Give ``features`` (coop, adapter) or ``pixel_values`` (vpt)."""

    labels: torch.Tensor  # [N] int64 class indices
    features: torch.Tensor | None = None  # [N, D] cached image embeddings
    pixel_values: torch.Tensor | None = None  # [N, 3, S, S]

    @property
    def inputs(self) -> torch.Tensor:
        x = self.features if self.features is not None else self.pixel_values
        if x is None:
            raise EmbeddingError("training data needs image embeddings or pixel values")
        return x


@dataclass(frozen=True)
class TrainReport:
    epochs: int
    steps: int
    seconds: float
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss, l_cls, l_neg, l_anchor


def make_optimizer(
    params: list[torch.nn.Parameter], config: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """``config``'s optimiser (SGD with momentum, or AdamW) and a cosine decay over ``total_steps``."""
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = max(1, total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    return opt, sched


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator honouring ``config.device`` and ``config.mixed_precision``."""
    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    # None lets Accelerate read ACCELERATE_MIXED_PRECISION / `accelerate config` (the GPU worker's
    # compose service sets fp16 that way). On CPU half precision is refused, so it is always "no".
    precision = "no" if cpu else config.mixed_precision
    return Accelerator(cpu=cpu, mixed_precision=precision)


def _validate(model: DualPromptCLIP, data: TrainData) -> None:
    labels = data.labels
    if labels.dim() != 1 or len(labels) == 0:
        raise ConfigError(
            "training needs at least one labelled example (labels must be a non-empty [N] tensor)"
        )
    if labels.min() < 0 or labels.max() >= model.n_classes:
        raise ConfigError(f"labels must be class indices in [0, {model.n_classes - 1}]")
    if len(data.inputs) != len(labels):
        raise ConfigError(f"{len(data.inputs)} inputs but {len(labels)} labels")
    if model.needs_pixels and data.pixel_values is None:
        raise EmbeddingError("the vpt paradigm trains on pixel values; cached embeddings are not enough")
    if data.features is not None and not model.needs_pixels:
        check_features(data.features, model.embed_dim)


def train(
    model: DualPromptCLIP,
    data: TrainData,
    config: TrainConfig = TrainConfig(),
    accelerator: Accelerator | None = None,
) -> TrainReport:
    """Train P+, P- and the visual tuner of ``model`` in place on ``data``.

    With ``coop``/``adapter`` each step costs one text-encoder pass over 2C prompts plus a matrix
    product with the cached embeddings; only ``vpt`` runs the image encoder.
    """
    _validate(model, data)
    set_seed(config.seed)
    accelerator = accelerator or make_accelerator(config)
    inputs = data.pixel_values if model.needs_pixels else data.features
    dataset = TensorDataset(inputs, data.labels.long())
    loader = DataLoader(
        dataset,
        batch_size=min(config.batch_size, len(dataset)),
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    epochs = config.epochs_for(len(dataset))
    total = epochs * len(loader)
    opt, sched = make_optimizer(model.trainable_parameters(), config, total)
    model_p, opt_p, loader_p, sched_p = accelerator.prepare(model, opt, loader, sched)
    wrong_gen = torch.Generator().manual_seed(config.seed + 1)
    show = config.progress if config.progress is not None else sys.stderr.isatty()
    bar = tqdm(total=total, desc="training", unit="step", disable=not show or not accelerator.is_main_process)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    model_p.train()
    opt_p.zero_grad(set_to_none=True)  # gradients left by earlier work on the same model must not leak in
    for epoch in range(epochs):
        sums = {"loss": 0.0, "l_cls": 0.0, "l_neg": 0.0, "l_anchor": 0.0}
        for x, y in loader_p:
            with accelerator.autocast():
                scores = model_p(pixel_values=x) if model.needs_pixels else model_p(features=x)
                loss, parts = dual_prompt_loss(
                    scores, y, config.neg_weight, config.wrong_class, wrong_gen,
                    model.zero_shot_text, config.anchor_weight,
                )  # fmt: skip
            accelerator.backward(loss)
            opt_p.step()
            sched_p.step()
            opt_p.zero_grad(set_to_none=True)
            for k in sums:
                sums[k] += parts[k] / len(loader_p)
            bar.update(1)
        bar.set_postfix(loss=f"{sums['loss']:.3f}")
        history.append(sums)
        log.debug("epoch %d/%d loss %.4f", epoch + 1, epochs, sums["loss"])
    bar.close()
    model_p.eval()
    seconds = time.perf_counter() - start
    final = history[-1]["loss"] if history else float("nan")
    log.info("trained %d epochs (%d steps) in %.1fs, final loss %.4f", epochs, total, seconds, final)
    return TrainReport(epochs, total, seconds, final, history)
