"""Smoke test of the benchmark: tiny CLIP, a synthetic image folder, 2 rounds, 1 seed (seconds)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpal_core.bench import protocol
from dpal_core.bench.fit import FitOptions
from dpal_core.bench.prepare import DataSpec
from dpal_core.bench.protocol import BenchConfig, config_with, run_benchmark
from dpal_core.bench.report import aubc
from dpal_core.config import TrainConfig
from dpal_core.errors import ConfigError

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
SUMMARY_KEYS = {"final_accuracy_mean", "final_accuracy_std", "aubc_mean", "error_auroc_mean"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """<root>/{train,test}/<colour>/*.png: noisy colour patches, 8 train and 3 test per class."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 3)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(rgb) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture()
def config(folder: Path) -> BenchConfig:
    return BenchConfig(
        data=DataSpec(dataset=str(folder), test_split="test"),
        backbone="unused: the test passes its backbone",
        strategies=("dual_prompt", "random", "coreset"),
        seeds=1,
        rounds=2,
        train=TrainConfig(optimizer="adamw", lr=5e-3, target_steps=4, batch_size=8),
    )


def _count_fits(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = protocol.fit_round

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "fit_round", counting)
    return calls


def test_benchmark_writes_results_and_resumes(tmp_path, backbone, config, monkeypatch) -> None:
    out = tmp_path / "out"
    calls = _count_fits(monkeypatch)
    results = run_benchmark(config, out, backbone=backbone, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 3 * 2  # strategies x rounds

    stored = json.loads((out / "results.json").read_text())
    assert set(stored["summary"]) == set(config.strategies)
    for name, s in stored["summary"].items():
        assert SUMMARY_KEYS <= set(s), name
        assert 0.0 <= s["final_accuracy_mean"] <= 1.0 and s["n_seeds"] == 1
    run = stored["runs"]["dual_prompt"]["0"]
    assert run["complete"] and [r["n_labels"] for r in run["rounds"]] == [3, 6]  # C = 3 per round
    assert {"accuracy", "auroc_p_clean", "auroc_max_softmax", "auroc_neg_entropy", "ece_p_clean"} <= set(
        run["rounds"][0]
    )
    assert stored["summary"]["dual_prompt"]["error_auroc_signal"] == "dual_prompt"
    assert stored["summary"]["random"]["error_auroc_signal"] == "least_confidence"
    assert "0" in stored["zero_shot"]
    # as JSON: a model with no errors has an undefined (NaN) AUROC, and NaN != NaN in a dict compare
    assert json.dumps(results["summary"], sort_keys=True) == json.dumps(stored["summary"], sort_keys=True)
    assert (out / "curves.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| dual_prompt |" in table and "**" in table

    # A rerun finds every run complete and trains nothing.
    calls.clear()
    run_benchmark(config, out, backbone=backbone, cache_dir=tmp_path / "cache", progress=False)
    assert calls == []

    # A partial run (interrupted mid-way) is restarted; complete ones are kept; new strategies run.
    stored["runs"]["random"]["0"]["complete"] = False
    (out / "results.json").write_text(json.dumps(stored))
    more = replace(config, strategies=(*config.strategies, "entropy"))
    run_benchmark(more, out, backbone=backbone, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 2 * 2
    assert set(json.loads((out / "results.json").read_text())["summary"]) == set(more.strategies)


def test_resume_refuses_other_settings(tmp_path, backbone, config) -> None:
    out = tmp_path / "out"
    small = replace(config, strategies=("random",), rounds=1)
    run_benchmark(small, out, backbone=backbone, progress=False)
    with pytest.raises(ConfigError, match="rounds"):
        run_benchmark(replace(small, rounds=2), out, backbone=backbone, progress=False)


def test_round0_random_warm_start_and_crossfit(tmp_path, backbone, config) -> None:
    cfg = config_with(
        config, strategies=("dual_prompt",), round0="random", warm_start=True,
        fit={"crossfit": {"folds": 2, "steps": 2, "pool_size": 8}, "neg_class_specific": True},
    )  # fmt: skip
    results = run_benchmark(cfg, tmp_path / "out", backbone=backbone, progress=False)
    assert results["summary"]["dual_prompt"]["n_labels"] == [3, 6]


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="unknown selection strategy"):
        BenchConfig(strategies=("nope",))
    with pytest.raises(ConfigError, match="round0"):
        BenchConfig(round0="first")
    with pytest.raises(ConfigError, match="folds"):
        FitOptions(crossfit={"folds": 1})


def test_aubc() -> None:
    assert aubc(np.array([10, 20, 30]), np.array([0.2, 0.4, 0.4])) == pytest.approx(0.35)
    assert aubc(np.array([10]), np.array([0.3])) == pytest.approx(0.3)


def test_parallel_runs_match_serial_runs(tmp_path, backbone, tiny_clip_dir, config) -> None:
    cfg = replace(config, backbone=str(tiny_clip_dir), strategies=("dual_prompt", "random"))
    cache = tmp_path / "cache"
    serial = run_benchmark(cfg, tmp_path / "serial", backbone=backbone, cache_dir=cache, progress=False)
    parallel = run_benchmark(cfg, tmp_path / "parallel", cache_dir=cache, progress=False, jobs=2)
    for strategy in cfg.strategies:
        a, b = serial["runs"][strategy]["0"]["rounds"], parallel["runs"][strategy]["0"]["rounds"]
        assert [r["queried"] for r in a] == [r["queried"] for r in b]
        assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b]
    assert parallel["meta"]["jobs"] == 2
    with pytest.raises(ConfigError, match="cache"):
        run_benchmark(cfg, tmp_path / "nocache", progress=False, jobs=2)


def test_cli_arguments(folder: Path) -> None:
    from backend.cli import build_parser
    from dpal_core.bench.cli import config_from_args

    args = build_parser().parse_args(
        ["bench", "--dataset", str(folder), "--test-split", "test", "--strategies", "random,badge",
         "--seeds", "2", "--paradigm", "adapter", "--wrong-class", "hardest", "--crossfit-folds", "0",
         "--pool-weight", "2", "--jobs", "3", "--out", "x"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.strategies == ("random", "badge") and cfg.seeds == 2
    assert cfg.prompt.paradigm.value == "adapter" and cfg.train.wrong_class.value == "hardest"
    assert cfg.fit.crossfit.folds == 0 and cfg.fit.crossfit.pool_weight == 2 and args.jobs == 3
    assert cfg.data.test_split == "test"
    all_args = build_parser().parse_args(["bench", "--out", "x"])
    assert len(config_from_args(all_args).strategies) == 9
