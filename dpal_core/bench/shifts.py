"""The benchmark's fixed domain shifts: the pool and test images look unlike the proxy's training data.

A shift decides whether the benchmark means anything: zero-shot accuracy must stay well above
chance (10 %), and labels must be able to lift it far higher. Measured with the default proxy
(``build_proxy(seed=0)``, :mod:`dpal_core.bench.proxy`), split seed 0; zero-shot uses
"a photo of a {label}."; the linear probe is a logistic regression on frozen, normalised image
embeddings of the shifted 4,000-image pool, evaluated on the shifted 1,000-image test set
(``python -m dpal_core.bench.proxy``):

=================  ===============  =================  ======================
shift              zero-shot clean  zero-shot shifted  linear probe (shifted)
=================  ===============  =================  ======================
none               0.831            0.831              –
noise              0.831            0.683              0.757
noise_strong       0.831            0.497              0.673  (default)
low_contrast_noise 0.831            0.205              0.673
rotate             0.831            0.597              0.689
rotate_noise       0.831            0.561              0.649
=================  ===============  =================  ======================

Every shift works on uint8 arrays [N, H, W] or [N, H, W, 3] and is deterministic in its seed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from dpal_core.bench.data import ImageDataset, load_animal_mnist, split_animal_mnist
from dpal_core.errors import ConfigError

# Gaussian noise sigma 0.35: zero-shot 5x chance, and 17 points of headroom for labels to win back.
# sigma 0.25 ("noise") leaves only 7 points; low_contrast_noise starts at 2x chance.
DEFAULT_SHIFT = "noise_strong"

ShiftFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # float [N,H,W(,3)] in [0,1] -> same


def _none(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x


def _noise(sigma: float) -> ShiftFn:
    """Additive Gaussian pixel noise (std ``sigma`` in [0, 1] units), clipped."""

    def shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return x + rng.normal(0.0, sigma, size=x.shape)

    return shift


def _contrast(factor: float) -> ShiftFn:
    """Contrast scaled by ``factor`` around mid-grey."""

    def shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return 0.5 + (x - 0.5) * factor

    return shift


def _rotate(max_degrees: float) -> ShiftFn:
    """Each image rotated by a uniform angle in ``±max_degrees`` (bilinear, black fill)."""

    def shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        angles = rng.uniform(-max_degrees, max_degrees, size=len(x))
        out = np.empty_like(x)
        for i, (img, angle) in enumerate(zip(x, angles, strict=True)):
            pil = Image.fromarray(np.round(img * 255).astype(np.uint8))
            out[i] = np.asarray(pil.rotate(float(angle), Image.Resampling.BILINEAR), dtype=np.float64) / 255
        return out

    return shift


def _chain(*shifts: ShiftFn) -> ShiftFn:
    def shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for s in shifts:
            x = s(x, rng)
        return x

    return shift


# name -> shift. Each entry is fixed: benchmark results are comparable only under the same name.
SHIFTS: dict[str, ShiftFn] = {
    "none": _none,
    "noise": _noise(0.25),
    "noise_strong": _noise(0.35),
    "low_contrast_noise": _chain(_contrast(0.5), _noise(0.15)),
    "rotate": _rotate(30.0),
    "rotate_noise": _chain(_rotate(30.0), _noise(0.15)),
}


def apply_shift(images: np.ndarray, name: str = DEFAULT_SHIFT, seed: int | tuple[int, ...] = 0) -> np.ndarray:
    """Apply the named shift.

    Args:
        images: [N, H, W] or [N, H, W, 3] uint8.
        name: a key of :data:`SHIFTS`.
        seed: the same seed (and images) always give the same result.
    Returns:
        A new uint8 array of the same shape.
    """
    if name not in SHIFTS:
        raise ConfigError(f"unknown shift '{name}'; choose one of {sorted(SHIFTS)}")
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ConfigError(f"apply_shift expects uint8 images, got {images.dtype}")
    rng = np.random.default_rng(seed)
    out = SHIFTS[name](images.astype(np.float64) / 255.0, rng)
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def benchmark_splits(
    seed: int = 0, shift: str = DEFAULT_SHIFT, dataset: ImageDataset | None = None
) -> dict[str, ImageDataset]:
    """The animal-mnist benchmark sets for one seed.

    Returns:
        ``pretrain`` (clean, the proxy's training data), ``pool`` and ``test`` (shifted), and
        ``test_clean`` (the test images unshifted, to measure the shift's cost).
    """
    dataset = load_animal_mnist() if dataset is None else dataset
    idx = split_animal_mnist(seed, dataset.labels)
    pool, test = dataset.subset(idx["pool"]), dataset.subset(idx["test"])
    return {
        "pretrain": dataset.subset(idx["pretrain"]),
        "pool": pool.with_images(apply_shift(pool.images, shift, (seed, 1))),
        "test": test.with_images(apply_shift(test.images, shift, (seed, 2))),
        "test_clean": test,
    }
