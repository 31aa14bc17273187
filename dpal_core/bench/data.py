"""Labelled image sets for the offline benchmark, and their deterministic, stratified splits.

animal-mnist (PyPI ``animal-mnist==0.4``, MIT) ships 10,000 white-on-black 28x28 animal silhouettes,
1,000 per class, as gzipped *pickles*. We locate the files through the package path (its
``dataset_Loader`` module imports tensorflow, so it is never imported), check their sha256 against
the values below, and only then unpickle them with an unpickler that accepts nothing but numpy
arrays. Labels are int64 0..9, stored sorted; the class order is the package README's
(alphabetical), checked by eye on a grid of samples per label.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dpal_core.errors import DpalError, ImageError
from dpal_core.images import load_image

ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
ANIMAL_DATA_FILE = "animal_data_version_3.gz"
ANIMAL_LABEL_FILE = "animal_label_version_3.gz"
ANIMAL_DATA_SHA256 = "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce"
ANIMAL_LABEL_SHA256 = "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"
# pretrain: clean images for the proxy's contrastive pre-training; pool + test: seen under the shift.
ANIMAL_SPLIT_SIZES = {"pretrain": 5000, "pool": 4000, "test": 1000}
# The pretrain split never depends on the benchmark seed, so no seed can leak proxy training images
# into a pool or test set.
PRETRAIN_SPLIT_SEED = 20261203
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetError(DpalError, ValueError):
    """A data set is missing, tampered with, or unusable (empty, one class, unreadable files)."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images with integer labels. Arrays are read-only views.

    Attributes:
        images: [N, H, W] (grayscale) or [N, H, W, 3] (RGB) uint8.
        labels: [N] int64 in ``0..len(class_names)-1``.
        class_names: name of each label, in label order.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        images, labels = np.asarray(self.images), np.asarray(self.labels)
        if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
            raise DatasetError(
                f"images must be uint8 [N,H,W] or [N,H,W,3], got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(
                f"labels must be [N={len(images)}] integers, got {labels.dtype} {labels.shape}"
            )
        names = tuple(self.class_names)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise DatasetError(f"labels must lie in 0..{len(names) - 1}, got {labels.min()}..{labels.max()}")
        for field, value in (("images", images), ("labels", labels.astype(np.int64, copy=False))):
            view = value.view()
            view.flags.writeable = False
            object.__setattr__(self, field, view)
        object.__setattr__(self, "class_names", names)

    def __len__(self) -> int:
        return len(self.labels)

    def pil(self, index: int) -> Image.Image:
        """Image ``index`` as an RGB :class:`PIL.Image.Image`."""
        return Image.fromarray(np.ascontiguousarray(self.images[index])).convert("RGB")

    def to_pil(self, indices: Sequence[int] | np.ndarray | None = None) -> list[Image.Image]:
        """RGB PIL images for ``indices`` (default: all), in that order."""
        order = range(len(self)) if indices is None else indices
        return [self.pil(int(i)) for i in order]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """The samples at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageDataset(self.images[idx], self.labels[idx], self.class_names)

    def with_images(self, images: np.ndarray) -> ImageDataset:
        """Same labels, other images (e.g. shifted ones) of the same count."""
        return ImageDataset(images, self.labels, self.class_names)


def animal_mnist_files() -> tuple[Path, Path]:
    """Paths of the installed animal-mnist data and label files (the package is not imported)."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "the animal-mnist package is not installed: run "
            "'.venv/bin/pip install --no-deps animal-mnist==0.4' (--no-deps: it declares tensorflow)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    return folder / ANIMAL_DATA_FILE, folder / ANIMAL_LABEL_FILE


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only what a pickled plain ndarray needs; anything else is refused."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in (
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
        ):
            try:  # numpy 2 moved numpy.core to numpy._core (the old path warns)
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise DatasetError(f"refusing to unpickle {module}.{name}: only numpy arrays are expected")


def _verified_bytes(path: Path, sha256: str) -> bytes:
    """The file's bytes, read once, after checking their sha256."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise DatasetError(
            f"checksum mismatch for {path}: sha256 {digest}, expected {sha256}. The file was changed or "
            "corrupted; it was not unpickled. Reinstall with "
            "'.venv/bin/pip install --no-deps --force-reinstall animal-mnist==0.4'."
        )
    return data


def _unpickle_array(data: bytes, path: Path) -> np.ndarray:
    try:
        array = _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(data))).load()
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise DatasetError(f"{path} is not a gzipped numpy pickle: {exc}") from None
    if not isinstance(array, np.ndarray):
        raise DatasetError(f"{path} holds a {type(array).__name__}, not a numpy array")
    return array


def load_animal_mnist(
    data_file: str | Path | None = None,
    label_file: str | Path | None = None,
    *,
    data_sha256: str = ANIMAL_DATA_SHA256,
    label_sha256: str = ANIMAL_LABEL_SHA256,
) -> ImageDataset:
    """Load animal-mnist: 10,000 images [28, 28] uint8 (white silhouette on black), 1,000 per class.

    Args:
        data_file, label_file: the gzipped pickles (default: the installed package's).
        data_sha256, label_sha256: expected checksums; both files are checked before either is unpickled.
    Raises:
        DatasetError: package missing, checksum mismatch, or unexpected content.
    """
    default_data, default_labels = (None, None) if data_file and label_file else animal_mnist_files()
    data_path = Path(data_file or default_data)
    label_path = Path(label_file or default_labels)
    data_bytes = _verified_bytes(data_path, data_sha256)
    label_bytes = _verified_bytes(label_path, label_sha256)
    images = _unpickle_array(data_bytes, data_path)
    labels = _unpickle_array(label_bytes, label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != (len(images),):
        raise DatasetError(
            f"unexpected animal-mnist arrays: images {images.dtype} {images.shape}, labels {labels.shape}"
        )
    return ImageDataset(images, labels.astype(np.int64), ANIMAL_CLASSES)


def stratified_split(labels: np.ndarray, sizes: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """Disjoint, class-stratified index sets of the given sizes, deterministic in ``seed``.

    Each class gets a share of every split proportional to its frequency (largest-remainder
    rounding, split by split in the order given, so shares never exceed what is left).

    Returns:
        name -> sorted int64 indices into ``labels``.
    """
    labels = np.asarray(labels)
    if any(n < 0 for n in sizes.values()) or sum(sizes.values()) > len(labels):
        raise DatasetError(f"split sizes {dict(sizes)} do not fit {len(labels)} samples")
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    left = np.array([len(p) for p in perms])
    taken = np.zeros_like(left)
    out: dict[str, np.ndarray] = {}
    for name, size in sizes.items():
        exact = size * left / max(int(left.sum()), 1)
        quota = np.floor(exact).astype(int)
        by_remainder = np.argsort(-(exact - quota), kind="stable")
        quota[by_remainder[: size - int(quota.sum())]] += 1
        out[name] = np.sort(
            np.concatenate([p[t : t + q] for p, t, q in zip(perms, taken, quota, strict=True)]).astype(
                np.int64
            )
        )
        taken += quota
        left -= quota
    return out


def split_animal_mnist(seed: int = 0, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The benchmark's splits of animal-mnist: ``pretrain`` (5,000), ``pool`` (4,000), ``test`` (1,000).

    ``pretrain`` is fixed (drawn with :data:`PRETRAIN_SPLIT_SEED`) so the proxy backbone never saw
    any pool or test image whatever ``seed`` is; ``seed`` only redraws pool vs test.

    Args:
        seed: benchmark seed for the pool/test split.
        labels: animal-mnist labels (default: loaded).
    Returns:
        split name -> sorted int64 indices into the data set, disjoint and stratified.
    """
    labels = load_animal_mnist().labels if labels is None else np.asarray(labels)
    n_pre, n_pool, n_test = (ANIMAL_SPLIT_SIZES[k] for k in ("pretrain", "pool", "test"))
    first = stratified_split(labels, {"pretrain": n_pre, "rest": len(labels) - n_pre}, PRETRAIN_SPLIT_SEED)
    rest = first["rest"]
    second = stratified_split(
        labels[rest], {"pool": n_pool, "test": n_test, "unused": len(rest) - n_pool - n_test}, seed
    )
    return {"pretrain": first["pretrain"], "pool": rest[second["pool"]], "test": rest[second["test"]]}


def _fit_square(img: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` (bicubic) and centre-crop a square."""
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image_folder(root: str | Path, split: str | None = None, size: int | None = None) -> ImageDataset:
    """Load ``root/<class_name>/*.png|jpg|jpeg`` (or ``root/<split>/<class_name>/...``) as RGB.

    Class names are the sub-folder names, sorted; hidden entries and other file types are skipped.

    Args:
        root: the folder.
        split: a sub-folder such as ``"train"`` or ``"test"`` holding the class folders.
        size: resize (short side) and centre-crop every image to ``size`` x ``size``; without it all
            images must already share one size.
    Returns:
        An :class:`ImageDataset` with images [N, H, W, 3].
    Raises:
        DatasetError: missing or empty folders, fewer than two classes, unreadable files (all listed),
            or mixed image sizes without ``size``.
    """
    base = Path(root) / split if split else Path(root)
    if not base.is_dir():
        hint = (
            f"; sub-folders of {root}: {sorted(p.name for p in Path(root).iterdir() if p.is_dir())}"
            if (split and Path(root).is_dir())
            else ""
        )
        raise DatasetError(f"image folder {base} does not exist{hint}")
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {
        d.name: sorted(
            f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        )
        for d in class_dirs
    }
    empty = [name for name, fs in files.items() if not fs]
    if not class_dirs or empty:
        what = f"class folders without images: {empty}" if empty else "no class sub-folders"
        raise DatasetError(f"{base}: {what} (expected {base}/<class_name>/*{'|'.join(IMAGE_SUFFIXES)})")
    if len(class_dirs) < 2:
        raise DatasetError(f"{base} holds a single class ({class_dirs[0].name}); at least two are needed")
    arrays, labels, bad = [], [], []
    for label, name in enumerate(files):
        for f in files[name]:
            try:
                img = load_image(f)
            except ImageError as exc:
                bad.append(str(exc))
                continue
            arrays.append(np.asarray(_fit_square(img, size) if size else img, dtype=np.uint8))
            labels.append(label)
    if bad:
        listed = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DatasetError(f"{len(bad)} unreadable image file(s) under {base}:\n  {listed}")
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise DatasetError(f"images under {base} differ in size ({shapes[:3]}...); pass size= to resize them")
    return ImageDataset(np.stack(arrays), np.asarray(labels, dtype=np.int64), tuple(files))
