"""Training inputs, training and evaluation of a new version (steps 2-4 of the retrain job)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from backend.evaluation import compute_metrics, out_of_fold, plan_evaluation
from backend.labelconfig import ClassificationConfig
from backend.rescore import run_async
from backend.store import VersionInfo
from backend.training_defaults import JobOptions
from backend.trainset import TrainingSnapshot
from dpal_core.backbone import encode_images
from dpal_core.checkpoint import load_checkpoint, read_checkpoint_config
from dpal_core.config import CrossfitConfig, PromptConfig, TrainConfig
from dpal_core.crossfit import train_crossfit
from dpal_core.errors import CheckpointError
from dpal_core.model import DualPromptCLIP, ZeroShotCLIP, predict
from dpal_core.train import TrainData

if TYPE_CHECKING:
    from backend.jobs import JobContext

log = logging.getLogger(__name__)


class LabelledData:
    """Inputs of the labelled tasks whose images could be had."""

    def __init__(self, task_ids, urls, labels, features, pixels, pixel_batch: int = 64) -> None:
        self.pixel_batch = pixel_batch  # images per image-encoder pass (vpt)
        self.task_ids: list[int] = task_ids
        self.urls: list[str] = urls
        self.labels = torch.as_tensor(labels, dtype=torch.long)  # [N]
        self.features: torch.Tensor = features  # [N, D] embeddings (also for zero-shot under vpt)
        self.pixels: torch.Tensor | None = pixels  # [N, 3, S, S] for vpt

    def __len__(self) -> int:
        return len(self.task_ids)

    def train_data(self, idx: np.ndarray) -> TrainData:
        i = torch.as_tensor(idx, dtype=torch.long)
        if self.pixels is not None:
            return TrainData(self.labels[i], pixel_values=self.pixels[i])
        return TrainData(self.labels[i], features=self.features[i])

    def predict(self, model: DualPromptCLIP, idx: np.ndarray):
        i = torch.as_tensor(idx, dtype=torch.long)
        if self.pixels is not None:
            return predict(model, pixel_values=self.pixels[i], batch_size=self.pixel_batch)
        return predict(model, features=self.features[i])


def load_labelled(
    ctx: JobContext, snap: TrainingSnapshot, needs_pixels: bool, opts: JobOptions, progress
) -> tuple[LabelledData, dict[int, str]]:
    """Embeddings (through the cache) or pixels of the labelled tasks; failures are left out."""
    enc = ctx.encoder
    keep: list[int] = []
    feats: list[torch.Tensor] = []
    pix: list[torch.Tensor] = []
    errors: dict[int, str] = {}
    n = snap.n_labelled
    for start in range(0, n, opts.embed_chunk):
        ids = snap.task_ids[start : start + opts.embed_chunk]
        urls = snap.urls[start : start + opts.embed_chunk]
        if needs_pixels:
            px = run_async(enc, enc.pixels(urls, ids))
            good = np.flatnonzero(px.ok)
            if len(good):
                pix.append(px.pixel_values)
                batch = ctx.settings.predict_batch
                feats.extend(  # raw embeddings too: zero-shot CLIP is the refusal baseline
                    encode_images(ctx.backbone, px.pixel_values[b : b + batch]).cpu()
                    for b in range(0, len(px.pixel_values), batch)
                )
            errs = px.errors
        else:
            emb = enc.embed_sync(urls, ids)
            good = np.flatnonzero(emb.ok)
            feats.append(torch.from_numpy(emb.vectors[good]))
            errs = emb.errors
        keep.extend(start + int(g) for g in good)
        errors.update({ids[i]: e for i, e in errs.items()})
        progress.update(min(n, start + opts.embed_chunk), n)
    dim = ctx.backbone.embed_dim
    data = LabelledData(
        [snap.task_ids[i] for i in keep],
        [snap.urls[i] for i in keep],
        [snap.labels[i] for i in keep],
        torch.cat(feats) if feats else torch.empty(0, dim),
        torch.cat(pix) if pix else None,
        ctx.settings.predict_batch,
    )
    return data, errors


def cached_pool(ctx: JobContext, snap: TrainingSnapshot, size: int, seed: int) -> torch.Tensor | None:
    """[U, D] cached embeddings of up to ``size`` unlabelled tasks (a seeded sample), or None.

    Only the embedding cache is read: the pool term of cross-fitting never downloads an image.
    Pool images get cached when Label Studio asks for predictions and at every re-score.
    """
    urls = snap.pool_urls
    if not urls or size == 0:
        return None
    pick = np.sort(np.random.default_rng(seed).choice(len(urls), min(size, len(urls)), replace=False))
    vectors, found = ctx.encoder.cache.get([urls[i] for i in pick])
    return torch.from_numpy(np.ascontiguousarray(vectors[found])) if found.any() else None


def stored_metadata(info: VersionInfo) -> dict[str, Any]:
    """The metadata stored with a published version ({} for version 0 or an unreadable one)."""
    if info.path is None:
        return {}
    try:
        return read_checkpoint_config(info.path).get("metadata", {})
    except CheckpointError:
        return {}


def fit_and_evaluate(
    ctx: JobContext,
    cfg: ClassificationConfig,
    data: LabelledData,
    pcfg: PromptConfig,
    tcfg: TrainConfig,
    xcfg: CrossfitConfig,
    opts: JobOptions,
    current: VersionInfo,
    progress,
    pool: torch.Tensor | None = None,
) -> tuple[DualPromptCLIP, dict[str, Any], int | None]:
    """Train the version to publish and measure it on held-out annotations.

    Every fit (evaluation folds included) is cross-fitted as ``xcfg`` says, with ``pool`` [U, D]
    (cached embeddings of unlabelled tasks) for its pool term.

    Returns:
        (model, metrics, version warm-started from or None).
    """
    n = len(data)
    labels = data.labels.numpy()
    plan = plan_evaluation(labels, opts, seed=tcfg.seed)
    warm_from = current.version if (opts.warm_start and current.path is not None) else None

    def fit(idx: np.ndarray, warm: bool) -> tuple[DualPromptCLIP, float]:
        model = None
        if warm and warm_from is not None:
            try:
                model = load_checkpoint(current.path, ctx.backbone, cfg.class_names)
                if model.config != pcfg:
                    model = None  # another prompt shape: start afresh
            except CheckpointError as exc:
                log.warning("warm start from version %s impossible (%s); re-initialising", warm_from, exc)
        model = model or DualPromptCLIP(ctx.backbone, cfg.class_names, pcfg)
        report = train_crossfit(model, data.train_data(idx), tcfg, xcfg, pool=pool)
        return model, report.final_loss

    zs = predict(ZeroShotCLIP(ctx.backbone, cfg.class_names), features=data.features).pred.numpy()
    start = time.perf_counter()
    if plan.method == "kfold":
        progress.stage("evaluate", total=len(plan.folds), method=plan.name)
        done = [0]

        def fit_predict(tr: np.ndarray, ev: np.ndarray):
            m, _ = fit(tr, warm=False)
            p = data.predict(m, ev)
            done[0] += 1
            progress.update(done[0])
            return p.pred.numpy(), p.p_clean.numpy()

        ev_idx, pred, clean = out_of_fold(plan, n, fit_predict)
        progress.stage("train", total=n)
        model, loss = fit(np.arange(n), warm=True)
        n_train = n
    elif plan.method == "holdout":
        progress.stage("train", total=n, method=plan.name)
        tr, ev_idx = plan.train_indices(n), plan.folds[0]
        model, loss = fit(tr, warm=True)
        p = data.predict(model, ev_idx)
        pred, clean = p.pred.numpy(), p.p_clean.numpy()
        n_train = len(tr)
    else:
        progress.stage("train", total=n, method="none")
        model, loss = fit(np.arange(n), warm=True)
        ev_idx, pred, clean = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), np.empty(0)
        n_train = n
    metrics = compute_metrics(pred, clean, labels[ev_idx], zs[ev_idx])
    train_idx = plan.train_indices(n) if plan.method == "holdout" else np.arange(n)
    counts = Counter(labels[train_idx].tolist())
    metrics.update(
        method=plan.name,
        n_train=int(n_train),
        final_loss=float(loss),
        train_seconds=round(time.perf_counter() - start, 2),
        per_class={cfg.labels[c]: int(counts.get(c, 0)) for c in range(cfg.num_classes)},
    )
    return model, metrics, warm_from


def baseline_for(current: VersionInfo, metrics: dict[str, Any]) -> tuple[dict | None, str]:
    """The figures a new version is compared with, and what they belong to (refusal rule)."""
    if current.version and current.metrics:
        return current.metrics, f"served version {current.version}"
    if metrics.get("zero_shot_accuracy") is not None:
        return {"accuracy": metrics["zero_shot_accuracy"], "n_eval": metrics["n_eval"]}, "zero-shot CLIP"
    return None, ""
