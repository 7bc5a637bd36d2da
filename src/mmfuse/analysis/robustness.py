"""Robustness of a trained model: missing modalities, modality importance, noisy inputs.

Three studies, each a function with a typed result, and ``run_robustness`` for all three:

- ``missing_subsets``: every task metric for each of the 2^M - 1 non-empty subsets of the model's M
  modalities present (the others hidden from every sample, as ``evaluate(absent=...)`` does), plus
  the empty set: everything hidden, the model's chance-level baseline.
- ``shapley_importance``: per modality, the ablation delta ``v(all) - v(all without m)`` and the
  exact Shapley value over modalities of the game ``v(S)`` = the main metric with only S present,
  overall and per class (per-class accuracy = recall of that class). For a metric where lower is
  better (regression MAE) ``v`` is the negated metric, so a positive importance always means the
  modality helps, in the metric's units. By efficiency the Shapley values sum to v(all) - v(empty).
- ``noise_robustness``: the main metric with one modality corrupted at levels 0.0, 0.1, ..., 1.0
  by each corruption of ``mmfuse.data.corrupt`` that fits its kind, applied to the raw input (the
  decoded image / waveform / text) before the model's own preprocessing; and the area under each
  metric-vs-level curve (trapezoid over [0, 1]: 1.0 = perfect accuracy at every level).
  Files are decoded once per sample and reused across corruptions and levels; corruption of sample
  i uses ``sample_rng(seed, i)``, so results are reproducible.
"""


from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.table import Table

from mmfuse.analysis.importance import ImportanceResult, shapley_importance, shapley_values
from mmfuse.analysis.noise import (
    DecodedSet,
    NoiseCurve,
    NoiseResult,
    decode_records,
    evaluation_records,
    noise_levels,
    noise_robustness,
    plan_corruptions,
)
from mmfuse.analysis.subsets import (
    CachedRunner,
    MissingSubsetsResult,
    SubsetScore,
    enumerate_subsets,
    missing_subsets,
    subset_name,
)
from mmfuse.data.dataset import SkipReport
from mmfuse.data.manifest import Record
from mmfuse.model import MultimodalModel

__all__ = [
    "CachedRunner", "DecodedSet", "ImportanceResult", "MissingSubsetsResult", "NoiseCurve", "NoiseResult",
    "RobustnessReport", "SubsetScore", "decode_records", "enumerate_subsets", "evaluation_records",
    "missing_subsets", "noise_levels", "noise_robustness", "plan_corruptions", "report_tables", "run_robustness",
    "shapley_importance", "shapley_values", "subset_name", "write_report"
]


@dataclass
class RobustnessReport:
    metrics: dict[str, float]
    subsets: MissingSubsetsResult
    importance: ImportanceResult
    noise: NoiseResult
    samples: int
    seconds: dict[str, float]
    files: dict[str, Path] = field(default_factory=dict)
    skipped: SkipReport = field(default_factory=SkipReport)


def run_robustness(model: MultimodalModel, records: Sequence[Record], out: str | Path | None = None,
                   seed: int = 0, levels: int | Sequence[float] = 11, corruptions: Sequence[str] | None = None,
                   batch_size: int = 128, on_error: Literal["raise", "skip"] = "raise") -> RobustnessReport:
    """Missing-modality subsets, modality importance and noise robustness; writes CSVs/PNGs to ``out``."""
    grid = noise_levels(levels)  # check the arguments before the slow part
    plan_corruptions(model, corruptions)
    timer = time.perf_counter()
    decoded = decode_records(model, records, on_error)
    seconds = {"decode": time.perf_counter() - timer}
    timer = time.perf_counter()
    runner = CachedRunner(model, decoded.samples, batch_size)
    subsets = missing_subsets(model, runner)
    importance = shapley_importance(subsets)
    seconds["subsets"] = time.perf_counter() - timer
    noise = noise_robustness(model, decoded, corruptions, grid, seed, batch_size, runner)
    seconds["noise"] = noise.seconds
    report = RobustnessReport(subsets.all.metrics, subsets, importance, noise, len(decoded), seconds,
                              skipped=decoded.report)
    if out is not None:
        timer = time.perf_counter()
        report.files = write_report(report, Path(out))
        seconds["write"] = time.perf_counter() - timer
    seconds["total"] = sum(seconds.values())
    return report


# -------------------------------------------------------------------------------------- output


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def write_report(report: RobustnessReport, out: Path) -> dict[str, Path]:
    """missing_subsets.csv, importance.csv, noise.csv, noise_auc.csv, noise_curves.png, importance.png."""
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("missing_subsets.csv", "importance.csv", "noise.csv", "noise_auc.csv",
                                           "noise_curves.png", "importance.png")}
    subsets, importance, noise = report.subsets, report.importance, report.noise
    names = list(subsets.all.metrics)
    rows: list[list[Any]] = [[s.name, len(s.present), *(_fmt(s.metrics[n]) for n in names)]
                             for s in [*subsets.subsets, subsets.empty]]
    _write_csv(files["missing_subsets.csv"], ["present", "n_present", *names], rows)
    rows = [[importance.metric, "", m, _fmt(importance.ablation[m]), _fmt(importance.shapley[m])]
            for m in importance.modalities]
    for c in importance.classes or []:
        assert importance.per_class_ablation is not None and importance.per_class_shapley is not None
        rows += [["recall", c, m, _fmt(importance.per_class_ablation[c][m]), _fmt(importance.per_class_shapley[c][m])]
                 for m in importance.modalities]
    _write_csv(files["importance.csv"], ["metric", "class", "modality", "ablation_delta", "shapley"], rows)
    rows = [[c.modality, c.corruption, f"{level:g}", noise.metric, _fmt(v)]
            for c in noise.curves for level, v in zip(c.levels, c.values, strict=True)]
    _write_csv(files["noise.csv"], ["modality", "corruption", "level", "metric", "value"], rows)
    rows = [[c.modality, c.corruption, noise.metric, _fmt(c.values[0]), _fmt(c.values[-1]), _fmt(c.auc)]
            for c in noise.curves]
    _write_csv(files["noise_auc.csv"], ["modality", "corruption", "metric", "clean", "at_max_level", "auc"], rows)
    plot_noise_curves(report, files["noise_curves.png"])
    plot_importance(importance, files["importance.png"])
    return files


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_noise_curves(report: RobustnessReport, path: Path) -> None:
    """One subplot per modality, one line per corruption; dashed: the modality hidden; dotted: all hidden."""
    plt = _pyplot()
    noise, subsets = report.noise, report.subsets
    modalities = [m for m in subsets.modalities if any(c.modality == m for c in noise.curves)]
    fig, axes = plt.subplots(1, max(1, len(modalities)), figsize=(4.2 * max(1, len(modalities)), 3.6),
                             sharey=True, squeeze=False)
    for ax, modality in zip(axes[0], modalities, strict=False):
        for c in noise.curves:
            if c.modality == modality:
                ax.plot(c.levels, c.values, marker="o", markersize=3, label=f"{c.corruption} (AUC {c.auc:.2f})")
        others = [m for m in subsets.modalities if m != modality]
        ax.axhline(subsets.value(others), linestyle="--", color="grey", linewidth=1, label=f"{modality} hidden")
        ax.axhline(subsets.empty.metrics[noise.metric], linestyle=":", color="black", linewidth=1, label="all hidden")
        ax.set_title(modality)
        ax.set_xlabel("corruption level")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    better = "higher" if noise.mode == "max" else "lower"
    axes[0][0].set_ylabel(f"{noise.metric} ({better} is better)")
    fig.suptitle(f"{noise.metric} vs. input corruption ({report.samples} samples, seed {noise.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_importance(importance: ImportanceResult, path: Path) -> None:
    """Ablation delta and Shapley value per modality; and per-class Shapley values when there are classes."""
    plt = _pyplot()
    per_class = importance.per_class_shapley
    fig, axes = plt.subplots(1, 2 if per_class else 1, squeeze=False,
                             figsize=(11 if per_class else 5.5, 3.8),
                             gridspec_kw={"width_ratios": [1, 2]} if per_class else None)
    ax = axes[0][0]
    mods = importance.modalities
    x = list(range(len(mods)))
    width = 0.38
    bars = ax.bar([i - width / 2 for i in x], [importance.ablation[m] for m in mods], width, label="ablation delta")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    bars = ax.bar([i + width / 2 for i in x], [importance.shapley[m] for m in mods], width, label="Shapley")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, mods)
    ax.margins(y=0.2)
    ax.axhline(0, color="black", linewidth=0.8)
    sign = "" if importance.mode == "max" else "-"
    ax.set_ylabel(f"importance ({sign}{importance.metric})")
    ax.set_title(f"overall ({importance.metric}: all {importance.full:.2f}, none {importance.empty:.2f})")
    ax.legend(fontsize=8)
    if per_class:
        ax = axes[0][1]
        classes = list(per_class)
        width = 0.8 / max(1, len(mods))
        for j, m in enumerate(mods):
            ax.bar([i + (j - (len(mods) - 1) / 2) * width for i in range(len(classes))],
                   [per_class[c][m] for c in classes], width, label=m)
        ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("Shapley value (recall)")
        ax.set_title("per class")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_tables(report: RobustnessReport) -> list[Table]:
    """Rich tables: missing subsets, importance (overall and per class), noise AUCs."""
    subsets, importance, noise = report.subsets, report.importance, report.noise
    better = "higher is better" if subsets.mode == "max" else "lower is better"
    names = list(subsets.all.metrics)
    names.remove(subsets.metric)
    names.insert(0, subsets.metric)
    table = Table(title=f"missing modalities: metrics with only these present ({subsets.metric}: {better})")
    table.add_column("present")
    for n in names:
        table.add_column(n, justify="right")
    for s in [*subsets.subsets, subsets.empty]:
        table.add_row(s.name if s.present else "none (all hidden)", *(_fmt(s.metrics[n]) for n in names))
    tables = [table]

    unit = importance.metric if importance.mode == "max" else f"-{importance.metric}"
    table = Table(title=f"modality importance in {unit} (all {importance.full:.4f}, none {importance.empty:.4f}); "
                        "positive = helps")
    for column in ("modality", "ablation delta", "Shapley"):
        table.add_column(column, justify="left" if column == "modality" else "right")
    for m in importance.modalities:
        table.add_row(m, _fmt(importance.ablation[m]), _fmt(importance.shapley[m]))
    table.add_row("sum", "", _fmt(sum(importance.shapley.values())))
    tables.append(table)
    if importance.per_class_shapley:
        table = Table(title="Shapley value per class (on the class's recall)")
        table.add_column("class")
        for m in importance.modalities:
            table.add_column(m, justify="right")
        for c, values in importance.per_class_shapley.items():
            table.add_row(c, *(_fmt(values[m]) for m in importance.modalities))
        tables.append(table)

    table = Table(title=f"noise robustness: {noise.metric} vs. corruption level 0..1 ({better}; "
                        f"AUC = trapezoid area over levels, seed {noise.seed})")
    top = f"level {noise.curves[0].levels[-1]:g}" if noise.curves else "max level"
    for column in ("modality", "corruption", "clean", top, "AUC"):
        table.add_column(column, justify="left" if column in ("modality", "corruption") else "right")
    for curve in noise.curves:
        table.add_row(curve.modality, curve.corruption, _fmt(curve.values[0]), _fmt(curve.values[-1]),
                      _fmt(curve.auc))
    tables.append(table)
    return tables
