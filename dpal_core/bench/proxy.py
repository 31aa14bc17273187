"""The proxy backbone: a small CLIP pre-trained contrastively on clean animal-mnist images.

It stands in for a real pre-trained CLIP on machines that can download none: a frozen image and
text encoder whose zero-shot accuracy is good on its own domain and poor under the benchmark's
shift, so labels have something to fix. The folder it writes loads with
:func:`dpal_core.backbone.load_backbone` like any Hugging Face CLIP.

Run ``python -m dpal_core.bench.proxy`` to build it (cached) and print the accuracies reported in
:mod:`dpal_core.bench.shifts`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPModel
from transformers.utils import logging as hf_logging

from dpal_core.backbone import Backbone, encode_pil, encode_texts, load_backbone
from dpal_core.bench.data import (
    ANIMAL_CLASSES,
    ANIMAL_DATA_SHA256,
    ImageDataset,
    load_animal_mnist,
    split_animal_mnist,
    stratified_split,
)
from dpal_core.errors import ConfigError
from dpal_core.images import ImagePreprocessor
from dpal_core.tiny import DEFAULT_WORDS, ClipSize, build_clip

logger = logging.getLogger(__name__)

# Bump whenever a change here changes the model built from the same config and seed.
PROXY_CODE_VERSION = 1
INFO_FILE = "proxy_info.json"  # written last inside the temp dir: its presence marks a complete build
TEMPLATES = (
    "a photo of a {}.",
    "a silhouette of a {}.",
    "a drawing of a {}.",
    "a picture of a {}.",
    "a {}.",
    "a small {}.",
    "a large {}.",
)


@dataclass(frozen=True)
class ProxyConfig:
    """Architecture and pre-training recipe of the proxy backbone."""

    vision_hidden: int = 128  # vision transformer width
    vision_layers: int = 4
    image_size: int = 28  # animal-mnist's own size: no resampling
    patch_size: int = 7  # 4x4 patches; 4 px patches (7x7) learned several times slower per step
    text_hidden: int = 128
    text_layers: int = 3
    heads: int = 4
    projection_dim: int = 64  # joint embedding size D
    max_text_len: int = 16  # tokens, SOS/EOS included
    steps: int = 400  # optimiser steps
    batch_size: int = 128  # images per step; every caption of every class is in every step
    lr: float = 2e-3  # AdamW peak learning rate (one-cycle); 3e-3 collapsed
    weight_decay: float = 0.05
    warmup_frac: float = 0.1  # share of steps spent warming up
    grad_clip: float = 1.0  # max global gradient norm (0: off); from-scratch transformers need it
    n_pretrain: int = 5000  # clean images used, a stratified subset of the fixed pretrain split
    augment: bool = False  # random +-2 px shift and h-flip; off: it cost 20 points at 400 steps
    templates: tuple[str, ...] = field(default=TEMPLATES)

    def __post_init__(self) -> None:
        for name in ("vision_hidden", "vision_layers", "text_hidden", "text_layers", "heads", "projection_dim",
                     "steps", "batch_size", "n_pretrain", "max_text_len"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"ProxyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.vision_hidden % self.heads or self.text_hidden % self.heads:
            raise ConfigError(f"heads={self.heads} must divide vision_hidden and text_hidden")
        if not 0 < self.lr < 1 or not 0 <= self.warmup_frac < 1:
            raise ConfigError(f"bad lr={self.lr} or warmup_frac={self.warmup_frac}")
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ConfigError(f"each template needs exactly one '{{}}': {self.templates}")

    @property
    def clip_size(self) -> ClipSize:
        return ClipSize(
            vision_hidden=self.vision_hidden, vision_layers=self.vision_layers, image_size=self.image_size,
            patch_size=self.patch_size, text_hidden=self.text_hidden, text_layers=self.text_layers,
            heads=self.heads, projection_dim=self.projection_dim, max_text_len=self.max_text_len,
        )  # fmt: skip


def proxy_key(config: ProxyConfig, seed: int) -> str:
    """Cache key: config, seed, code version and the data's checksum."""
    blob = {"config": asdict(config), "seed": seed, "version": PROXY_CODE_VERSION, "data": ANIMAL_DATA_SHA256}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "dpal" / "proxy"


def build_proxy(
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    config: ProxyConfig = ProxyConfig(),
) -> Path:
    """Build (or find in the cache) the proxy backbone; returns its folder.

    The folder is ``<cache_dir>/<proxy_key(config, seed)>``; it is written to a temporary folder and
    renamed into place, so a crash never leaves a half-built model where a reader would find it.

    Args:
        cache_dir: where built proxies live (default ``~/.cache/dpal/proxy``).
        seed: seeds the initial weights and the batch order; same seed, same model on one machine.
        progress: show a progress bar (only when stderr is a terminal).
        config: architecture and training recipe.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / proxy_key(config, seed)
    if (target / INFO_FILE).is_file():
        logger.info("proxy backbone cache hit: %s", target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        info = _build_into(tmp, config, seed, progress)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp and the weight writer make owner-only files
            f.chmod(0o755 if f.is_dir() else 0o644)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same build first; theirs is as good as ours
            if not (target / INFO_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built proxy backbone %s in %.0f s (loss %.3f -> %.3f)", target, info["seconds"],
                info["loss_first"], info["loss_last"])  # fmt: skip
    return target


def _build_into(folder: Path, config: ProxyConfig, seed: int, progress: bool) -> dict:
    """Write a pre-trained proxy into ``folder``; returns the build record also saved as INFO_FILE."""
    start = time.perf_counter()
    dataset = load_animal_mnist()
    pretrain = dataset.subset(split_animal_mnist(0, dataset.labels)["pretrain"])  # seed-independent
    pretrain = pretrain.subset(stratified_split(pretrain.labels, {"use": config.n_pretrain}, seed)["use"])
    words = set(DEFAULT_WORDS) | set(ANIMAL_CLASSES)
    words |= {w for t in config.templates for w in t.replace("{}", " ").replace(".", " ").split()}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' own load/save bars are noise here
    try:
        build_clip(folder, config.clip_size, sorted(words), seed)
        model = CLIPModel.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        losses = pretrain_contrastive(model, tokenizer, pretrain, config, seed, progress)
        model.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    info = {"config": asdict(config), "seed": seed, "version": PROXY_CODE_VERSION,
            "seconds": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads(),
            "loss_first": float(np.mean(losses[:5])), "loss_last": float(np.mean(losses[-5:])),
            "losses": [round(x, 4) for x in losses]}  # fmt: skip
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
    return info


def _augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` px (background fill) and horizontal flip. x: [B, 3, S, S]."""
    b, _, s, _ = x.shape
    background = x.amin(dim=(0, 2, 3), keepdim=True)  # per channel: black, the silhouettes' background
    padded = background.expand(b, 3, s + 2 * pad, s + 2 * pad).clone()
    padded[:, :, pad : pad + s, pad : pad + s] = x
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
    out = torch.stack([padded[i, :, dy : dy + s, dx : dx + s] for i, (dy, dx) in enumerate(offsets.tolist())])
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), out.flip(-1), out)


def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a uniform target over each row's positives; rows without any are skipped."""
    has = positives.any(dim=1)
    target = positives[has].float() / positives[has].sum(dim=1, keepdim=True)
    return -(target * F.log_softmax(logits[has], dim=1)).sum(dim=1).mean()


def pretrain_contrastive(
    model: CLIPModel, tokenizer, data: ImageDataset, config: ProxyConfig, seed: int, progress: bool = True
) -> list[float]:
    """CLIP-style pre-training where every caption of an image's class counts as a positive.

    Each step encodes a batch of images and all ``C x T`` captions; the loss is the mean of the
    image->caption and caption->image multi-positive cross-entropies. Returns the loss per step.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pixels = ImagePreprocessor(config.image_size)(data.to_pil())  # [N, 3, S, S], as load_backbone feeds it
    labels = torch.as_tensor(np.array(data.labels))  # a writable copy
    captions = [t.format(name) for name in data.class_names for t in config.templates]
    caption_class = torch.arange(len(data.class_names)).repeat_interleave(len(config.templates))  # [C*T]
    tok = tokenizer(
        captions, padding=True, truncation=True, max_length=config.max_text_len, return_tensors="pt"
    )
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.steps, pct_start=max(config.warmup_frac, 1e-3)
    )
    order = torch.randperm(len(labels), generator=gen)
    cursor, losses = 0, []
    bar = tqdm(range(config.steps), desc="proxy pre-training", disable=not (progress and sys.stderr.isatty()))
    for _ in bar:
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(labels), generator=gen), 0
        idx = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        x = _augment(pixels[idx], gen) if config.augment else pixels[idx]
        img = F.normalize(model.get_image_features(pixel_values=x).pooler_output, dim=-1)  # [B, D]
        txt = F.normalize(model.get_text_features(**tok).pooler_output, dim=-1)  # [C*T, D]
        logits = model.logit_scale.exp() * img @ txt.T  # [B, C*T]
        positives = labels[idx, None] == caption_class[None, :]  # [B, C*T]
        loss = 0.5 * (_multi_positive_ce(logits, positives) + _multi_positive_ce(logits.T, positives.T))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100.0))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if bar.disable and (len(losses) % 100 == 0 or len(losses) == config.steps):
            logger.info("proxy pre-training step %d/%d, loss %.3f", len(losses), config.steps, losses[-1])
    model.eval().requires_grad_(False)
    return losses


# --- Checks: how much room the shift leaves (numbers reported in dpal_core.bench.shifts) ---


def zero_shot_accuracy(backbone: Backbone, data: ImageDataset, template: str = "a photo of a {}.") -> float:
    """Accuracy of the hand prompt ``template`` on ``data`` (argmax cosine similarity)."""
    feats = encode_pil(backbone, data.to_pil(), batch_size=256)  # [N, D]
    text = encode_texts(backbone, [template.format(c) for c in data.class_names]).cpu()  # [C, D]
    return float(((feats @ text.T).argmax(1).numpy() == data.labels).mean())


def linear_probe_accuracy(
    train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray, l2: float = 1e-4
) -> float:
    """Multinomial logistic regression (L-BFGS, full batch) on features [N, D]; returns test accuracy."""
    torch.manual_seed(0)
    x, y = train_x.double(), torch.as_tensor(train_y)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # standardise: normalised embeddings are tiny per dim
    x = (x - mean) / std
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (((test_x.double() - mean) / std) @ w + b).argmax(1).numpy()
    return float((pred == test_y).mean())


def measure(path: str | Path, shift: str, seed: int = 0, l2: float = 1e-4) -> dict[str, float]:
    """Zero-shot accuracy (clean and shifted test) and the shifted linear-probe ceiling."""
    from dpal_core.bench.shifts import benchmark_splits

    backbone = load_backbone(str(path), device="cpu")
    sets = benchmark_splits(seed, shift)
    pool = encode_pil(backbone, sets["pool"].to_pil(), batch_size=256)
    test = encode_pil(backbone, sets["test"].to_pil(), batch_size=256)
    return {
        "zero_shot_clean": zero_shot_accuracy(backbone, sets["test_clean"]),
        "zero_shot_shifted": zero_shot_accuracy(backbone, sets["test"]),
        "linear_probe_shifted": linear_probe_accuracy(
            pool, sets["pool"].labels, test, sets["test"].labels, l2
        ),
    }


def main(argv: list[str] | None = None) -> None:
    import argparse

    from dpal_core.bench.shifts import DEFAULT_SHIFT, SHIFTS

    parser = argparse.ArgumentParser(description="Build the proxy backbone and measure the shifts.")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shift", action="append", choices=sorted(SHIFTS), help=f"default: {DEFAULT_SHIFT}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build_proxy(args.cache_dir, args.seed)
    info = json.loads((path / INFO_FILE).read_text())
    logger.info("proxy %s: build %.0f s, loss %.3f -> %.3f", path, info["seconds"], info["loss_first"],
                info["loss_last"])  # fmt: skip
    for shift in args.shift or [DEFAULT_SHIFT]:
        res = measure(path, shift, args.seed)
        logger.info("%-20s " + "  ".join(f"{k} {v:.3f}" for k, v in res.items()), shift)


if __name__ == "__main__":
    main()
