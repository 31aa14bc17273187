"""Steps 1-6 of the retrain job: fetch, embed, train + evaluate, publish, re-score and push.

The training and evaluation pieces live in :mod:`backend.fitting`, re-scoring in :mod:`backend.rescore`.

Called by :func:`backend.jobs.run_coordinated` under the project's run lock.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from backend.evaluation import refusal_reason
from backend.fitting import baseline_for, cached_pool, fit_and_evaluate, load_labelled, stored_metadata
from backend.labelconfig import parse_label_config
from backend.lsclient import LabelStudioClient, RetryPolicy
from backend.rescore import PushSpec, predictions_for, push_predictions, score_tasks
from backend.store import ModelStore, VersionInfo
from backend.training_defaults import JobOptions, crossfit_config, prompt_config, train_config
from backend.trainset import TrainingSnapshot, build_snapshot, fingerprint
from dpal_core.backbone import Backbone
from dpal_core.checkpoint import load_checkpoint
from dpal_core.config import PromptConfig
from dpal_core.model import DualPromptCLIP
from dpal_core.prompts import max_context_tokens

if TYPE_CHECKING:
    from backend.jobs import JobContext, JobProgress

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job cannot go on; the message says why (it becomes the failed RQ job's reason)."""


@dataclass
class JobRun:
    """One run of the job: what every step needs."""

    ctx: JobContext
    ls: LabelStudioClient
    key: str  # project id as a string
    opts: JobOptions
    progress: JobProgress
    job: Any = None  # the RQ job (None: embedded queue or a direct call)
    job_id: str | None = None
    overrides: dict | None = None

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.opts.http_attempts, self.opts.backoff_s, self.opts.backoff_max_s)


def fit_context(pcfg: PromptConfig, backbone: Backbone, names: Sequence[str], explicit: bool) -> PromptConfig:
    """``pcfg`` with as many context tokens as the text encoder has room for next to every name.

    The default (16) fits real CLIP's 77 positions with room to spare; a short text encoder (the
    proxy stand-in has 16 positions) or very long class names get fewer, with a warning, unless
    the count was set explicitly, which then must fit.
    """
    room = max_context_tokens(backbone.model, backbone.tokenizer, names)
    if pcfg.n_ctx <= room:
        return pcfg
    if explicit or room < 1:
        raise JobError(
            f"{pcfg.n_ctx} context tokens do not fit the text encoder next to the longest class name "
            f"(room for {max(room, 0)}); shorten the class names or use a backbone with longer text input"
        )
    log.warning("text encoder has room for %d context tokens, not %d: using %d", room, pcfg.n_ctx, room)
    return replace(pcfg, n_ctx=room)


def run_training(
    key: str, ctx: JobContext, job: Any = None, overrides: dict | None = None, job_id: str | None = None
) -> dict[str, Any]:
    """Steps 1-6 for project ``key``. Returns a JSON-able summary (the RQ job's result)."""
    from backend.jobs import JobProgress

    t0 = time.perf_counter()
    opts = JobOptions.from_overrides(overrides)
    run = JobRun(ctx, ctx.ls_client(opts), key, opts, JobProgress(job, key), job, job_id, overrides)
    try:
        summary = _run(run)
    finally:
        run.ls.close()
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    run.progress.stage(summary["status"] if summary["status"] in ("refused", "no_annotations") else "done")
    return summary


def _run(run: JobRun) -> dict[str, Any]:
    ctx, key, opts, progress = run.ctx, run.key, run.opts, run.progress
    # 1. label config and annotations
    progress.stage("fetch")
    project = run.ls.get_project(int(key))
    cfg = parse_label_config(project.label_config)
    snap = build_snapshot(run.ls.list_tasks(int(key), opts.page_size, lambda n, _t: progress.update(n)), cfg)
    log.info("project %s: %s", key, snap.report())
    if snap.unknown_labels:
        log.warning(
            "project %s: %d annotations carry labels outside the label config and were skipped: %s",
            key,
            sum(snap.unknown_labels.values()),
            dict(snap.unknown_labels),
        )
    summary: dict[str, Any] = {"project": key, "annotations": snap.report()}
    if snap.n_labelled == 0:
        log.info("project %s: no usable annotations; nothing to train", key)
        return {**summary, "status": "no_annotations"}

    pcfg, tcfg, xcfg = prompt_config(ctx.settings, opts), train_config(ctx.settings, opts), crossfit_config(opts)
    pcfg = fit_context(pcfg, ctx.backbone, cfg.class_names, explicit="n_ctx" in opts.prompt)
    current = ctx.store.current(key, ctx.backbone.backbone_id, cfg.class_names)

    # 2. embeddings (cached) or pixels
    progress.stage("embed", total=snap.n_labelled)
    data, errors = load_labelled(ctx, snap, pcfg.paradigm.value == "vpt", opts, progress)
    summary["image_errors"] = len(errors)
    if errors:
        first = next(iter(errors.items()))
        log.warning("project %s: %d labelled images unusable (task %s: %s)", key, len(errors), *first)
    if len(data) == 0:
        raise JobError(
            f"project {key}: none of the {snap.n_labelled} labelled images could be fetched "
            f"(task {next(iter(errors))}: {next(iter(errors.values()))})"
        )
    pairs = sorted(zip(data.task_ids, data.urls, data.labels.tolist(), strict=True))
    fp = fingerprint(
        [
            ctx.backbone.backbone_id,
            cfg.labels,
            cfg.class_names,
            pcfg.to_dict(),
            repr(tcfg),
            repr(xcfg),
            opts.warm_start,
            pairs,
        ]
    )

    if current.version and stored_metadata(current).get("fingerprint") == fp:
        # 3-5 were done by an earlier run on the same annotations (killed or failed while pushing).
        log.info("project %s: annotations unchanged since version %d; re-scoring only", key, current.version)
        info, status = current, "unchanged"
        model = load_checkpoint(current.path, ctx.backbone, cfg.class_names)
        summary["metrics"] = current.metrics
    else:
        # 3-4. train and evaluate
        use_pool = xcfg.enabled and xcfg.pool_weight > 0 and data.pixels is None
        pool = cached_pool(ctx, snap, xcfg.pool_size, tcfg.seed) if use_pool else None
        summary["crossfit_pool"] = 0 if pool is None else len(pool)
        model, metrics, warm_from = fit_and_evaluate(
            ctx, cfg, data, pcfg, tcfg, xcfg, opts, current, progress, pool
        )
        baseline, name = baseline_for(current, metrics)
        reason = refusal_reason(metrics, baseline, name, opts)
        if not math.isfinite(metrics["final_loss"]):
            metrics["final_loss"] = None
        summary["metrics"] = metrics
        log.info("project %s: evaluation %s", key, metrics)
        if reason:
            log.warning("project %s: new version refused: %s", key, reason)
            progress.stage("refused", reason=reason)
            return {**summary, "status": "refused", "reason": reason, "served_version": current.version}
        # 5. publish (atomic: the folder appears by rename, then the pointer by os.replace)
        progress.stage("publish")
        metadata = {
            "metrics": metrics,
            "fingerprint": fp,
            "job_id": run.job_id,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "warm_start_from": warm_from,
            "train_config": repr(tcfg),
            "crossfit_config": repr(xcfg),
            "annotations": snap.report(),
        }
        info, status = ctx.store.publish(key, model, metadata), "published"
        log.info("project %s: published version %d (%s)", key, info.version, info.model_version)
    summary.update(status=status, version=info.version, model_version=info.model_version)

    # 6. re-score the pool and push
    spec = PushSpec(cfg.from_name, cfg.to_name, cfg.labels)
    summary["rescore"] = rescore_pool(run, info, model, spec, snap, project.model_version)
    return summary


def rescore_pool(
    run: JobRun,
    info: VersionInfo,
    model: DualPromptCLIP,
    spec: PushSpec,
    snap: TrainingSnapshot,
    ls_current: str,
) -> dict[str, Any]:
    """Re-score the unlabelled tasks lacking a prediction of this version; push; switch the project."""
    ctx, key, opts, progress = run.ctx, run.key, run.opts, run.progress
    mv = info.model_version
    todo = [i for i, t in enumerate(snap.pool) if mv not in t.prediction_versions]
    ids = [snap.pool[i].id for i in todo]
    urls = [snap.pool_urls[i] for i in todo]
    already = len(snap.pool) - len(todo)
    if len(ids) > opts.shard_size and run.job is not None and ctx.settings.redis_url and run.job_id:
        from backend.sharding import enqueue_shards

        return enqueue_shards(run.job, key, info, spec, ids, urls, opts, run.job_id, run.overrides, progress)
    progress.stage("rescore", total=len(ids), version=info.version)
    scored = score_tasks(
        model,
        ctx.encoder,
        ids,
        urls,
        opts.embed_chunk,
        progress.update,
        opts.score_chunk,
        ctx.settings.predict_batch,
    )
    preds = predictions_for(scored, spec, mv)
    log.info(
        "project %s: re-scored %d tasks with %s (%d images fetched, %d failed)",
        key,
        len(preds),
        mv,
        scored.fetched,
        len(scored.errors),
    )
    progress.stage("push", total=len(preds))
    pushed = push_predictions(run.ls, int(key), preds, mv, opts.push_chunk, run.retry, progress.update)
    log.info(
        "project %s: pushed %d predictions of %s (%d found already there after a failed call)",
        key,
        pushed.pushed,
        mv,
        pushed.found,
    )
    switched = switch_model_version(
        run.ls, ctx.store, key, info.version, mv, ls_current, already + len(preds) > 0
    )
    return {
        "pool": len(snap.pool),
        "already_predicted": already,
        "scored": len(preds),
        "pushed": pushed.pushed,
        "found_after_failure": pushed.found,
        "fetched": scored.fetched,
        "image_errors": len(scored.errors),
        "switched": switched,
    }


def switch_model_version(
    ls: LabelStudioClient,
    store: ModelStore,
    key: str,
    version: int,
    mv: str,
    ls_current: str,
    has_predictions: bool,
) -> bool:
    """PATCH the project's model_version to ``mv`` unless a newer version was published meanwhile.

    Label Studio refuses a model_version that no prediction carries, so a project without any
    unlabelled task keeps its selection.
    """
    if store.current_version(key) != version:
        log.warning(
            "project %s: version %d is no longer the newest; model_version not switched", key, version
        )
        return False
    if ls_current == mv:
        return True
    if not has_predictions:
        log.info("project %s: no unlabelled task carries %s; model_version left at %r", key, mv, ls_current)
        return False
    ls.set_model_version(int(key), mv)
    log.info("project %s: model_version switched from %r to %s", key, ls_current, mv)
    return True
