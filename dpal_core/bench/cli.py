"""``dpal bench``: run the active-learning benchmark from the command line.

Example::

    dpal bench --dataset animal-mnist --backbone proxy --strategies all --seeds 3 \\
        --out benchmarks/results/animal-mnist
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from dpal_core.config import Paradigm, WrongClass

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "dpal" / "bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``dpal bench`` options to ``parser``."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="animal-mnist",
                   help="'animal-mnist' (built in) or an image folder <dir>/<class_name>/*.png")  # fmt: skip
    g.add_argument("--test-split", default=None,
                   help="folders: test images in <dataset>/<TEST_SPLIT>/, pool in <dataset>/train/")  # fmt: skip
    g.add_argument("--test-dir", default=None, help="folders: a separate folder of test images")
    g.add_argument("--shift", default=None,
                   help="domain shift applied to pool and test (default: 'noise' for animal-mnist, 'none' for folders)")  # fmt: skip
    g.add_argument("--pool-size", type=int, default=0, help="stratified subset of the pool (0 = all)")
    g.add_argument("--test-size", type=int, default=0, help="stratified subset of the test set (0 = all)")
    g = parser.add_argument_group("protocol")
    g.add_argument("--backbone", default="proxy", help="'proxy' (offline, built once), a CLIP id or a folder")
    g.add_argument("--strategies", default="all", help="comma-separated strategy names, or 'all'")
    g.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    g.add_argument("--rounds", type=int, default=8)
    g.add_argument(
        "--queries-per-round", type=int, default=0, help="labels per round (0 = number of classes)"
    )
    g.add_argument("--round0", choices=("zeroshot", "random"), default="zeroshot",
                   help="first query: the strategy on zero-shot scores, or random (PCB's protocol)")  # fmt: skip
    g.add_argument("--warm-start", action="store_true", help="continue from last round's prompts")
    g = parser.add_argument_group("model (defaults: the benchmark's tuned settings)")
    g.add_argument("--paradigm", choices=[p.value for p in Paradigm], default=None)
    g.add_argument("--wrong-class", choices=[w.value for w in WrongClass], default=None)
    g.add_argument("--n-ctx", type=int, default=None, help="context vectors per prompt")
    g.add_argument("--anchor-weight", type=float, default=None, help="pull of t+ towards the hand prompt (0 = off)")
    g.add_argument("--crossfit-folds", type=int, default=None, help="0 = plain training; >= 2 folds")
    g.add_argument("--pool-weight", type=float, default=None,
                   help="weight of cross-fitting's unlabelled-pool term (0 = labels only)")  # fmt: skip
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, help="results folder (results.json, results.md, curves.png)")
    g.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="image-embedding cache ('' = none)")
    g.add_argument("--jobs", type=int, default=0,
                   help="runs in parallel processes (0 = one per CPU core on CPU, 1 on a GPU)")  # fmt: skip
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest for small models on a busy machine)")  # fmt: skip
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    """A :class:`BenchConfig` from parsed arguments."""
    from dpal_core.bench.prepare import DataSpec
    from dpal_core.bench.protocol import BenchConfig
    from dpal_core.strategies import strategy_names

    names = strategy_names() if args.strategies.strip() == "all" else args.strategies.split(",")
    base = BenchConfig()
    prompt, train, fit = base.prompt, base.train, base.fit
    if args.paradigm:
        prompt = replace(prompt, paradigm=args.paradigm)
    if args.n_ctx:
        prompt = replace(prompt, n_ctx=args.n_ctx)
    if args.wrong_class:
        train = replace(train, wrong_class=args.wrong_class)
    if args.anchor_weight is not None:
        train = replace(train, anchor_weight=args.anchor_weight)
    if args.crossfit_folds is not None:
        fit = replace(fit, crossfit=replace(fit.crossfit, folds=args.crossfit_folds))
    if args.pool_weight is not None:
        fit = replace(fit, crossfit=replace(fit.crossfit, pool_weight=args.pool_weight))
    return BenchConfig(
        data=DataSpec(
            args.dataset, args.test_split, args.test_dir, args.shift, args.pool_size, args.test_size
        ),
        backbone=args.backbone,
        strategies=tuple(n.strip() for n in names if n.strip()),
        seeds=args.seeds,
        rounds=args.rounds,
        queries_per_round=args.queries_per_round,
        round0=args.round0,
        warm_start=args.warm_start,
        prompt=prompt,
        train=train,
        fit=fit,
    )


def default_jobs(config) -> int:
    """One run per CPU core on CPU (each single-threaded); one on a GPU, which parallelises itself."""
    import os

    import torch

    if config.train.device != "cpu" and torch.cuda.is_available():
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run(args: argparse.Namespace) -> int:
    """Run ``dpal bench``; returns the exit code (2 for bad settings or data)."""
    import torch

    from dpal_core.bench.protocol import run_benchmark
    from dpal_core.errors import DpalError

    torch.set_num_threads(max(1, args.threads))
    argv = getattr(args, "argv", None)
    if argv is None:  # called by `dpal bench`: record what followed the subcommand
        argv = sys.argv[sys.argv.index("bench") + 1 :] if "bench" in sys.argv else []
    command = "dpal bench " + " ".join(shlex.quote(a) for a in argv)
    try:
        config = config_from_args(args)
        jobs = args.jobs or default_jobs(config)
        results = run_benchmark(
            config, args.out, cache_dir=args.cache_dir or None, command=command,
            progress=not args.no_progress, jobs=jobs,
        )  # fmt: skip
    except DpalError as exc:
        print(f"dpal bench: {exc}", file=sys.stderr)
        return 2
    for name, s in results["summary"].items():
        log.info("%-16s final %.3f ± %.3f  AUBC %.3f  error AUROC %.3f (%s)", name, s["final_accuracy_mean"],
                 s["final_accuracy_std"], s["aubc_mean"], s["error_auroc_mean"], s["error_auroc_signal"])  # fmt: skip
    print(f"wrote {Path(args.out) / 'results.json'}, results.md and curves.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dpal_core.bench.cli ...`` (the same options as ``dpal bench``)."""
    parser = argparse.ArgumentParser(prog="dpal bench", description="Active-learning benchmark.")
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
