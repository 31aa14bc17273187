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
