"""The active-learning benchmark protocol (docs/method.md, "Protocol used by the literature").

For every (strategy, seed): round 1 queries ``C`` samples with the strategy applied to the zero-shot
model's scores (method.md, "Cold start"; ``round0="random"`` reproduces PCB's random round 0), then
each round trains a dual-prompt model on all labels so far (prompts re-initialised unless
``warm_start``), evaluates it on the test set, and lets the strategy pick the next ``C`` samples
from that model's scores on the unlabelled pool. Every strategy trains the same model in the same
way; only the selection differs, so the comparison isolates selection.

Results go to one JSON file, rewritten atomically after every round. A rerun with the same
settings skips the (strategy, seed) runs the file holds complete and restarts the partial ones.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dpal_core.backbone import Backbone, load_backbone
from dpal_core.bench.fit import FitOptions, evaluate, fit_round
from dpal_core.bench.prepare import BenchData, DataSpec, prepare_data
from dpal_core.config import Paradigm, PromptConfig, TrainConfig
from dpal_core.errors import ConfigError
from dpal_core.model import DualPromptCLIP, ZeroShotCLIP, predict
from dpal_core.strategies import SelectionInput, get_strategy, select, strategy_names

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
FORMAT = "dpal-bench/1"
PROXY = "proxy"
ROUND0_MODES = ("zeroshot", "random")

# The benchmark's defaults for the dual-prompt model, chosen by the ablations in
# benchmarks/results/animal-mnist/ABLATIONS.md.
BENCH_PROMPT = PromptConfig(n_ctx=4, init="words", paradigm="adapter")
# 50 epochs: the step count grows with the labels (50 steps at 10 labels, 150 at 80), and the
# anchor to the hand prompt keeps the 10-label rounds from forgetting zero-shot knowledge.
BENCH_TRAIN = TrainConfig(optimizer="adamw", lr=5e-3, epochs=50, anchor_weight=2.0)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark: data, backbone, strategies, seeds and the model every strategy trains."""

    data: DataSpec = DataSpec()
    backbone: str = PROXY  # "proxy", a Hugging Face CLIP id, or a local CLIP folder
    strategies: tuple[str, ...] = field(default_factory=lambda: tuple(strategy_names()))
    seeds: int = 3  # seeds 0 .. seeds-1; each seed redraws the split, the queries and the training
    rounds: int = 8
    queries_per_round: int = 0  # 0 = the number of classes C
    round0: str = (
        "zeroshot"  # how the first query is chosen: "zeroshot" (strategy on zero-shot scores) or "random"
    )
    warm_start: bool = False  # continue from the previous round's prompts instead of re-initialising
    prompt: PromptConfig = BENCH_PROMPT
    train: TrainConfig = BENCH_TRAIN
    fit: FitOptions = FitOptions()

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategies", tuple(self.strategies))
        if not self.strategies:
            raise ConfigError("no strategies given")
        for name in self.strategies:
            get_strategy(name)  # raises with the list of known names
        if len(set(self.strategies)) != len(self.strategies):
            raise ConfigError(f"strategies listed twice: {list(self.strategies)}")
        if self.round0 not in ROUND0_MODES:
            raise ConfigError(f"round0={self.round0!r} is not one of: {', '.join(ROUND0_MODES)}")
        if self.seeds < 1 or self.rounds < 1 or self.queries_per_round < 0:
            raise ConfigError("seeds and rounds must be >= 1 and queries_per_round >= 0")

    def comparable(self) -> dict[str, Any]:
        """The settings a resumed run must share with the stored one (strategies and seeds may grow)."""
        d = to_jsonable(self)
        d.pop("strategies")
        d.pop("seeds")
        return d


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, enums and tuples -> plain JSON values."""
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    return obj


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` so a reader (or a crash) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True, allow_nan=True)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_results(path: Path, config: BenchConfig) -> dict[str, Any]:
    """The stored results to resume from, without partial runs; a fresh record when none exist.

    Raises:
        ConfigError: the file was made with other settings (resuming would mix two benchmarks).
    """
    fresh = {"format": FORMAT, "config": to_jsonable(config), "zero_shot": {}, "runs": {}, "summary": {}}
    if not path.is_file():
        return fresh
    stored = json.loads(path.read_text())
    if stored.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a {FORMAT} results file; choose another --out")
    old = dict(stored.get("config", {}))
    old.pop("strategies", None)
    old.pop("seeds", None)
    if old != config.comparable():
        diff = sorted(
            k for k in set(old) | set(config.comparable()) if old.get(k) != config.comparable().get(k)
        )
        raise ConfigError(
            f"{path} holds results made with other settings ({', '.join(diff)} differ); "
            "use another --out, or delete the file to start over"
        )
    stored["config"] = to_jsonable(config)
    for strategy, by_seed in stored.get("runs", {}).items():
        stored["runs"][strategy] = {s: r for s, r in by_seed.items() if r.get("complete")}
    return stored


def resolve_backbone(name: str, device: str = "cpu", progress: bool = True) -> Backbone:
    """Load ``name``; ``"proxy"`` builds (or finds cached) the offline proxy backbone."""
    if name == PROXY:
        from dpal_core.bench.proxy import build_proxy

        return load_backbone(str(build_proxy(progress=progress)), device=device)
    return load_backbone(name, device=device)


def run_benchmark(
    config: BenchConfig,
    out_dir: str | Path,
    backbone: Backbone | None = None,
    cache_dir: str | Path | None = None,
    command: str | None = None,
    progress: bool = True,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run every missing (strategy, seed) of ``config``; write ``<out_dir>/results.json`` and the report.

    Args:
        backbone: an already loaded backbone (tests); default: load ``config.backbone``.
        cache_dir: where image embeddings are cached (None: no cache).
        command: the command line that made the results, recorded for the report.
        jobs: runs in parallel, one process each (CPU: one per core is fastest, each single-threaded).
            With 1, results are saved after every round; with more, after every run.
    Returns:
        The results record (also written to disk), including its ``summary``.
    """
    from dpal_core.bench.report import summarize, write_report

    if jobs > 1 and not cache_dir:
        raise ConfigError("parallel runs (--jobs > 1) share the image-embedding cache; give a cache folder")
    out = Path(out_dir)
    path = out / RESULTS_FILE
    results = load_results(path, config)
    device = "cuda" if config.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    backbone = backbone or resolve_backbone(config.backbone, device, progress)
    meta = results.setdefault("meta", {})
    todo = [
        (seed, s) for seed in range(config.seeds) for s in config.strategies
        if str(seed) not in results["runs"].get(s, {})
    ]  # fmt: skip
    jobs = max(1, min(jobs, len(todo)))
    # The table lists strategies in the order they were asked for (parallel runs finish in any order).
    stored = results["runs"]
    results["runs"] = {s: stored.get(s, {}) for s in config.strategies}
    results["runs"].update((s, r) for s, r in stored.items() if s not in results["runs"])
    meta.update(
        shift=config.data.shift_name,
        backbone_id=backbone.backbone_id,
        command=command or meta.get("command"),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
    )
    if todo:  # a rerun that only rewrites the report keeps what the computing run recorded
        meta["jobs"] = jobs
    log.info("%d of %d runs to do (%s)", len(todo), config.seeds * len(config.strategies), path)
    bar = tqdm(total=len(todo) * config.rounds, desc="benchmark", unit="round", disable=not progress)
    cache = Path(cache_dir) if cache_dir else None
    data_cache: dict[int, BenchData] = {}

    def data_for(seed: int) -> BenchData:
        if seed not in data_cache:
            data_cache.clear()  # one seed's pool at a time: todo is ordered by seed
            data_cache[seed] = prepare_data(config.data, backbone, seed, cache, pixels=_needs_pixels(config))
            d = data_cache[seed]
            meta.update(class_names=list(d.class_names), n_pool=len(d.pool_labels), n_test=len(d.test_labels))
            zs = ZeroShotCLIP(backbone, d.class_names)
            results["zero_shot"][str(seed)] = evaluate(zs, d, features=d.test_features)
        return data_cache[seed]

    def finish(seed: int, strategy: str, rounds: list[dict[str, Any]], seconds: float) -> None:
        results["runs"].setdefault(strategy, {})[str(seed)] = {
            "complete": True, "rounds": rounds, "seconds": round(seconds, 1)
        }  # fmt: skip
        results["summary"] = summarize(results)
        write_json_atomic(path, results)
        log.info("%s seed %d: final accuracy %.3f", strategy, seed, rounds[-1]["accuracy"])

    if jobs == 1:
        for seed, strategy in todo:
            data = data_for(seed)
            run = results["runs"].setdefault(strategy, {})
            started = time.perf_counter()

            def save_round(record: dict[str, Any], run_rounds: list[dict[str, Any]]) -> None:
                run[str(seed)] = {"complete": False, "rounds": run_rounds}  # noqa: B023 - called in-loop
                write_json_atomic(path, results)
                bar.set_postfix(strategy=strategy, seed=seed, acc=f"{record['accuracy']:.3f}")  # noqa: B023
                bar.update(1)

            rounds = run_strategy(config, backbone, data, strategy, seed, save_round)
            finish(seed, strategy, rounds, time.perf_counter() - started)
    else:
        for seed in sorted({seed for seed, _ in todo}):
            data_for(seed)  # encode (and cache) every seed's images once, here, not in each worker
        data_cache.clear()
        _run_parallel(config, backbone.backbone_id, todo, cache, jobs, finish, bar)
    bar.close()
    results["summary"] = summarize(results)
    write_json_atomic(path, results)
    write_report(results, out)
    return results


def _run_parallel(config, backbone_id, todo, cache, jobs, finish, bar) -> None:
    """Run ``todo`` on ``jobs`` worker processes; ``finish`` stores each run as it completes."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: a fresh interpreter per worker (fork after torch's thread pools start is unsafe).
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {
            pool.submit(_worker_run, config, backbone_id, seed, strategy, str(cache)): (seed, strategy)
            for seed, strategy in todo
        }
        for fut in as_completed(futures):
            seed, strategy = futures[fut]
            rounds, seconds = fut.result()
            finish(seed, strategy, rounds, seconds)
            bar.set_postfix(strategy=strategy, seed=seed, acc=f"{rounds[-1]['accuracy']:.3f}")
            bar.update(len(rounds))


def _worker_run(config: BenchConfig, backbone_id: str, seed: int, strategy: str, cache: str):
    """One (strategy, seed) in a worker process: load the backbone, read the cached embeddings, run."""
    torch.set_num_threads(1)
    logging.getLogger("dpal_core").setLevel(logging.WARNING)  # the parent logs each finished run
    device = "cuda" if config.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    backbone = resolve_backbone(config.backbone, device, progress=False)
    if backbone.backbone_id != backbone_id:
        raise ConfigError(f"worker loaded backbone {backbone.backbone_id}, expected {backbone_id}")
    data = prepare_data(config.data, backbone, seed, Path(cache), pixels=_needs_pixels(config))
    started = time.perf_counter()
    rounds = run_strategy(config, backbone, data, strategy, seed)
    return rounds, time.perf_counter() - started


def _needs_pixels(config: BenchConfig) -> bool:
    return config.prompt.paradigm == Paradigm.VPT


def run_strategy(
    config: BenchConfig, backbone: Backbone, data: BenchData, strategy: str, seed: int, on_round=None
) -> list[dict[str, Any]]:
    """One (strategy, seed) learning curve: ``config.rounds`` rounds of query -> train -> evaluate.

    Returns:
        One record per round: n_labels, accuracy, error-detection AUROCs, ECE, timings, the queried
        pool indices and their classes.
    """
    n_classes = len(data.class_names)
    budget = config.queries_per_round or n_classes
    rng = np.random.default_rng([seed, 20261203])  # the same stream for every strategy of a seed
    n_pool = len(data.pool_labels)
    labeled = np.zeros(0, dtype=np.int64)
    model: ZeroShotCLIP | DualPromptCLIP = ZeroShotCLIP(backbone, data.class_names)
    rounds: list[dict[str, Any]] = []
    for r in range(1, config.rounds + 1):
        t0 = time.perf_counter()
        unlabeled = np.setdiff1d(np.arange(n_pool), labeled)
        if len(unlabeled) == 0:
            raise ConfigError(f"the pool ({n_pool} images) ran out before round {r}; use fewer rounds")
        pred = _pool_prediction(model, data, unlabeled)
        inp = SelectionInput(
            probs=pred.probs.numpy(),
            p_clean=pred.p_clean.numpy(),
            embeddings=data.pool_features[unlabeled].numpy(),
            labeled_embeddings=data.pool_features[labeled].numpy(),
            labeled_counts=np.bincount(data.pool_labels[labeled], minlength=n_classes),
        )
        chooser = "random" if (r == 1 and config.round0 == "random") else strategy
        picks = unlabeled[select(chooser, inp, budget, rng)]
        labeled = np.concatenate([labeled, picks])
        t1 = time.perf_counter()
        previous = model if (config.warm_start and isinstance(model, DualPromptCLIP)) else None
        model = fit_round(
            backbone, data, labeled, config.prompt, config.train, config.fit, seed * 1000 + r, previous
        )
        t2 = time.perf_counter()
        record = {"round": r, "n_labels": int(len(labeled))}
        record.update(evaluate(model, data, strategy=strategy))
        record.update(
            select_s=round(t1 - t0, 3),
            train_s=round(t2 - t1, 3),
            queried=picks.tolist(),
            queried_classes=data.pool_labels[picks].tolist(),
        )
        rounds.append(record)
        if on_round is not None:
            on_round(record, rounds)
    return rounds


def _pool_prediction(model, data: BenchData, idx: np.ndarray):
    if isinstance(model, DualPromptCLIP) and model.needs_pixels:
        return predict(model, pixel_values=data.pool_pixels[idx])
    return predict(model, features=data.pool_features[idx])


def config_with(config: BenchConfig, **changes: Any) -> BenchConfig:
    """``dataclasses.replace`` that also accepts dicts for the nested configs."""
    for key, cls in (
        ("prompt", PromptConfig),
        ("train", TrainConfig),
        ("fit", FitOptions),
        ("data", DataSpec),
    ):
        if isinstance(changes.get(key), dict):
            changes[key] = cls(**{**asdict(getattr(config, key)), **changes[key]})
    return replace(config, **changes)
