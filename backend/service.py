"""The model behind the HTTP endpoints, in label-studio-ml's shape: ``setup`` / ``predict`` / ``fit``.

- The backbone is loaded once per process, in the background, so ``/setup`` answers within Label
  Studio's 3 s timeout (it only validates the config and reads the store).
- The served model is looked up per request from the store's ``current`` pointer; when a worker
  publishes a new version, the next request loads it and swaps the cached entry in one assignment.
  Models are never mutated in place, so a request in flight keeps the model it started with.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from backend.embeddings import TaskImageEncoder
from backend.labelconfig import ClassificationConfig, LabelConfigError, parse_label_config, task_image_url
from backend.media import FetchPolicy, MediaFetcher
from backend.queue import Coordinator, Outcome
from backend.settings import Settings
from backend.store import ModelStore, VersionInfo, project_key, version_string
from dpal_core.backbone import Backbone, backbone_identity, load_backbone
from dpal_core.cache import EmbeddingCache
from dpal_core.checkpoint import load_checkpoint
from dpal_core.model import DualPromptCLIP, Scores, ZeroShotCLIP, make_scorer, predict

log = logging.getLogger(__name__)

TRAINING_EVENTS = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"}
START_TRAINING = "START_TRAINING"


class BackboneNotReady(RuntimeError):
    """The backbone is still loading (or failed to load); the message says which."""


@lru_cache(maxsize=64)
def _parse_cached(xml_hash: str, xml: str) -> ClassificationConfig:
    return parse_label_config(xml)


def parse_config(xml: str) -> ClassificationConfig:
    """Parse a label config once per distinct text (Label Studio resends it with every request)."""
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config is empty")
    return _parse_cached(hashlib.sha256(xml.encode()).hexdigest(), xml)


@dataclass(frozen=True)
class ServedModel:
    info: VersionInfo
    model: DualPromptCLIP | ZeroShotCLIP
    stamp: tuple[int, int] | None
    scorer: Callable[..., Scores]  # text features computed once per loaded version


class BackboneHolder:
    """Loads the backbone once, on a background thread, and hands it out when ready."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ready = threading.Event()
        self._backbone: Backbone | None = None
        self._error: str | None = None
        self._thread = threading.Thread(target=self._load, name="dpal-backbone-loader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _load(self) -> None:
        start = time.perf_counter()
        try:
            device = None if self.settings.device == "auto" else self.settings.device
            self._backbone = load_backbone(self.settings.model, device=device)
            log.info("backbone %s loaded in %.1fs", self._backbone.backbone_id, time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - reported through /health and every predict
            self._error = str(exc)
            log.error("backbone could not be loaded: %s", exc)
        finally:
            self._ready.set()

    def get(self, timeout: float | None = None) -> Backbone:
        if not self._ready.wait(timeout):
            raise BackboneNotReady(
                f"the CLIP backbone {self.settings.model!r} is still loading; retry shortly"
            )
        if self._backbone is None:
            raise BackboneNotReady(f"the CLIP backbone could not be loaded: {self._error}")
        return self._backbone

    @property
    def state(self) -> str:
        if not self._ready.is_set():
            return "loading"
        return "ready" if self._backbone is not None else "failed"

    @property
    def error(self) -> str | None:
        return self._error


class DPALModel:
    """Predictions with explicit uncertainty for Label Studio, and retraining triggers."""

    def __init__(self, settings: Settings, coordinator: Coordinator | None = None) -> None:
        self.settings = settings
        self.store = ModelStore(settings.model_dir)
        self.backbone_id = backbone_identity(settings.model)
        self.holder = BackboneHolder(settings)
        self.coordinator = coordinator
        self.fetcher = MediaFetcher(FetchPolicy.from_settings(settings))
        self._encoder: TaskImageEncoder | None = None
        self._encoder_lock = threading.Lock()
        self._served: dict[str, ServedModel] = {}
        self._served_lock = threading.Lock()
        self.counters: Counter[str] = Counter()

    def start(self) -> None:
        self.holder.start()

    # ---- setup -----------------------------------------------------------------------------

    def setup(self, project: Any, schema: str) -> str:
        """Validate the label config; return the model version that will be served. No model load."""
        cfg = parse_config(schema)
        info = self.store.current(project_key(project), self.backbone_id, cfg.class_names)
        return info.model_version

    # ---- predict ---------------------------------------------------------------------------

    def encoder(self) -> TaskImageEncoder:
        with self._encoder_lock:
            if self._encoder is None:
                backbone = self.holder.get(timeout=60)
                cache = EmbeddingCache(self.settings.cache_dir, backbone.backbone_id, backbone.embed_dim)
                self._encoder = TaskImageEncoder(
                    backbone,
                    cache,
                    self.fetcher,
                    self.settings.predict_batch,
                    self.settings.fetch_concurrency,
                )
            return self._encoder

    def served_model(self, project: str, cfg: ClassificationConfig) -> ServedModel:
        """The model for the project's current version; reloaded only when the pointer changed."""
        backbone = self.holder.get(timeout=60)
        stamp = self.store.pointer_stamp(project)
        cached = self._served.get(project)
        if cached and cached.stamp == stamp and cached.info.class_names == cfg.class_names:
            return cached
        info = self.store.current(project, backbone.backbone_id, cfg.class_names)
        if info.version == 0:
            model: DualPromptCLIP | ZeroShotCLIP = ZeroShotCLIP(backbone, cfg.class_names)
        else:
            model = load_checkpoint(info.path, backbone, cfg.class_names)
        served = ServedModel(info, model, stamp, make_scorer(model))
        with self._served_lock:
            self._served[project] = served  # one assignment: requests in flight keep the old one
        log.info("project %s: serving %s", project, info.model_version)
        return served

    async def predict(self, tasks: list[dict[str, Any]], project: Any, label_config: str) -> dict[str, Any]:
        """One result per task, in order; a task whose image fails gets an empty result."""
        cfg = parse_config(label_config)
        key = project_key(project) if project not in (None, "") else "0"
        served = self.served_model(key, cfg)
        version = served.info.model_version
        results: list[dict[str, Any]] = [{"result": [], "model_version": version} for _ in tasks]
        positions, urls, ids = [], [], []
        for i, task in enumerate(tasks):
            try:
                urls.append(task_image_url(task, cfg))
                positions.append(i)
                ids.append(task.get("id"))
            except ValueError as exc:
                log.warning("task %s: %s", task.get("id"), exc)
                self.counters["tasks_failed"] += 1
        if not positions:
            return {"results": results, "model_version": version}
        encoder = self.encoder()
        if getattr(served.model, "needs_pixels", False):
            px = await encoder.pixels(urls, ids)
            ok, errors = px.ok, px.errors
            pred = (
                predict(served.model, pixel_values=px.pixel_values, scorer=served.scorer)
                if ok.any()
                else None
            )
        else:
            emb = await encoder.embed(urls, ids)
            ok, errors = emb.ok, emb.errors
            pred = (
                predict(served.model, features=torch.from_numpy(emb.vectors[ok]), scorer=served.scorer)
                if ok.any()
                else None
            )
        self.counters["tasks_failed"] += len(errors)
        if pred is not None:
            good = np.flatnonzero(ok)
            for row, j in enumerate(good):
                label = cfg.label_for(int(pred.pred[row]))
                results[positions[j]] = {
                    "result": [
                        {
                            "from_name": cfg.from_name,
                            "to_name": cfg.to_name,
                            "type": "choices",
                            "value": {"choices": [label]},
                        }
                    ],
                    "score": float(pred.p_clean[row]),
                    "model_version": version,
                }
            self.counters["tasks_predicted"] += len(good)
        return {"results": results, "model_version": version}

    # ---- webhook ---------------------------------------------------------------------------

    def webhook(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Count annotation events per project and enqueue a retrain at the threshold."""
        if action not in TRAINING_EVENTS and action != START_TRAINING:
            self.counters["webhooks_ignored"] += 1
            return {"status": "ignored", "action": action}
        project = payload.get("project")
        project_id = project.get("id") if isinstance(project, dict) else project
        key = project_key(project_id)
        if self.coordinator is None:
            raise RuntimeError("no training queue is configured")
        outcome = self.coordinator.record(
            key, _annotation_count(action, payload), force=action == START_TRAINING
        )
        self.counters[f"webhooks_{outcome.value}"] += 1
        return {"status": "ok", "action": action, "project": key, "training": outcome.value}

    # ---- versions --------------------------------------------------------------------------

    def versions(self, project: Any) -> dict[str, Any]:
        key = project_key(project)
        current = self.store.current_version(key)
        out = []
        for n in self.store.versions(key):
            try:
                info = self.store.version_info(key, n, self.backbone_id, ())
            except ValueError:
                continue
            out.append(
                {
                    "version": n,
                    "model_version": info.model_version,
                    "metrics": info.metrics,
                    "current": n == current,
                    "class_names": list(info.class_names),
                }
            )
        status = self.coordinator.status(key) if self.coordinator else None
        return {"project": key, "current": current, "versions": out, "training": status}


def _annotation_count(action: str, payload: dict[str, Any]) -> int:
    """New information carried by an event: one per annotation created, updated or deleted."""
    for field_name in ("annotations", "annotation"):
        value = payload.get(field_name)
        if isinstance(value, list):
            return len(value)
        if isinstance(value, dict) and isinstance(value.get("ids"), list):
            return len(value["ids"])
    if action == START_TRAINING:
        return 0
    return 1


__all__ = ["DPALModel", "BackboneNotReady", "Outcome", "parse_config", "version_string"]
