"""Benchmark data: checksummed loading, splits, shifts, image folders, and a micro proxy build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpal_core.backbone import encode_pil, load_backbone
from dpal_core.bench import data as bench_data
from dpal_core.bench import proxy as bench_proxy
from dpal_core.bench.data import (
    ANIMAL_CLASSES,
    DatasetError,
    ImageDataset,
    animal_mnist_files,
    load_animal_mnist,
    load_image_folder,
    split_animal_mnist,
    stratified_split,
)
from dpal_core.bench.proxy import INFO_FILE, ProxyConfig, build_proxy
from dpal_core.bench.shifts import DEFAULT_SHIFT, SHIFTS, apply_shift, benchmark_splits
from dpal_core.errors import ConfigError

MICRO = ProxyConfig(
    vision_hidden=32,
    vision_layers=1,
    text_hidden=32,
    text_layers=1,
    heads=2,
    projection_dim=16,
    steps=30,
    batch_size=32,
    lr=3e-3,
    n_pretrain=200,
)


@pytest.fixture(scope="module")
def animals() -> ImageDataset:
    return load_animal_mnist()


def test_animal_mnist_contents(animals: ImageDataset) -> None:
    assert animals.images.shape == (10000, 28, 28) and animals.images.dtype == np.uint8
    assert animals.labels.dtype == np.int64
    assert np.bincount(animals.labels).tolist() == [1000] * 10
    assert animals.class_names == ANIMAL_CLASSES
    img = animals.pil(0)
    assert img.mode == "RGB" and img.size == (28, 28)
    with pytest.raises(ValueError):
        animals.images[0, 0, 0] = 1  # read-only views


def test_tampered_file_is_refused_before_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_file, label_file = animal_mnist_files()
    tampered = tmp_path / data_file.name
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tampered.write_bytes(bytes(raw))

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickled a file that failed its checksum")

    monkeypatch.setattr(bench_data, "_unpickle_array", never)
    monkeypatch.setattr(bench_data._NumpyOnlyUnpickler, "load", never)
    with pytest.raises(DatasetError, match="checksum mismatch"):
        load_animal_mnist(tampered, label_file)
    with pytest.raises(DatasetError, match="checksum mismatch"):  # the labels are checked too
        load_animal_mnist(data_file, tampered)


def test_unpickler_refuses_anything_but_arrays(tmp_path: Path) -> None:
    import gzip
    import hashlib
    import pickle

    evil = gzip.compress(pickle.dumps({"not": "an array"}))
    payload = gzip.compress(pickle.dumps(ImageDataset))  # a class reference: must not be resolved
    for blob in (evil, payload):
        f = tmp_path / "x.gz"
        f.write_bytes(blob)
        digest = hashlib.sha256(blob).hexdigest()
        with pytest.raises(DatasetError):
            load_animal_mnist(f, f, data_sha256=digest, label_sha256=digest)


def test_splits_disjoint_stratified_deterministic(animals: ImageDataset) -> None:
    a = split_animal_mnist(0, animals.labels)
    assert {k: len(v) for k, v in a.items()} == {"pretrain": 5000, "pool": 4000, "test": 1000}
    all_idx = np.concatenate(list(a.values()))
    assert len(np.unique(all_idx)) == len(all_idx)  # disjoint
    for name, idx in a.items():
        counts = np.bincount(animals.labels[idx], minlength=10)
        assert counts.min() == counts.max() == len(idx) // 10, name
    b = split_animal_mnist(0, animals.labels)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = split_animal_mnist(1, animals.labels)
    assert np.array_equal(a["pretrain"], c["pretrain"])  # the proxy's data never moves
    assert not np.array_equal(a["pool"], c["pool"])


def test_stratified_split_uneven_classes() -> None:
    labels = np.array([0] * 7 + [1] * 3 + [2] * 10)
    out = stratified_split(labels, {"x": 10, "y": 6}, seed=3)
    assert len(out["x"]) == 10 and len(out["y"]) == 6
    assert not set(out["x"]) & set(out["y"])
    assert np.bincount(labels[out["x"]], minlength=3).tolist() == [4, 1, 5]  # 3.5/1.5/5 -> largest remainder
    with pytest.raises(DatasetError):
        stratified_split(labels, {"x": 30}, seed=0)


def test_shift_deterministic_and_changes_images(animals: ImageDataset) -> None:
    x = animals.images[:50]
    for name in SHIFTS:
        y = apply_shift(x, name, seed=7)
        assert y.dtype == np.uint8 and y.shape == x.shape
        assert np.array_equal(y, apply_shift(x, name, seed=7)), name
        if name != "none":
            assert not np.array_equal(y, x), name
            assert not np.array_equal(y, apply_shift(x, name, seed=8)), name
    rgb = np.repeat(x[..., None], 3, axis=-1)
    assert apply_shift(rgb, DEFAULT_SHIFT, 0).shape == rgb.shape
    with pytest.raises(ConfigError, match="unknown shift"):
        apply_shift(x, "nope", 0)


def test_benchmark_splits(animals: ImageDataset) -> None:
    sets = benchmark_splits(0, dataset=animals)
    assert np.array_equal(sets["test"].labels, sets["test_clean"].labels)
    assert not np.array_equal(sets["test"].images, sets["test_clean"].images)
    assert len(sets["pretrain"]) == 5000 and len(sets["pool"]) == 4000


def _write_folder(root: Path, animals: ImageDataset, per_class: int = 3) -> None:
    for c in (0, 5):
        d = root / ANIMAL_CLASSES[c]
        d.mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(animals.labels == c)[:per_class]):
            animals.pil(int(i)).save(d / f"{k}.png")
        (d / "notes.txt").write_text("ignored")


def test_image_folder_roundtrip(tmp_path: Path, animals: ImageDataset) -> None:
    _write_folder(tmp_path / "train", animals)
    ds = load_image_folder(tmp_path, split="train")
    assert ds.class_names == ("bear", "elephant")
    assert ds.images.shape == (6, 28, 28, 3) and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    first = np.flatnonzero(animals.labels == 0)[0]
    assert np.array_equal(ds.images[0, :, :, 0], animals.images[first])  # PNG is lossless
    assert load_image_folder(tmp_path / "train", size=16).images.shape == (6, 16, 16, 3)


def test_image_folder_errors(tmp_path: Path, animals: ImageDataset) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(DatasetError, match="without images"):
        load_image_folder(tmp_path)
    Image.new("L", (8, 8)).save(tmp_path / "cat" / "a.png")
    with pytest.raises(DatasetError, match="single class"):
        load_image_folder(tmp_path)
    (tmp_path / "dog").mkdir()
    Image.new("L", (9, 9)).save(tmp_path / "dog" / "a.png")
    with pytest.raises(DatasetError, match="differ in size"):
        load_image_folder(tmp_path)
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "dog" / "empty.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="2 unreadable") as err:
        load_image_folder(tmp_path)
    assert "broken.jpg" in str(err.value) and "empty.png" in str(err.value)
    with pytest.raises(DatasetError, match="sub-folders of"):
        load_image_folder(tmp_path, split="test")


def test_proxy_config_validation() -> None:
    with pytest.raises(ConfigError, match="patch_size"):
        ProxyConfig(image_size=28, patch_size=5)
    with pytest.raises(ConfigError, match="steps"):
        ProxyConfig(steps=0)
    with pytest.raises(ConfigError, match="template"):
        ProxyConfig(templates=("no slot",))


def test_micro_proxy_builds_caches_and_learns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = build_proxy(tmp_path, seed=0, progress=False, config=MICRO)
    assert path.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp left
    info = json.loads((path / INFO_FILE).read_text())
    assert info["loss_last"] < info["loss_first"]
    backbone = load_backbone(str(path), device="cpu")
    assert backbone.embed_dim == MICRO.projection_dim and backbone.preprocess.size == MICRO.image_size
    feats = encode_pil(backbone, load_animal_mnist().to_pil(range(4)))
    assert feats.shape == (4, MICRO.projection_dim)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache miss: the proxy was rebuilt")

    monkeypatch.setattr(bench_proxy, "_build_into", no_training)
    assert build_proxy(tmp_path, seed=0, progress=False, config=MICRO) == path
    with pytest.raises(AssertionError, match="cache miss"):  # another seed is another model
        build_proxy(tmp_path, seed=1, progress=False, config=MICRO)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the failed build cleaned up


def test_micro_proxy_is_deterministic(tmp_path: Path) -> None:
    a = build_proxy(tmp_path / "a", seed=0, progress=False, config=MICRO)
    b = build_proxy(tmp_path / "b", seed=0, progress=False, config=MICRO)
    assert a.name == b.name
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path)
