"""The benchmark's data for one seed: pool and test images, encoded once and cached on disk.

The pool and the test set are disjoint and seen under the same domain shift. Image embeddings are
computed once per (backbone, images) and stored as ``.npz`` files keyed by the backbone id and a
digest of the image bytes, so ``coop``/``adapter`` rounds never run the image encoder and a resumed
benchmark does not re-encode anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpal_core.backbone import Backbone, encode_pil
from dpal_core.bench.data import (
    DatasetError,
    ImageDataset,
    load_animal_mnist,
    load_image_folder,
    stratified_split,
)
from dpal_core.bench.shifts import DEFAULT_SHIFT, apply_shift, benchmark_splits

log = logging.getLogger(__name__)

ANIMAL_MNIST = "animal-mnist"
FOLDER_TEST_FRACTION = 0.2  # test share when an image folder comes without a test split
CACHE_FORMAT = 1  # bump when the cached arrays change meaning


@dataclass(frozen=True)
class DataSpec:
    """Where the images come from and how they are split and shifted (part of BenchConfig)."""

    dataset: str = ANIMAL_MNIST  # "animal-mnist" or a folder <dataset>/<class_name>/*.png
    test_split: str | None = None  # folders: test images in <dataset>/<test_split>/, pool in <dataset>/train/
    test_dir: str | None = None  # folders: test images in a separate folder of class folders
    shift: str | None = None  # None: DEFAULT_SHIFT for animal-mnist, "none" for folders
    pool_size: int = 0  # 0 = the whole pool; else a stratified subset of this size
    test_size: int = 0  # 0 = the whole test split; else a stratified subset

    @property
    def shift_name(self) -> str:
        if self.shift is not None:
            return self.shift
        return DEFAULT_SHIFT if self.dataset == ANIMAL_MNIST else "none"


@dataclass(frozen=True, eq=False)
class BenchData:
    """Encoded pool and test set for one seed (CPU tensors)."""

    class_names: tuple[str, ...]
    pool_features: torch.Tensor  # [N, D] L2-normalised image embeddings
    pool_labels: np.ndarray  # [N] int64
    test_features: torch.Tensor  # [T, D]
    test_labels: np.ndarray  # [T] int64
    pool_pixels: torch.Tensor | None = None  # [N, 3, S, S], only when the paradigm needs pixels (vpt)
    test_pixels: torch.Tensor | None = None  # [T, 3, S, S]


def prompt_name(folder_name: str) -> str:
    """Class folder name -> the words used in prompts ("golden_retriever" -> "golden retriever")."""
    return " ".join(folder_name.replace("_", " ").replace("-", " ").split())


def load_splits(spec: DataSpec, seed: int, image_size: int) -> tuple[ImageDataset, ImageDataset]:
    """(pool, test) images for ``seed``, shifted and subsampled as ``spec`` says."""
    if spec.dataset == ANIMAL_MNIST:
        if spec.test_split or spec.test_dir:
            raise DatasetError("--test-split/--test-dir apply to image folders, not to animal-mnist")
        sets = benchmark_splits(seed, spec.shift_name, load_animal_mnist())
        pool, test = sets["pool"], sets["test"]
    else:
        pool, test = _folder_splits(spec, seed, image_size)
        if spec.shift_name != "none":
            pool = pool.with_images(apply_shift(pool.images, spec.shift_name, (seed, 1)))
            test = test.with_images(apply_shift(test.images, spec.shift_name, (seed, 2)))
    pool = _subsample(pool, spec.pool_size, seed, "pool")
    test = _subsample(test, spec.test_size, seed + 1, "test")
    names = tuple(prompt_name(n) for n in pool.class_names)
    return ImageDataset(pool.images, pool.labels, names), ImageDataset(test.images, test.labels, names)


def _folder_splits(spec: DataSpec, seed: int, image_size: int) -> tuple[ImageDataset, ImageDataset]:
    if spec.test_dir and spec.test_split:
        raise DatasetError("give --test-split or --test-dir, not both")
    if spec.test_dir:
        pool = load_image_folder(spec.dataset, size=image_size)
        test = load_image_folder(spec.test_dir, size=image_size)
    elif spec.test_split:
        pool = load_image_folder(spec.dataset, split="train", size=image_size)
        test = load_image_folder(spec.dataset, split=spec.test_split, size=image_size)
    else:
        full = load_image_folder(spec.dataset, size=image_size)
        n_test = spec.test_size or max(len(full.class_names), round(FOLDER_TEST_FRACTION * len(full)))
        idx = stratified_split(full.labels, {"test": n_test, "pool": len(full) - n_test}, seed)
        return full.subset(idx["pool"]), full.subset(idx["test"])
    if pool.class_names != test.class_names:
        raise DatasetError(
            f"pool and test folders hold different classes: {pool.class_names} vs {test.class_names}"
        )
    return pool, test


def _subsample(data: ImageDataset, size: int, seed: int, what: str) -> ImageDataset:
    if not size or size >= len(data):
        return data
    if size < len(data.class_names):
        raise DatasetError(f"--{what}-size {size} is smaller than the number of classes")
    return data.subset(stratified_split(data.labels, {"keep": size}, seed)["keep"])


def _digest(backbone_id: str, *arrays: np.ndarray) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}:{backbone_id}".encode())
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def encode_cached(backbone: Backbone, data: ImageDataset, cache_dir: Path | None) -> torch.Tensor:
    """[N, D] normalised embeddings of ``data``'s images, read from / written to ``cache_dir``."""
    path = cache_dir / f"emb-{_digest(backbone.backbone_id, data.images)}.npy" if cache_dir else None
    if path is not None and path.is_file():
        feats = np.load(path)
        if feats.shape == (len(data), backbone.embed_dim):
            return torch.from_numpy(feats)
        log.warning("ignoring embedding cache %s: shape %s does not match", path, feats.shape)
    feats = encode_pil(backbone, data.to_pil(), batch_size=256).float()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".emb-", suffix=".npy", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, feats.numpy())
        os.replace(tmp, path)  # readers never see a half-written file
    return feats


def prepare_data(
    spec: DataSpec, backbone: Backbone, seed: int, cache_dir: Path | None, pixels: bool = False
) -> BenchData:
    """Load, shift, split and encode the pool and test set of ``seed``.

    Args:
        pixels: also keep preprocessed pixels (the ``vpt`` paradigm trains on them).
    """
    image_size = int(backbone.model.config.vision_config.image_size)
    pool, test = load_splits(spec, seed, image_size)
    if len(pool) == 0 or len(test) == 0:
        raise DatasetError(f"empty split: {len(pool)} pool and {len(test)} test images")
    pool_x = encode_cached(backbone, pool, cache_dir)
    test_x = encode_cached(backbone, test, cache_dir)
    pool_px = backbone.preprocess(pool.to_pil()) if pixels else None
    test_px = backbone.preprocess(test.to_pil()) if pixels else None
    return BenchData(
        pool.class_names, pool_x, pool.labels.copy(), test_x, test.labels.copy(), pool_px, test_px
    )
