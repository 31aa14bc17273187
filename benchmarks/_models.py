"""Randomly initialised CLIPs of real sizes for throughput benchmarks (weights do not matter there).

Built once into ~/.cache/dpal/bench-models/<size>; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from dpal_core.tiny import ClipSize, build_clip

SIZES = {
    "tiny": ClipSize(),
    "small": ClipSize(
        vision_hidden=256,
        vision_layers=6,
        image_size=112,
        patch_size=16,
        text_hidden=256,
        text_layers=4,
        heads=4,
        projection_dim=256,
        max_text_len=77,
    ),
    # The default user model's architecture: ViT-B/16 at 224 px, 512-d text transformer.
    "base": ClipSize(
        vision_hidden=768,
        vision_layers=12,
        image_size=224,
        patch_size=16,
        text_hidden=512,
        text_layers=12,
        heads=8,
        projection_dim=512,
        max_text_len=77,
    ),
}


def model_dir(size: str) -> Path:
    out = Path.home() / ".cache" / "dpal" / "bench-models" / size
    if not (out / "config.json").is_file():
        build_clip(out, SIZES[size])
    return out
