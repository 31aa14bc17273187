"""The retrain job that ``dpal worker`` (RQ, queue ``dpal``) and the embedded queue run.

Entry points (RQ imports them by path; they carry only ids):

- :func:`train_project_job` ``(project)`` — the job the backend enqueues for a project;
- :func:`rescore_shard_job` / :func:`rescore_finalize_job` — re-scoring of a large pool, split into
  shard jobs on the same queue (see :mod:`backend.sharding`).

:func:`run_coordinated` wraps :func:`backend.retrain.run_training` (steps 1-7) in the project's run
lock: a second job for a project that is already training exits quietly and leaves one follow-up
run recorded, a background thread refreshes the lock, and the lock is released however the job
ends (a killed worker's lock expires by its TTL). The embedded queue of the server calls
:func:`run_coordinated` with the server's own :class:`JobContext`, so the backbone is loaded once.

Faults (what survives what):
- worker killed mid-training: nothing was published (a version folder appears whole, by rename,
  and only then is the pointer switched); the lock expires; RQ retries the job (same job id, which
  re-takes its own lock) or the next trigger re-runs it, training on the same annotations.
- worker killed mid-push: the version is published whole; Label Studio's project ``model_version``
  still names the previous version, whose predictions are complete. A re-run finds the stored
  annotation fingerprint unchanged, skips training and pushes only to tasks that have no prediction
  of the version yet, then switches the project.
- Label Studio down or 5xx: every call retries with backoff; then the job fails with the reason.
  Before publishing nothing is written; after, the project is not switched until the push is whole.
- Redis restarted: queued jobs and flags are gone; annotations live in Label Studio, so the next
  annotation or START_TRAINING enqueues a run that trains on all of them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backend.embeddings import TaskImageEncoder
from backend.lsclient import LabelStudioClient, RetryPolicy
from backend.media import FetchPolicy, MediaFetcher
from backend.settings import Settings
from backend.store import ModelStore, project_key
from backend.training_defaults import JobOptions
from dpal_core.backbone import Backbone, load_backbone
from dpal_core.cache import EmbeddingCache

if TYPE_CHECKING:
    from backend.queue import Coordinator

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class JobContext:
    """What a job needs, built once per process (the backbone is the expensive part)."""

    settings: Settings
    backbone: Backbone
    encoder: TaskImageEncoder  # the job's own cache connection and HTTP fetcher
    store: ModelStore
    coordinator: Coordinator | None  # None: no run lock (one-off runs, tests)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, backbone: Backbone | None = None, coordinator: Coordinator | None = None
    ) -> JobContext:
        """Build a context; pass the server's ``backbone`` and ``coordinator`` in embedded mode.

        Without a ``coordinator`` one is made for ``REDIS_URL`` when it is set.
        """
        backbone = backbone or shared_backbone(settings)
        cache = EmbeddingCache(settings.cache_dir, backbone.backbone_id, backbone.embed_dim)
        fetcher = MediaFetcher(FetchPolicy.from_settings(settings))
        encoder = TaskImageEncoder(
            backbone,
            cache,
            fetcher,
            batch_size=settings.predict_batch,
            concurrency=settings.fetch_concurrency,
        )
        if coordinator is None and settings.redis_url:
            from backend.queue import RedisCoordinator

            coordinator = RedisCoordinator(settings.redis_url, settings.train_threshold)
        return cls(settings, backbone, encoder, ModelStore(settings.model_dir), coordinator)

    def ls_client(self, options: JobOptions) -> LabelStudioClient:
        retry = RetryPolicy(options.http_attempts, options.backoff_s, options.backoff_max_s)
        return LabelStudioClient.from_settings(self.settings, timeout_s=options.http_timeout_s, retry=retry)


_BACKBONES: dict[tuple[str, str], Backbone] = {}
_CONTEXTS: dict[tuple[Settings, int], JobContext] = {}
_EMBEDDED: weakref.WeakKeyDictionary[Any, JobContext] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def shared_backbone(settings: Settings) -> Backbone:
    """The backbone of ``DPAL_MODEL`` on ``DPAL_DEVICE``, loaded once per process."""
    key = (settings.model, settings.device)
    with _LOCK:
        if key not in _BACKBONES:
            device = None if settings.device == "auto" else settings.device
            _BACKBONES[key] = load_backbone(settings.model, device=device)
        return _BACKBONES[key]


def worker_context(settings: Settings | None = None) -> JobContext:
    """The worker process's context for its settings (read from the environment by default).

    Keyed by process id too: a work-horse forked by RQ reuses the backbone its parent preloaded
    (copy-on-write) but opens its own embedding-cache connection, Redis client and HTTP clients,
    since none of those may be shared across a fork.
    """
    settings = settings or Settings.from_env()
    key = (settings, os.getpid())
    with _LOCK:
        ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = JobContext.from_settings(settings)
        with _LOCK:
            ctx = _CONTEXTS.setdefault(key, ctx)
    return ctx


def run_embedded_job(
    project: str, job_id: str, service: Any, overrides: dict | None = None
) -> dict[str, Any]:
    """What the server's embedded queue runs (no REDIS_URL): the job on the server's own backbone.

    ``service`` is the server's ``DPALModel``; its backbone and coordinator are reused, the
    embedding cache connection and the image fetcher are the job's own (they are not thread-safe).
    """
    ctx = _EMBEDDED.get(service)
    if ctx is None:
        backbone = service.holder.get(timeout=None)
        ctx = JobContext.from_settings(service.settings, backbone=backbone, coordinator=service.coordinator)
        _EMBEDDED[service] = ctx
    return run_coordinated(project, ctx, job_id, overrides=overrides)


class JobProgress:
    """Stage and done/total in the RQ job's meta (``dpal status`` reads it) and in the log."""

    def __init__(self, job: Any, project: str, min_interval_s: float = 0.5) -> None:
        self.job = job
        self.project = project
        self.min_interval_s = min_interval_s
        self._saved = 0.0

    def stage(self, name: str, total: int = 0, **extra: Any) -> None:
        log.info("project %s: stage %s%s", self.project, name, f" ({total})" if total else "")
        self._set(stage=name, done=0, total=int(total), **extra)
        self._save(force=True)

    def update(self, done: int, total: int | None = None) -> None:
        self._set(done=int(done), **({"total": int(total)} if total is not None else {}))
        self._save()

    def _set(self, **values: Any) -> None:
        if self.job is not None:
            self.job.meta.update(values, updated_at=time.time())

    def _save(self, force: bool = False) -> None:
        if self.job is None:
            return
        now = time.monotonic()
        if force or now - self._saved >= self.min_interval_s:
            self._saved = now
            try:
                self.job.save_meta()
            except Exception as exc:  # noqa: BLE001 - progress must never fail a job
                log.debug("could not save job meta: %s", exc)


class Heartbeat:
    """Calls ``beat`` every ``every_s`` seconds on a daemon thread while the ``with`` block runs."""

    def __init__(self, beat: Callable[[], Any], every_s: float) -> None:
        self._beat = beat
        self._every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dpal-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._beat()
            except Exception as exc:  # noqa: BLE001 - a missed beat only shortens the lock
                log.warning("run-lock heartbeat failed: %s", exc)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_coordinated(
    project: Any, ctx: JobContext, job_id: str, job: Any = None, overrides: dict | None = None
) -> dict[str, Any]:
    """Run the retrain of ``project`` under its run lock (what the RQ job and the embedded queue call)."""
    from backend.retrain import run_training

    key = project_key(project)
    coord = ctx.coordinator
    options = JobOptions.from_overrides(overrides)
    if coord is not None and not coord.job_started(key, job_id):
        log.info(
            "project %s: job %s not run: another job holds the run lock (a follow-up is due)", key, job_id
        )
        JobProgress(job, key).stage("skipped")
        return {"status": "skipped", "project": key, "reason": "another job for this project is running"}
    handed_over = False
    try:
        beat = (lambda: coord.heartbeat(key, job_id)) if coord is not None else (lambda: None)
        with Heartbeat(beat, options.heartbeat_s):
            result = run_training(key, ctx, job=job, overrides=overrides, job_id=job_id)
        handed_over = bool(result.get("rescore", {}).get("shards"))  # the finalize job releases the lock
        return result
    finally:
        if coord is not None and not handed_over:
            if coord.job_finished(key, job_id):
                log.info("project %s: annotations arrived during the run; a follow-up run is queued", key)


def _current_job() -> Any:
    try:
        from rq import get_current_job

        return get_current_job()
    except Exception:  # noqa: BLE001 - outside a worker there is no job
        return None


def train_project_job(project: str, overrides: dict | None = None) -> dict[str, Any]:
    """RQ job: retrain ``project``, publish, re-score its pool. ``overrides``: tests and benchmarks only."""
    job = _current_job()
    job_id = job.id if job is not None else f"dpal-local-{uuid.uuid4().hex[:12]}"
    return run_coordinated(project, worker_context(), job_id, job, overrides)


def rescore_shard_job(
    project: str,
    version: int,
    parent_job_id: str,
    spec: dict[str, Any],
    task_ids: list[int],
    urls: list[str],
    overrides: dict | None = None,
) -> dict[str, Any]:
    """RQ job: re-score one shard of a large pool with ``version`` and push it (no project switch)."""
    from backend.sharding import run_shard

    return run_shard(
        project, version, parent_job_id, spec, task_ids, urls, worker_context(), _current_job(), overrides
    )


def rescore_finalize_job(
    project: str, version: int, parent_job_id: str, model_version: str, shard_ids: list[str]
) -> dict[str, Any]:
    """RQ job: after every shard, switch the project's model_version and release the run lock."""
    from backend.sharding import run_finalize

    return run_finalize(
        project, version, parent_job_id, model_version, shard_ids, worker_context(), _current_job()
    )


def run_training(
    project: Any, ctx: JobContext, job: Any = None, overrides: dict | None = None
) -> dict[str, Any]:
    """Steps 1-7 without the run lock (see :func:`backend.retrain.run_training`)."""
    from backend.retrain import run_training as _run

    return _run(project_key(project), ctx, job=job, overrides=overrides)
