"""Label Studio tasks -> training pairs and the unlabelled pool (step 1 of the retrain job).

Rules:
- an annotation counts when it is submitted: ``was_cancelled`` (a skip) is ignored;
- an annotation without a choice for the config's ``Choices`` (empty result) is ignored;
- of the remaining annotations of a task the latest (``updated_at``, else ``created_at``, then id)
  wins; when its label is not one of the config's choices the task is reported and not trained on
  (an older, superseded label is not used instead);
- a task is *labelled* when it has any submitted annotation (even an empty one: a human has handled
  it); every other task is in the unlabelled pool that gets re-scored;
- a task whose data lacks the config's image is reported and left out of both.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from backend.labelconfig import ClassificationConfig, TaskDataError, task_image_url
from backend.lsclient import TaskRecord


@dataclass
class TrainingSnapshot:
    """What the job learns from and what it re-scores, for one label config."""

    task_ids: list[int] = field(default_factory=list)  # labelled tasks with a usable label
    urls: list[str] = field(default_factory=list)  # their image URLs (embedding cache keys)
    labels: list[int] = field(default_factory=list)  # class indices into the config's labels
    pool: list[TaskRecord] = field(default_factory=list)  # unlabelled tasks
    pool_urls: list[str] = field(default_factory=list)  # image URL of each pool task
    skipped: Counter = field(default_factory=Counter)  # reason -> count (safe to log)
    unknown_labels: Counter = field(default_factory=Counter)  # label outside the config -> count

    @property
    def n_labelled(self) -> int:
        return len(self.labels)

    def report(self) -> dict[str, Any]:
        return {
            "labelled": self.n_labelled,
            "unlabelled": len(self.pool),
            "skipped": dict(sorted(self.skipped.items())),
            "unknown_labels": dict(sorted(self.unknown_labels.items())),
        }


def _timestamp(value: Any) -> float:
    if not value:
        return float("-inf")
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("-inf")


def annotation_choice(annotation: dict[str, Any], cfg: ClassificationConfig) -> str | None:
    """The label an annotation gives the config's Choices, or None when it gives none."""
    for item in annotation.get("result") or []:
        if not isinstance(item, dict) or item.get("from_name") != cfg.from_name:
            continue
        choices = (item.get("value") or {}).get("choices") or []
        if choices and isinstance(choices[0], str):
            return choices[0]
    return None


def latest_label(annotations: Sequence[dict[str, Any]], cfg: ClassificationConfig) -> tuple[bool, str | None]:
    """(submitted, label): whether any annotation was submitted, and the latest usable choice."""
    submitted = [a for a in annotations if not a.get("was_cancelled")]
    choices = [(a, annotation_choice(a, cfg)) for a in submitted]
    usable = [(a, c) for a, c in choices if c is not None]
    if not usable:
        return bool(submitted), None
    a, choice = max(
        usable,
        key=lambda ac: (_timestamp(ac[0].get("updated_at") or ac[0].get("created_at")), ac[0].get("id") or 0),
    )
    return True, choice


def build_snapshot(tasks: Sequence[TaskRecord], cfg: ClassificationConfig) -> TrainingSnapshot:
    """Split tasks into training pairs and the unlabelled pool, counting what was left out and why."""
    snap = TrainingSnapshot()
    for task in tasks:
        cancelled = sum(1 for a in task.annotations if a.get("was_cancelled"))
        if cancelled:
            snap.skipped["cancelled_annotations"] += cancelled
        try:
            url = task_image_url({"id": task.id, "data": task.data}, cfg)
        except TaskDataError:
            snap.skipped["no_image_in_task_data"] += 1
            continue
        submitted, label = latest_label(task.annotations, cfg)
        if not submitted:
            snap.pool.append(task)
            snap.pool_urls.append(url)
            continue
        if label is None:
            snap.skipped["empty_annotations"] += 1
            continue
        if label not in cfg.labels:
            snap.unknown_labels[label] += 1
            snap.skipped["unknown_label"] += 1
            continue
        snap.task_ids.append(task.id)
        snap.urls.append(url)
        snap.labels.append(cfg.labels.index(label))
    return snap


def fingerprint(parts: Sequence[Any]) -> str:
    """A stable hash of JSON-serialisable parts (training pairs + configs) identifying a version."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True, default=str).encode()).hexdigest()[:16]
