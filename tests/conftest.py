"""Shared fixtures: a tiny random CLIP built offline once per session."""

from __future__ import annotations

import os

# Tests never touch the network: make any accidental hub lookup fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tiny models gain nothing from more, and OpenMP spin-waiting under a loaded
# 2-core machine made multi-threaded training 10x slower (measured: 52.9 s vs 5.3 s).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from dpal_core.tiny import build_tiny_clip

    path, _ = build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)
    return path


@pytest.fixture(scope="session")
def backbone(tiny_clip_dir):
    from dpal_core.backbone import load_backbone

    return load_backbone(str(tiny_clip_dir), device="cpu")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on loopback for the whole session (installed by `make test`)."""
    import shutil
    import subprocess
    import time

    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed; `make test` installs it (apt-get install redis-server)")
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture()
def redis_clean(redis_url):
    """The session Redis, emptied before the test."""
    import redis

    redis.Redis.from_url(redis_url).flushall()
    return redis_url
