"""Summaries of a benchmark's results: a JSON summary, a Markdown table and a learning-curve plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TABLE_FILE = "results.md"
PLOT_FILE = "curves.png"
ROUND_AUROCS = ("auroc_p_clean", "auroc_max_softmax", "auroc_neg_entropy")


def aubc(n_labels: np.ndarray, acc: np.ndarray) -> float:
    """Area under the accuracy-vs-labels curve, normalised by the label range (trapezoids).

    A single round's area is its accuracy.
    """
    n_labels, acc = np.asarray(n_labels, dtype=np.float64), np.asarray(acc, dtype=np.float64)
    if len(acc) == 1:
        return float(acc[0])
    return float(np.sum((acc[1:] + acc[:-1]) / 2 * np.diff(n_labels)) / (n_labels[-1] - n_labels[0]))


def _std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per strategy, over its complete seeds: final accuracy, AUBC and error-detection AUROCs.

    ``error_auroc_mean`` is the AUROC of the strategy's own uncertainty signal (named in
    ``error_auroc_signal``) as a detector of the test-set errors, averaged over every round's model
    and every seed; std is the sample standard deviation over seeds.
    """
    summary: dict[str, dict[str, Any]] = {}
    for strategy, by_seed in results.get("runs", {}).items():
        runs = [r["rounds"] for r in by_seed.values() if r.get("complete") and r.get("rounds")]
        if not runs:
            continue
        n_rounds = min(len(r) for r in runs)
        runs = [r[:n_rounds] for r in runs]
        n_labels = np.array([rec["n_labels"] for rec in runs[0]])
        acc = np.array([[rec["accuracy"] for rec in r] for r in runs])  # [seeds, rounds]
        areas = np.array([aubc(n_labels, a) for a in acc])

        def mean_of(key: str, rs: list[list[dict[str, Any]]] = runs) -> float:
            vals = [rec[key] for r in rs for rec in r if rec.get(key) is not None]
            vals = [v for v in vals if v == v]  # NaN: a model with no errors (or only errors)
            return round(float(np.mean(vals)), 4) if vals else float("nan")

        per_seed_signal = np.array([np.nanmean([rec.get("auroc_signal", np.nan) for rec in r]) for r in runs])
        summary[strategy] = {
            "n_seeds": len(runs),
            "n_labels": n_labels.tolist(),
            "accuracy_curve_mean": np.round(acc.mean(axis=0), 4).tolist(),
            "final_accuracy_mean": round(float(acc[:, -1].mean()), 4),
            "final_accuracy_std": round(_std(acc[:, -1]), 4),
            "aubc_mean": round(float(areas.mean()), 4),
            "aubc_std": round(_std(areas), 4),
            "error_auroc_mean": mean_of("auroc_signal"),
            "error_auroc_std": round(_std(per_seed_signal), 4),
            "error_auroc_signal": runs[0][0].get("signal"),
            **{f"{k}_mean": mean_of(k) for k in ROUND_AUROCS},
            "final_auroc_p_clean_mean": mean_of("auroc_p_clean", [r[-1:] for r in runs]),
            "final_auroc_max_softmax_mean": mean_of("auroc_max_softmax", [r[-1:] for r in runs]),
            "ece_p_clean_mean": mean_of("ece_p_clean"),
            "ece_max_softmax_mean": mean_of("ece_max_softmax"),
        }
    return summary


def _bold_best(values: dict[str, float], text: dict[str, str]) -> dict[str, str]:
    finite = {k: v for k, v in values.items() if v == v}
    if not finite:
        return text
    best = max(finite.values())
    return {k: (f"**{t}**" if values[k] == best else t) for k, t in text.items()}


def markdown_table(results: dict[str, Any]) -> str:
    """The results table: final accuracy and AUBC (mean ± std over seeds, best in bold) and AUROCs."""
    summary = results.get("summary") or summarize(results)
    names = list(summary)
    fin = {s: summary[s]["final_accuracy_mean"] for s in names}
    area = {s: summary[s]["aubc_mean"] for s in names}
    own = {s: summary[s]["error_auroc_mean"] for s in names}
    fin_t = _bold_best(fin, {s: f"{fin[s]:.3f} ± {summary[s]['final_accuracy_std']:.3f}" for s in names})
    area_t = _bold_best(area, {s: f"{area[s]:.3f} ± {summary[s]['aubc_std']:.3f}" for s in names})
    own_t = _bold_best(own, {s: f"{own[s]:.3f} ({summary[s]['error_auroc_signal']})" for s in names})
    lines = [
        "| strategy | final accuracy | AUBC | error AUROC, own signal | error AUROC p_clean / max-softmax / −entropy |",
        "|---|---|---|---|---|",
    ]
    for s in names:
        trio = {k: summary[s][f"{k}_mean"] for k in ROUND_AUROCS}
        trio_t = _bold_best(trio, {k: f"{v:.3f}" for k, v in trio.items()})
        lines.append(
            f"| {s} | {fin_t[s]} | {area_t[s]} | {own_t[s]} | {' / '.join(trio_t[k] for k in ROUND_AUROCS)} |"
        )
    zs = results.get("zero_shot", {})
    if zs:
        acc = np.mean([z["accuracy"] for z in zs.values()])
        au = np.mean([z["auroc_max_softmax"] for z in zs.values()])
        lines.append(f"| *zero-shot (0 labels)* | {acc:.3f} | – | {au:.3f} (max-softmax) | – |")
    return "\n".join(lines)


def report_markdown(results: dict[str, Any]) -> str:
    """The whole ``results.md``: settings, command, table and how to read it."""
    cfg, meta = results.get("config", {}), results.get("meta", {})
    summary = results.get("summary") or summarize(results)
    any_s = next(iter(summary.values()), {})
    n_labels = any_s.get("n_labels", [])
    seeds = sorted({int(s) for by_seed in results.get("runs", {}).values() for s in by_seed})
    parts = [
        f"# Active-learning benchmark: {cfg.get('data', {}).get('dataset', '?')}",
        "",
        f"Command: `{meta.get('command') or 'dpal bench'}`",
        "",
        f"Backbone `{meta.get('backbone_id', cfg.get('backbone'))}`; shift "
        f"`{meta.get('shift') or cfg.get('data', {}).get('shift') or 'default'}`; pool {meta.get('n_pool', '?')} images, "
        f"test {meta.get('n_test', '?')}; {len(n_labels)} rounds, labels {n_labels}; seeds {seeds}; "
        f"round 0 from `{cfg.get('round0')}`; prompts "
        f"{'warm-started' if cfg.get('warm_start') else 're-initialised each round'}; "
        f"paradigm `{cfg.get('prompt', {}).get('paradigm')}`, wrong class "
        f"`{cfg.get('train', {}).get('wrong_class')}`.",
        "",
        markdown_table(results),
        "",
        "Final accuracy: test accuracy after the last round. AUBC: area under the accuracy-vs-labels "
        "curve over the rounds, normalised by the label range. Both are mean ± sample std over seeds; "
        "best in bold. Error AUROC: how well a confidence score separates the test set's right from "
        "wrong predictions (0.5 = chance), averaged over every round's model and every seed. Every "
        "strategy trains the same dual-prompt model; only the selection differs.",
        "",
    ]
    return "\n".join(parts)


def plot_curves(results: dict[str, Any], path: str | Path) -> Path:
    """Learning curves (mean ± std over seeds) of every strategy, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results.get("summary") or summarize(results)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for strategy in summary:
        runs = [r["rounds"] for r in results["runs"][strategy].values() if r.get("complete")]
        n_rounds = min(len(r) for r in runs)
        acc = np.array([[rec["accuracy"] for rec in r[:n_rounds]] for r in runs])
        x = [rec["n_labels"] for rec in runs[0][:n_rounds]]
        main = strategy == "dual_prompt"
        (line,) = ax.plot(x, acc.mean(0), marker="o", ms=3, lw=2.5 if main else 1.2, label=strategy,
                          zorder=3 if main else 2)  # fmt: skip
        if len(runs) > 1:
            ax.fill_between(
                x, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), alpha=0.12, color=line.get_color()
            )
    zs = results.get("zero_shot", {})
    if zs:
        ax.axhline(np.mean([z["accuracy"] for z in zs.values()]), ls="--", c="grey", lw=1, label="zero-shot")
    ax.set_xlabel("labelled images")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{results.get('config', {}).get('data', {}).get('dataset', '')}: accuracy vs labels")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(results: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.md`` and ``curves.png`` into ``out_dir``."""
    out = Path(out_dir)
    table = out / TABLE_FILE
    table.write_text(report_markdown(results))
    return table, plot_curves(results, out / PLOT_FILE)
