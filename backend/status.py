"""``dpal status PROJECT`` and the server's version listing: versions, their figures, running jobs."""

from __future__ import annotations

import json
from typing import Any

from backend.settings import Settings
from backend.store import ModelStore, StoreError, project_key
from dpal_core.checkpoint import read_checkpoint_config
from dpal_core.errors import CheckpointError

_METRIC_ORDER = ("method", "n_train", "n_eval", "accuracy", "error_auroc", "ece", "zero_shot_accuracy")


def versions_payload(store: ModelStore, project: Any) -> dict[str, Any]:
    """Every published version of ``project`` with its stored figures (JSON-able)."""
    key = project_key(project)
    current = store.current_version(key)
    out = []
    for v in store.versions(key):
        try:
            cfg = read_checkpoint_config(store.project_dir(key) / "versions" / str(v))
        except CheckpointError as exc:
            out.append({"version": v, "error": str(exc)})
            continue
        info = store.version_info(key, v, cfg["backbone_id"], tuple(cfg["class_names"]))
        meta = cfg.get("metadata", {})
        out.append(
            {
                "version": v,
                "model_version": info.model_version,
                "current": v == current,
                "created_at": meta.get("created_at"),
                "job_id": meta.get("job_id"),
                "classes": list(info.class_names),
                "metrics": info.metrics,
            }
        )
    return {"project": key, "current_version": current, "versions": out}


def _job_line(job_id: str, redis_url: str) -> str:
    try:
        from redis import Redis
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        job = Job.fetch(job_id, connection=Redis.from_url(redis_url, socket_timeout=5))
    except NoSuchJobError:
        return f"{job_id} (gone from Redis)"
    except Exception as exc:  # noqa: BLE001 - status must print what it can
        return f"{job_id} (cannot read: {type(exc).__name__})"
    meta = job.get_meta()
    stage = meta.get("stage", "?")
    done, total = meta.get("done"), meta.get("total")
    frac = f" {done}/{total}" if total else ""
    line = f"{job_id} [{job.get_status()}] stage {stage}{frac}"
    for shard in meta.get("shards") or []:
        line += "\n    " + _job_line(shard, redis_url)
    return line


def format_status(project: Any, settings: Settings) -> str:
    """Human-readable status of ``project``: current version and figures, queued/running jobs."""
    key = project_key(project)
    store = ModelStore(settings.model_dir)
    lines = [f"project {key}"]
    try:
        payload = versions_payload(store, key)
    except StoreError as exc:
        return f"project {key}: {exc}"
    current = next((v for v in payload["versions"] if v.get("current")), None)
    if current is None:
        lines.append("  served: version 0 (zero-shot CLIP; no version published yet)")
    else:
        lines.append(
            f"  served: version {current['version']} ({current['model_version']}), "
            f"published {current.get('created_at') or '?'}"
        )
        metrics = current.get("metrics") or {}
        shown = [f"{k}={metrics[k]}" for k in _METRIC_ORDER if k in metrics]
        lines.append("  metrics: " + (", ".join(shown) if shown else "none stored"))
        if metrics.get("per_class"):
            lines.append("  per class: " + json.dumps(metrics["per_class"]))
    lines.append(f"  versions on disk: {', '.join(str(v['version']) for v in payload['versions']) or 'none'}")
    if not settings.redis_url:
        lines.append(f"  jobs: embedded queue (no REDIS_URL); ask the running server (GET /versions/{key})")
        return "\n".join(lines)
    try:
        from backend.queue import RedisCoordinator

        st = RedisCoordinator(settings.redis_url, settings.train_threshold).status(key)
    except Exception as exc:  # noqa: BLE001 - Redis down: say so, do not crash
        lines.append(f"  jobs: Redis unreachable ({type(exc).__name__})")
        return "\n".join(lines)
    lines.append(f"  pending annotations: {st.get('pending', 0)} (threshold {st.get('threshold')})")
    for label in ("running", "queued"):
        job_id = st.get(label)
        lines.append(f"  {label}: " + (_job_line(job_id, settings.redis_url) if job_id else "none"))
    if st.get("followup"):
        lines.append("  a follow-up run is due when the running job ends")
    return "\n".join(lines)
