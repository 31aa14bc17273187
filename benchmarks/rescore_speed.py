"""Re-scoring speed after a retrain, side by side in one run (issue 4's goal):

- re-score N cached embeddings with a new version (what the job does for ``coop``/``adapter``):
  embedding-cache reads + scoring + building the prediction payloads. Goal: N=100,000 in < 10 s.
- re-encode the same pool instead (fetch from Label Studio + decode + preprocess + image encoder),
  measured on a sample of images and extrapolated to N;
- push throughput of the payloads to a fake Label Studio on loopback (the SDK's
  ``import_predictions``, chunks of ``--chunk``), with the fake's own handling included.

The backbone is a randomly initialised CLIP of the chosen size (``base`` = ViT-B/16 at 224 px,
512-d embeddings: the default user model's cost); weights do not matter for speed.

    .venv/bin/python benchmarks/rescore_speed.py [--n 100000] [--size base] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests" / "fakes"))
from _models import model_dir  # noqa: E402
from fake_labelstudio import FakeLabelStudio  # noqa: E402

from backend.embeddings import TaskImageEncoder  # noqa: E402
from backend.lsclient import LabelStudioClient, RetryPolicy  # noqa: E402
from backend.media import FetchPolicy, MediaFetcher  # noqa: E402
from backend.rescore import PushSpec, predictions_for, push_predictions, score_tasks  # noqa: E402
from dpal_core.backbone import load_backbone  # noqa: E402
from dpal_core.cache import EmbeddingCache  # noqa: E402
from dpal_core.config import PromptConfig  # noqa: E402
from dpal_core.model import DualPromptCLIP  # noqa: E402

CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
    + "".join(f'<Choice value="{c}"/>' for c in CLASSES)
    + "</Choices></View>"
)


def encoder_for(backbone, cache_dir: Path, ls: FakeLabelStudio) -> TaskImageEncoder:
    policy = FetchPolicy(ls.url, ls.token, frozenset({"127.0.0.1"}), None, 25 << 20, 89_478_485)
    cache = EmbeddingCache(cache_dir, backbone.backbone_id, backbone.embed_dim)
    return TaskImageEncoder(backbone, cache, MediaFetcher(policy), batch_size=32, concurrency=8)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="pool size (cached embeddings)")
    parser.add_argument("--size", default="base", choices=["tiny", "small", "base"], help="CLIP size")
    parser.add_argument("--paradigm", default="coop", choices=["coop", "adapter"])
    parser.add_argument("--sample", type=int, default=32, help="images re-encoded to extrapolate from")
    parser.add_argument("--chunk", type=int, default=500, help="predictions per import call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    backbone = load_backbone(str(model_dir(args.size)), device="cpu")
    dim = backbone.embed_dim
    model = DualPromptCLIP(backbone, CLASSES, PromptConfig(paradigm=args.paradigm))
    figures: dict[str, object] = {
        "n": args.n,
        "size": args.size,
        "dim": dim,
        "threads": args.threads,
        "paradigm": args.paradigm,
    }

    with tempfile.TemporaryDirectory() as tmp, FakeLabelStudio(Path(tmp) / "img") as ls:
        tmp_path = Path(tmp)
        (tmp_path / "img").mkdir()
        pid = ls.add_project(CONFIG)
        # The pool: N tasks whose embeddings are cached (filled here, not timed).
        urls = [f"/data/upload/pool/{i}.png" for i in range(args.n)]
        task_ids = [ls.add_task(pid, {"image": u}) for u in urls]
        vecs = rng.standard_normal((args.n, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        encoder = encoder_for(backbone, tmp_path / "cache", ls)
        t = time.perf_counter()
        encoder.cache.put(urls, vecs)
        figures["cache_fill_s"] = round(time.perf_counter() - t, 2)

        # 1. Re-score from the cache with the new version (+ payloads), as the job does.
        spec = PushSpec("label", "image", tuple(CLASSES))
        t = time.perf_counter()
        scored = score_tasks(model, encoder, task_ids, urls, fetch_chunk=512)
        t_score = time.perf_counter() - t
        preds = predictions_for(scored, spec, "dpal-v2-bench")
        t_rescore = time.perf_counter() - t
        assert len(preds) == args.n and scored.fetched == 0
        figures.update(
            rescore_s=round(t_rescore, 2),
            rescore_score_only_s=round(t_score, 2),
            rescore_per_s=round(args.n / t_rescore),
        )

        # 2. Re-encode a sample instead: fetch from Label Studio, decode, preprocess, encode.
        for i in range(args.sample):
            arr = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(arr).resize((256, 256), Image.BILINEAR).save(
                tmp_path / "img" / f"s{i}.jpg", quality=90
            )
        sample_urls = [f"/data/upload/s{i}.jpg" for i in range(args.sample)]
        cold = encoder_for(backbone, tmp_path / "cold-cache", ls)
        t = time.perf_counter()
        emb = cold.embed_sync(sample_urls, list(range(args.sample)))
        t_sample = time.perf_counter() - t
        assert emb.ok.all(), emb.errors
        per_image = t_sample / args.sample
        figures.update(
            reencode_sample=args.sample,
            reencode_sample_s=round(t_sample, 2),
            reencode_extrapolated_s=round(per_image * args.n, 1),
            reencode_per_s=round(1 / per_image, 1),
        )

        # 3. Push throughput to the fake Label Studio.
        client = LabelStudioClient(ls.url, ls.token, retry=RetryPolicy(3, 0.1, 1.0))
        t = time.perf_counter()
        out = push_predictions(client, pid, preds, "dpal-v2-bench", args.chunk, RetryPolicy(3, 0.1, 1.0))
        t_push = time.perf_counter() - t
        client.close()
        assert out.pushed == args.n
        figures.update(push_s=round(t_push, 2), push_per_s=round(args.n / t_push), push_chunk=args.chunk)

    speedup = figures["reencode_extrapolated_s"] / max(t_rescore, 1e-9)
    print(
        f"pool {args.n:,} tasks, {args.size} CLIP (D={dim}), {args.paradigm}, {args.threads} torch thread(s)"
    )
    print(f"{'step':44s} {'seconds':>10s} {'per second':>12s}")
    print(
        f"{'re-score from cached embeddings (+payloads)':44s} {t_rescore:10.2f} {args.n / t_rescore:12,.0f}"
        f"   goal < 10 s: {'met' if t_rescore < 10 else 'MISSED'}"
    )
    print(f"{'  of which cache read + scoring':44s} {t_score:10.2f}")
    print(
        f"{'re-encode instead (extrapolated from ' + str(args.sample) + ')':44s} "
        f"{per_image * args.n:10.0f} {1 / per_image:12,.1f}   ({speedup:,.0f}x slower)"
    )
    print(
        f"{'push to fake Label Studio (chunks of ' + str(args.chunk) + ')':44s} {t_push:10.2f} {args.n / t_push:12,.0f}"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
