import multiprocessing as mp

import numpy as np
import pytest

from dpal_core.cache import EmbeddingCache
from dpal_core.errors import EmbeddingError


def test_returns_identical_vectors_across_instances(tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((50, 16)).astype(np.float32)
    keys = [f"img-{i}" for i in range(50)]
    cache = EmbeddingCache(tmp_path, "clip-a", 16)
    cache.put(keys, vecs)
    cache.close()
    again = EmbeddingCache(tmp_path, "clip-a", 16)
    out, found = again.get(list(reversed(keys)) + ["unknown"])
    assert found.tolist() == [True] * 50 + [False]
    assert np.array_equal(out[:50], vecs[::-1])
    assert np.array_equal(out[50], np.zeros(16, dtype=np.float32))
    assert len(again) == 50 and "img-3" in again and "img-x" not in again


def test_each_image_is_encoded_once(tmp_path):
    cache = EmbeddingCache(tmp_path, "clip-a", 4)
    calls: list[list[str]] = []

    def encoder(keys):
        def encode(positions):
            calls.append([keys[p] for p in positions])
            return np.array([[ord(keys[p]), 0, 0, 1] for p in positions], dtype=np.float32)

        return encode

    first_keys = ["a", "b", "c"]
    first = cache.get_or_encode(first_keys, encoder(first_keys))
    keys = ["e", "a", "b", "c", "d"]
    second = cache.get_or_encode(keys, encoder(keys))
    assert calls == [["a", "b", "c"], ["e", "d"]]
    assert np.array_equal(second[1:4], first)
    assert second[0, 0] == ord("e") and second[4, 0] == ord("d")
    third = cache.get_or_encode(keys, encoder(keys))
    assert len(calls) == 2 and np.array_equal(third, second)


def test_backbones_do_not_share_vectors(tmp_path):
    a = EmbeddingCache(tmp_path, "clip-a", 4)
    b = EmbeddingCache(tmp_path, "clip-b", 4)
    a.put(["x"], np.ones((1, 4), dtype=np.float32))
    assert b.get(["x"])[1].tolist() == [False]


def test_bad_vectors_are_refused(tmp_path):
    cache = EmbeddingCache(tmp_path, "clip-a", 4)
    with pytest.raises(EmbeddingError, match="NaN"):
        cache.put(["x"], np.array([[np.nan, 0, 0, 0]], dtype=np.float32))
    with pytest.raises(EmbeddingError, match="shape"):
        cache.put(["x", "y"], np.zeros((2, 5), dtype=np.float32))
    assert len(cache) == 0
    with pytest.raises(EmbeddingError, match="4-d"):
        EmbeddingCache(tmp_path, "clip-a", 8)


def _writer(root, worker):
    cache = EmbeddingCache(root, "clip-a", 8)
    for i in range(20):
        keys = [f"w{worker}-{i}-{j}" for j in range(10)]
        vecs = np.full((10, 8), worker * 1000 + i * 10, dtype=np.float32) + np.arange(10)[:, None]
        cache.put(keys, vecs)


def test_concurrent_writers_from_several_processes(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = EmbeddingCache(tmp_path, "clip-a", 8)
    assert len(cache) == 600
    for w in range(3):
        keys = [f"w{w}-{i}-{j}" for i in range(20) for j in range(10)]
        out, found = cache.get(keys)
        assert found.all()
        expected = np.array([w * 1000 + i * 10 + j for i in range(20) for j in range(10)], dtype=np.float32)
        assert np.array_equal(out[:, 0], expected)
