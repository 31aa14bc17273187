"""Core speed, side by side in one run (issue 2's goals).

1. images/s of the bare backbone image encoder vs the full predict path (PIL decode-size images ->
   preprocess -> encode -> dual-prompt scores) on the same batch. Goal: predict within 15 %.
2. seconds per training epoch with cached embeddings vs re-encoding the images every epoch
   (coop and adapter). Goal: cached >= 20x faster.

    .venv/bin/python benchmarks/core_speed.py [--size base|small|tiny] [--batch 32] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import model_dir  # noqa: E402

from dpal_core.backbone import encode_images, encode_pil, load_backbone  # noqa: E402
from dpal_core.config import PromptConfig, TrainConfig  # noqa: E402
from dpal_core.model import DualPromptCLIP, predict  # noqa: E402
from dpal_core.train import TrainData, train  # noqa: E402

CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = load_backbone(str(model_dir(args.size)), device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)) for _ in range(args.batch)]
    pixels = backbone.preprocess(images)
    model = DualPromptCLIP(backbone, CLASSES, PromptConfig(n_ctx=16))

    bare = best_of(lambda: encode_images(backbone, pixels), args.repeats)
    full = best_of(
        lambda: predict(model, features=encode_pil(backbone, images, batch_size=args.batch)), args.repeats
    )
    print(f"CLIP size={args.size} batch={args.batch} threads={torch.get_num_threads()}")
    print(f"{'path':<42}{'images/s':>10}")
    print(f"{'bare image encoder (preprocessed pixels)':<42}{args.batch / bare:>10.1f}")
    print(f"{'full predict path (PIL -> scores)':<42}{args.batch / full:>10.1f}")
    print(f"predict path / bare encoder throughput: {bare / full:.3f}  (goal >= 0.85)\n")

    feats = encode_images(backbone, pixels)
    labels = torch.arange(args.batch) % len(CLASSES)
    print(f"{'paradigm':<10}{'cached s/epoch':>16}{'re-encode s/epoch':>20}{'speed-up':>10}")
    cfg = TrainConfig(epochs=1, batch_size=args.batch, progress=False)
    for paradigm in ("coop", "adapter"):
        m = DualPromptCLIP(backbone, CLASSES, PromptConfig(n_ctx=16, paradigm=paradigm))
        cached = best_of(lambda m=m: train(m, TrainData(labels, features=feats), cfg), args.repeats)

        def reencode(m=m) -> None:
            fresh = encode_images(backbone, backbone.preprocess(images))  # what an uncached epoch pays
            train(m, TrainData(labels, features=fresh), cfg)

        again = best_of(reencode, args.repeats)
        print(f"{paradigm:<10}{cached:>16.3f}{again:>20.3f}{again / cached:>9.1f}x  (goal >= 20x)")


if __name__ == "__main__":
    main()
