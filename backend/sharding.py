"""A pool too large for one worker: re-score it in shard jobs on the same RQ queue.

Design: the training job publishes the version, then enqueues one ``rescore_shard_job`` per
``shard_size`` tasks (the task ids and image URLs travel in the job, compressed by RQ) and one
``rescore_finalize_job`` that depends on all of them (``Dependency(allow_failure=True)``, so it runs
even when a shard failed for good). Any worker on any machine takes shards. Shards refresh the
project's run lock under the training job's id, and the finalize job releases it, so no other
training of the project starts while the pool is being pushed. The finalize job switches the
project's ``model_version`` only when every shard finished and the version is still the newest.

Shard jobs are retried by RQ (``Retry(max=2)``, no interval: no scheduler needed) and re-read their
chunk's tasks before each push, so a re-run never creates a prediction twice. Job ids derive from
the training job's id; a retried training job that finds its finalize job already queued does not
enqueue the shards again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from backend.lsclient import RetryPolicy
from backend.rescore import PushSpec, predictions_for, push_predictions, score_tasks
from backend.store import VersionInfo, project_key
from backend.training_defaults import JobOptions
from dpal_core.checkpoint import load_checkpoint

if TYPE_CHECKING:
    from backend.jobs import JobContext, JobProgress

log = logging.getLogger(__name__)
SHARD_JOB = "backend.jobs.rescore_shard_job"
FINALIZE_JOB = "backend.jobs.rescore_finalize_job"
SHARD_TIMEOUT_S = 3 * 3600


def shard_job_id(parent_job_id: str, index: int) -> str:
    return f"{parent_job_id}-shard-{index}"


def finalize_job_id(parent_job_id: str) -> str:
    return f"{parent_job_id}-finalize"


def enqueue_shards(
    job: Any,
    key: str,
    info: VersionInfo,
    spec: PushSpec,
    task_ids: list[int],
    urls: list[str],
    opts: JobOptions,
    parent_job_id: str,
    overrides: dict | None,
    progress: JobProgress,
) -> dict[str, Any]:
    """Enqueue the shard jobs and the finalize job; return what the training job reports."""
    from rq import Queue, Retry
    from rq.job import Dependency, Job

    from backend.queue import QUEUE_NAME

    queue = Queue(QUEUE_NAME, connection=job.connection)
    fin_id = finalize_job_id(parent_job_id)
    size = opts.shard_size
    ids = [shard_job_id(parent_job_id, i) for i in range((len(task_ids) + size - 1) // size)]
    if Job.exists(fin_id, connection=job.connection):
        log.info("project %s: shard jobs of %s already queued", key, parent_job_id)
    else:
        shards = []
        for i, start in enumerate(range(0, len(task_ids), size)):
            shards.append(
                queue.enqueue(
                    SHARD_JOB,
                    args=(
                        key,
                        info.version,
                        parent_job_id,
                        spec.to_dict(),
                        task_ids[start : start + size],
                        urls[start : start + size],
                        overrides,
                    ),
                    job_id=ids[i],
                    retry=Retry(max=2),
                    job_timeout=SHARD_TIMEOUT_S,
                    result_ttl=24 * 3600,
                    failure_ttl=7 * 24 * 3600,
                    description=f"re-score shard {i} of project {key} with v{info.version}",
                )
            )
        queue.enqueue(
            FINALIZE_JOB,
            args=(key, info.version, parent_job_id, info.model_version, ids),
            job_id=fin_id,
            depends_on=Dependency(jobs=shards, allow_failure=True),
            result_ttl=24 * 3600,
            failure_ttl=7 * 24 * 3600,
            description=f"switch project {key} to v{info.version}",
        )
    log.info("project %s: %d tasks to re-score in %d shard jobs of <= %d", key, len(task_ids), len(ids), size)
    progress.stage("rescore-shards", total=len(task_ids), shards=ids, finalize=fin_id)
    return {"shards": ids, "finalize": fin_id, "scored": 0, "to_score": len(task_ids)}


def run_shard(
    project: str,
    version: int,
    parent_job_id: str,
    spec: dict[str, Any],
    task_ids: list[int],
    urls: list[str],
    ctx: JobContext,
    job: Any,
    overrides: dict | None,
) -> dict[str, Any]:
    from backend.jobs import Heartbeat, JobProgress

    key = project_key(project)
    opts = JobOptions.from_overrides(overrides)
    push = PushSpec.from_dict(spec)
    info = ctx.store.version_info(key, version, ctx.backbone.backbone_id, ())
    model = load_checkpoint(info.path, ctx.backbone)
    progress = JobProgress(job, key)
    coord = ctx.coordinator
    beat = (lambda: coord.heartbeat(key, parent_job_id)) if coord is not None else (lambda: None)
    ls = ctx.ls_client(opts)
    try:
        with Heartbeat(beat, opts.heartbeat_s):
            beat()
            progress.stage("rescore", total=len(task_ids), version=version)
            scored = score_tasks(
                model,
                ctx.encoder,
                task_ids,
                urls,
                opts.embed_chunk,
                progress.update,
                opts.score_chunk,
                ctx.settings.predict_batch,
            )
            preds = predictions_for(scored, push, info.model_version)
            progress.stage("push", total=len(preds))
            retry = RetryPolicy(opts.http_attempts, opts.backoff_s, opts.backoff_max_s)
            pushed = push_predictions(
                ls,
                int(key),
                preds,
                info.model_version,
                opts.push_chunk,
                retry,
                progress.update,
                verify_first=True,
            )
    finally:
        ls.close()
    log.info(
        "project %s: shard of %d tasks pushed (%d created now) for %s",
        key,
        len(task_ids),
        pushed.created,
        info.model_version,
    )
    progress.stage("done")
    return {
        "project": key,
        "version": version,
        "scored": len(preds),
        "pushed": pushed.pushed,
        "created": pushed.created,
        "image_errors": len(scored.errors),
    }


def run_finalize(
    project: str,
    version: int,
    parent_job_id: str,
    model_version: str,
    shard_ids: list[str],
    ctx: JobContext,
    job: Any,
) -> dict[str, Any]:
    from rq.job import Job, JobStatus

    from backend.retrain import switch_model_version

    key = project_key(project)
    opts = JobOptions()
    ls = ctx.ls_client(opts)
    try:
        conn = job.connection if job is not None else None
        failed = [s for s in shard_ids if Job.fetch(s, connection=conn).get_status() != JobStatus.FINISHED]
        if failed:
            raise RuntimeError(
                f"project {key}: {len(failed)} of {len(shard_ids)} shard jobs of {model_version} did not finish "
                f"({', '.join(failed[:5])}); the project's model_version was not switched. Re-run the training "
                "(START_TRAINING) to push the missing predictions."
            )
        current = ls.get_project(int(key)).model_version
        switched = switch_model_version(ls, ctx.store, key, version, model_version, current, True)
        return {"project": key, "version": version, "model_version": model_version, "switched": switched}
    finally:
        ls.close()
        if ctx.coordinator is not None:
            ctx.coordinator.job_finished(key, parent_job_id)
