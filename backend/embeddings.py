"""Task images -> image embeddings, through the embedding cache, for the server and the worker.

An image is identified by its task URL, so an image is downloaded and encoded once per backbone,
however many times it is predicted or trained on. Failures are per task and never sink a batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from backend.media import MediaError, MediaFetcher
from dpal_core.backbone import Backbone, encode_pil
from dpal_core.cache import EmbeddingCache
from dpal_core.errors import ImageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedded:
    """Embeddings for N tasks; rows of failed tasks are zeros and ``ok`` is False there."""

    vectors: np.ndarray  # [N, D] float32, L2-normalised
    ok: np.ndarray  # [N] bool
    errors: dict[int, str]  # position -> reason (safe to log)


@dataclass(frozen=True)
class Pixels:
    """Preprocessed pixels for the tasks that could be fetched (vpt needs them)."""

    pixel_values: torch.Tensor  # [M, 3, S, S] for the M tasks where ok is True
    ok: np.ndarray  # [N] bool
    errors: dict[int, str]


class TaskImageEncoder:
    """Fetch (guarded) + encode (batched) + cache. One per process; thread-safe."""

    def __init__(
        self,
        backbone: Backbone,
        cache: EmbeddingCache,
        fetcher: MediaFetcher,
        batch_size: int = 64,
        concurrency: int = 8,
    ) -> None:
        self.backbone = backbone
        self.cache = cache
        self.fetcher = fetcher
        self.batch_size = batch_size
        self.concurrency = concurrency
        self._encode_lock = threading.Lock()  # one forward pass at a time: CPU/GPU are the bottleneck

    async def embed(self, urls: Sequence[str], task_ids: Sequence[int | None] | None = None) -> Embedded:
        """Embeddings of ``urls``; only uncached images are downloaded and encoded."""
        n = len(urls)
        vectors, found = await asyncio.to_thread(self.cache.get, list(urls))
        ok = found.copy()
        errors: dict[int, str] = {}
        missing = np.flatnonzero(~found).tolist()
        if missing:
            ids = [task_ids[i] for i in missing] if task_ids is not None else None
            images = await self.fetcher.fetch_images([urls[i] for i in missing], ids, self.concurrency)
            good: list[int] = []
            pil: list[Image.Image] = []
            for pos, img in zip(missing, images, strict=True):
                if isinstance(img, (MediaError, ImageError)):
                    errors[pos] = str(img)
                else:
                    good.append(pos)
                    pil.append(img)
            if pil:
                fresh = await asyncio.to_thread(self._encode, pil)
                # Duplicate URLs in one batch are encoded once each but cached once.
                await asyncio.to_thread(self.cache.put, [urls[p] for p in good], fresh)
                vectors[good] = fresh
                ok[good] = True
        for pos, reason in errors.items():
            log.warning("task %s: image not usable: %s", task_ids[pos] if task_ids else pos, reason)
        assert vectors.shape == (n, self.backbone.embed_dim)
        return Embedded(vectors, ok, errors)

    def embed_sync(self, urls: Sequence[str], task_ids: Sequence[int | None] | None = None) -> Embedded:
        """:meth:`embed` for synchronous callers (the RQ worker)."""
        return asyncio.run(self._embed_in_fresh_loop(urls, task_ids))

    async def _embed_in_fresh_loop(self, urls, task_ids) -> Embedded:
        try:
            return await self.embed(urls, task_ids)
        finally:
            await self.fetcher.aclose()

    async def pixels(self, urls: Sequence[str], task_ids: Sequence[int | None] | None = None) -> Pixels:
        """Preprocessed pixels (no cache: vpt's visual features depend on its learned prompts)."""
        images = await self.fetcher.fetch_images(list(urls), task_ids, self.concurrency)
        ok = np.array([not isinstance(i, (MediaError, ImageError)) for i in images], dtype=bool)
        errors = {i: str(img) for i, img in enumerate(images) if not ok[i]}
        good = [img for img in images if not isinstance(img, (MediaError, ImageError))]
        pixels = self.backbone.preprocess(good)
        return Pixels(pixels, ok, errors)

    def _encode(self, images: list[Image.Image]) -> np.ndarray:
        with self._encode_lock:
            return encode_pil(self.backbone, images, batch_size=self.batch_size, normalize=True).numpy()
