"""Time every registered selection strategy on a large random pool and report its peak memory.

Usage:
    .venv/bin/python benchmarks/strategy_speed.py [--n 100000] [--classes 10] [--dim 512]
        [--budget 100] [--labelled 1000] [--only entropy,coreset]

Peak memory is what tracemalloc sees allocated *during* the selection (numpy reports its buffers
to tracemalloc); the pool arrays themselves are built before tracing starts. Timings are taken
with tracing on, which adds a little overhead to Python-level allocations.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from dpal_core.strategies import SelectionInput, select, strategy_names


def make_pool(n: int, classes: int, dim: int, labelled: int, seed: int) -> SelectionInput:
    """A random pool: softmax of Gaussian logits, uniform p_clean, unit-norm float32 embeddings."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n, classes))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    emb = rng.normal(size=(n + labelled, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    counts = np.bincount(rng.integers(classes, size=labelled), minlength=classes)
    return SelectionInput(
        probs=probs,
        p_clean=rng.random(n),
        embeddings=emb[:n],
        labeled_embeddings=emb[n:],
        labeled_counts=counts,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="pool size N")
    parser.add_argument("--classes", type=int, default=10, help="number of classes C")
    parser.add_argument("--dim", type=int, default=512, help="embedding width D")
    parser.add_argument("--budget", type=int, default=100, help="samples picked per strategy")
    parser.add_argument("--labelled", type=int, default=1000, help="labelled embeddings L")
    parser.add_argument("--seed", type=int, default=0, help="seed for the pool and the strategies")
    parser.add_argument("--only", default="", help="comma-separated strategy names (default: all)")
    args = parser.parse_args()

    names = [s for s in args.only.split(",") if s] or strategy_names()
    inp = make_pool(args.n, args.classes, args.dim, args.labelled, args.seed)
    print(
        f"N={args.n} C={args.classes} D={args.dim} L={args.labelled} budget={args.budget} "
        f"(embeddings {inp.embeddings.nbytes / 2**20:.0f} MiB)"
    )
    print(f"{'strategy':<18}{'seconds':>10}{'peak MiB':>11}")
    tracemalloc.start()
    for name in names:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        picks = select(name, inp, args.budget, np.random.default_rng(args.seed))
        seconds = time.perf_counter() - start
        peak = (tracemalloc.get_traced_memory()[1] - base) / 2**20
        print(f"{name:<18}{seconds:>10.3f}{peak:>11.1f}", flush=True)
        del picks
    tracemalloc.stop()


if __name__ == "__main__":
    main()
