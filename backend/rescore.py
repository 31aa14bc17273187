"""Re-score the unlabelled pool with a version and push the predictions (step 6 of the retrain job).

``coop`` and ``adapter`` score cached image embeddings, so a re-score downloads only images that
were never embedded; ``vpt`` needs pixels and fetches them. Predictions go to Label Studio in
bounded chunks; a failed chunk is retried with backoff, and before every retry the chunk's tasks
are re-read so that predictions Label Studio created before the failure (an answer lost on the
way back) are not created twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backend.embeddings import TaskImageEncoder
from backend.lsclient import LabelStudioClient, LabelStudioUnavailable, RetryPolicy
from dpal_core.model import DualPromptCLIP, predict

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]  # (done, total)
RECONCILE_BATCH = 200  # task ids per re-read (keeps the query string short)


@dataclass(frozen=True)
class PushSpec:
    """How a class index becomes a Label Studio choices result."""

    from_name: str
    to_name: str
    labels: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"from_name": self.from_name, "to_name": self.to_name, "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PushSpec:
        return cls(d["from_name"], d["to_name"], tuple(d["labels"]))


def prediction_payload(
    task_id: int, spec: PushSpec, class_index: int, score: float, model_version: str
) -> dict:
    """One prediction as ``/import/predictions`` takes it; ``score`` is p_clean (ascending = most uncertain)."""
    return {
        "task": int(task_id),
        "model_version": model_version,
        "score": float(score),
        "result": [
            {
                "from_name": spec.from_name,
                "to_name": spec.to_name,
                "type": "choices",
                "value": {"choices": [spec.labels[int(class_index)]]},
            }
        ],
    }


@dataclass
class Scored:
    task_ids: list[int]  # tasks that could be scored
    pred: np.ndarray  # [M] class index
    p_clean: np.ndarray  # [M] confidence
    errors: dict[int, str] = field(default_factory=dict)  # task id -> why it was not scored
    fetched: int = 0  # images downloaded (0 when every embedding was cached)


def score_tasks(
    model: DualPromptCLIP,
    encoder: TaskImageEncoder,
    task_ids: Sequence[int],
    urls: Sequence[str],
    fetch_chunk: int,
    progress: Progress | None = None,
    score_chunk: int = 131_072,
    pixel_batch: int = 64,
) -> Scored:
    """Predict ``task_ids``: from cached embeddings (coop, adapter) or from fetched pixels (vpt).

    Cached rows are read and scored ``score_chunk`` at a time (one text-encoder pass per chunk);
    images are fetched and encoded ``fetch_chunk`` at a time, and vpt runs the image encoder on
    ``pixel_batch`` images per pass.
    """
    n = len(task_ids)
    ids_out: list[int] = []
    preds: list[torch.Tensor] = []
    cleans: list[torch.Tensor] = []
    errors: dict[int, str] = {}
    fetched = 0
    step = fetch_chunk if model.needs_pixels else max(fetch_chunk, score_chunk)
    for start in range(0, n, step):
        ids = list(task_ids[start : start + step])
        keys = list(urls[start : start + step])
        if model.needs_pixels:
            px = run_async(encoder, encoder.pixels(keys, ids))
            fetched += len(keys)
            ok, errs = px.ok, px.errors
            p = predict(model, pixel_values=px.pixel_values, batch_size=pixel_batch) if ok.any() else None
        else:
            vectors, ok = encoder.cache.get(keys)
            errs = {}
            missing = np.flatnonzero(~ok)
            for m in range(0, len(missing), fetch_chunk):  # never embedded: fetch + encode once
                part = missing[m : m + fetch_chunk]
                emb = encoder.embed_sync([keys[i] for i in part], [ids[i] for i in part])
                fetched += len(part)
                vectors[part] = emb.vectors
                ok[part] = emb.ok
                errs.update({int(part[i]): e for i, e in emb.errors.items()})
            feats = torch.from_numpy(vectors if ok.all() else vectors[ok])
            p = predict(model, features=feats) if ok.any() else None
        for i, e in errs.items():
            errors[ids[i]] = e
        if p is not None:
            ids_out.extend(t for t, good in zip(ids, ok, strict=True) if good)
            preds.append(p.pred)
            cleans.append(p.p_clean)
        if progress:
            progress(min(n, start + step), n)
    pred = torch.cat(preds).numpy() if preds else np.empty(0, dtype=np.int64)
    clean = torch.cat(cleans).numpy() if cleans else np.empty(0, dtype=np.float32)
    return Scored(ids_out, pred, clean, errors, fetched)


def predictions_for(scored: Scored, spec: PushSpec, model_version: str) -> list[dict]:
    return [
        prediction_payload(t, spec, c, s, model_version)
        for t, c, s in zip(scored.task_ids, scored.pred.tolist(), scored.p_clean.tolist(), strict=True)
    ]


@dataclass
class PushResult:
    pushed: int = 0  # predictions now in Label Studio (created now or found there after a failure)
    created: int = 0  # created by this push's calls as Label Studio reported it
    found: int = 0  # found already there when re-reading after a failure (or verify_first)


def already_predicted(
    ls: LabelStudioClient,
    project_id: int,
    task_ids: Sequence[int],
    model_version: str,
    attempts: int | None = 1,
) -> set[int]:
    """Which of ``task_ids`` already hold a prediction of ``model_version`` (``attempts`` tries per batch)."""
    done: set[int] = set()
    for start in range(0, len(task_ids), RECONCILE_BATCH):
        batch = list(task_ids[start : start + RECONCILE_BATCH])
        for page in ls.iter_task_pages(project_id, page_size=len(batch), task_ids=batch, attempts=attempts):
            done.update(r.id for r in page if model_version in r.prediction_versions)
    return done


def push_predictions(
    ls: LabelStudioClient,
    project_id: int,
    predictions: Sequence[dict],
    model_version: str,
    chunk: int,
    retry: RetryPolicy,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
    verify_first: bool = False,
) -> PushResult:
    """Push ``predictions`` in chunks: on return every one of them is in Label Studio, once.

    ``verify_first`` re-reads every chunk's tasks before its first try too (shard jobs, which may
    run again after a kill without a fresh task list), so a re-run never duplicates predictions.

    Raises:
        LabelStudioUnavailable: a chunk still failed after ``retry.attempts`` tries.
        LabelStudioError: Label Studio refused a chunk (4xx); not retried.
    """
    out = PushResult()
    total = len(predictions)
    for start in range(0, total, chunk):
        pending = list(predictions[start : start + chunk])
        last = ""
        if verify_first:
            done = already_predicted(ls, project_id, [p["task"] for p in pending], model_version, None)
            out.found += len(done)
            pending = [p for p in pending if p["task"] not in done]
        for attempt in range(retry.attempts):
            if not pending:
                break
            if attempt:
                delay = retry.delay(attempt - 1)
                log.warning(
                    "project %s: push of %d predictions failed (%s); retry %d/%d in %.1fs",
                    project_id,
                    len(pending),
                    last,
                    attempt,
                    retry.attempts - 1,
                    delay,
                )
                sleep(delay)
                try:  # what did the failed call create after all?
                    done = already_predicted(ls, project_id, [p["task"] for p in pending], model_version)
                except LabelStudioUnavailable as exc:
                    last = str(exc)
                    continue
                out.found += len(done)
                pending = [p for p in pending if p["task"] not in done]
                if not pending:
                    break
            try:
                out.created += ls.import_predictions(project_id, pending)
                break
            except LabelStudioUnavailable as exc:
                last = str(exc)
        else:
            raise LabelStudioUnavailable(
                f"pushing predictions of {model_version} to project {project_id} failed after "
                f"{retry.attempts} tries ({start} of {total} pushed); last error: {last}"
            )
        out.pushed = min(total, start + chunk)
        if progress:
            progress(out.pushed, total)
    return out


def run_async(encoder: TaskImageEncoder, coro: Any) -> Any:
    """Run one of the encoder's coroutines from synchronous code, closing its HTTP session after."""

    async def main() -> Any:
        try:
            return await coro
        finally:
            await encoder.fetcher.aclose()

    return asyncio.run(main())
